//! The flusher: seals windows that are due and submits sealed windows as
//! provider batch jobs, one step (one store transition) at a time, so a
//! crash anywhere resumes from the last step on restart.
//!
//! Steps: sealed → upload the JSONL streamed from the store → uploaded →
//! creating (recorded before the create call) → create the job with the
//! window id in its metadata → submitted. A window found in `creating` at
//! start may already have a job: it is looked up by that metadata and
//! adopted instead of created twice. Anthropic windows have no upload
//! and no metadata: [`super::inline`] creates them inline and finds their
//! batch after a crash.
//!
//! Replicas sharing one store see the same sealed windows: each submission
//! runs under the window's lease ([`super::lease`]), so only one process
//! uploads a window or creates (or adopts) its job at a time.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::engine::{now_ms, BatchUpstream, BusyGuard, Deferral};
use super::inline::{Created, INLINE_FILE};
use super::lease::{leased, LeaseLost};
use super::policy;
use super::quota;
use crate::config::WindowPolicy;
use crate::model::Dialect;
use crate::providers::{input_filename, write_input_line, JobPhase, JobView, ProviderError};
use crate::resolution::deadline::answer_too_late;
use crate::resolution::fallback::settle_unfinished;
use crate::resolution::orphans::{drop_copies_at_end, drop_surplus_copies};
use crate::store::{
    FlushReason, Lease, StoreError, WindowOutcome, WindowRecord, WindowState, WindowSummary,
};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("upstream {0} is not configured")]
    UnknownUpstream(String),
    #[error("no upstream key for window {0}")]
    NoKey(String),
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    #[error(transparent)]
    Reconcile(#[from] crate::resolution::reconcile::ReconcileError),
    /// Which of several batches is the window's cannot be told yet
    /// ([`super::inline::adopt`]).
    #[error("several running batches could be this window's; waiting until they end")]
    Ambiguous,
}

impl SubmitError {
    /// Whether waiting cannot help: a provider client error other than 429
    /// (400, 401, 403, 404, 422 …), a spend or quota limit, an answer that
    /// cannot be read, or an upstream or key that is not there.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Provider(err) => err.is_permanent(),
            Self::UnknownUpstream(_) | Self::NoKey(_) => true,
            Self::Store(_) | Self::LeaseLost(_) | Self::Reconcile(_) | Self::Ambiguous => false,
        }
    }
}

/// Sends a window that cannot be submitted down the failure chain at once,
/// with `reason` (the provider's message) as the job error, and finishes
/// it `failed`.
pub async fn fail_window(
    deferral: &Deferral,
    window: &WindowRecord,
    reason: &str,
) -> Result<(), StoreError> {
    let job = JobView {
        id: format!("for window {}", window.id),
        phase: JobPhase::Failed,
        raw_status: "not_submitted".to_owned(),
        output_file: None,
        error_file: None,
        errors: vec![reason.to_owned()],
        named_lines: Vec::new(),
        total: 0,
        succeeded: 0,
        failed: 0,
        window: Some(window.id.to_string()),
        created_at: 0,
    };
    match deferral.upstream(&window.key.upstream) {
        Some(upstream) => {
            let key = upstream.key_for(window);
            let tally = settle_unfinished(deferral, upstream, key, window, &job).await?;
            if tally.unsettled {
                return Ok(());
            }
        }
        None => {
            // Its upstream was renamed or removed from the config: nothing
            // can ever submit or answer it, so say so rather than leave it.
            let code = "upstream_removed";
            let message = format!(
                "upstream `{}` is no longer configured; the request cannot be submitted",
                window.key.upstream
            );
            let failed = deferral
                .store
                .fail_unresolved(&window.id, code, &message, now_ms())
                .await?;
            deferral.waiters.wake(&failed);
        }
    }
    deferral
        .store
        .finish_window(&window.id, WindowOutcome::Failed, now_ms())
        .await?;
    delete_input(deferral, window).await;
    Ok(())
}

/// Deletes a failed window's input file at the provider (`delete_files`;
/// best effort, a failure is only logged): nothing reads it again, and it
/// would count against the provider's storage quota.
///
/// Surplus copies of a passthrough window's input go too, whatever
/// `delete_files` says ([`drop_copies_at_end`]).
async fn delete_input(deferral: &Deferral, window: &WindowRecord) {
    let Some(upstream) = deferral.upstream(&window.key.upstream) else {
        return;
    };
    let Some(key) = upstream.key_for(window) else {
        return;
    };
    // The caller's copy may predate the upload (a create refused for good).
    let mut window = window.clone();
    if let Ok(Some(stored)) = deferral.store.window(&window.id).await {
        window.file_id = stored.file_id;
    }
    let client = upstream.client.scoped(&window.key.scope);
    drop_copies_at_end(&client, upstream.config.auth, key, &window).await;
    let Some(file) = window.file_id.as_deref() else {
        return;
    };
    if !deferral.config.batching.delete_files {
        return;
    }
    if let Err(err) = client.delete_file(key, file).await {
        tracing::warn!(window = %window.id, file, error = %err, "could not delete a failed window's input file");
    }
}

/// How long the flusher sleeps when nothing is open.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Runs until `shutdown`; then seals every open window (reason shutdown)
/// so a restart submits them at once.
pub async fn run(deferral: Deferral, shutdown: CancellationToken) {
    loop {
        let next = match tick(&deferral).await {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(error = %err, "flusher pass failed; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = deferral.flush_wake.notified() => {}
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// What decides when an open window is due: its model's policy, its age
/// and time left before its earliest fallback, and the expected batch
/// turnaround. Shared with the operator's API, which shows the forecast.
pub fn timing(
    deferral: &Deferral,
    window: &WindowSummary,
    upstream: &BatchUpstream,
    now: i64,
) -> (WindowPolicy, policy::WindowAge, policy::Turnaround) {
    let policy = deferral
        .config
        .batching
        .policy_for(&window.key.model, upstream.config.dialect);
    let earliest_fallback =
        window
            .earliest_deadline
            .zip(window.earliest_midpoint)
            .map(|(deadline, midpoint)| {
                policy::earliest_fallback(deadline, midpoint, policy.fallback_margin)
            });
    let age = policy::WindowAge {
        age_ms: now - window.opened_at,
        until_fallback_ms: earliest_fallback.map(|f| f - now),
    };
    let turnaround = policy::Turnaround {
        expected: deferral.turnarounds.expected(
            &window.key.upstream,
            &window.key.model,
            policy.expected_turnaround,
        ),
        poll_interval: deferral.config.batching.poll_interval,
    };
    (policy, age, turnaround)
}

/// Seals the windows that are due, starts submitting the sealed ones, and
/// says when to look again.
async fn tick(deferral: &Deferral) -> Result<Duration, StoreError> {
    let now = now_ms();
    let mut next = IDLE_CHECK;
    let open = deferral.store.open_windows().await?;
    deferral.metrics.observe_open_windows(&open, now);
    for window in open {
        let Some(upstream) = deferral.upstream(&window.key.upstream) else {
            // Its upstream is gone from the config: sealed, the pass below
            // fails it (`upstream_removed`) instead of skipping it forever.
            // Operator: a config change made it, not a batching limit.
            deferral
                .store
                .seal_window(&window.id, FlushReason::Operator, now)
                .await?;
            continue;
        };
        let (policy, age, turnaround) = timing(deferral, &window, upstream, now);
        match policy::due(age, policy.max_wait, turnaround) {
            Some(reason) => {
                if deferral.store.seal_window(&window.id, reason, now).await? {
                    deferral
                        .metrics
                        .flushes
                        .with_label_values(&[reason.as_str()])
                        .inc();
                }
            }
            None => next = next.min(policy::next_check(age, policy.max_wait, turnaround)),
        }
    }
    // One listing for the quota decision and the work, so a window sealed
    // in between is not submitted unchecked.
    let listed = deferral.store.windows_in(&quota::QUEUED).await?;
    let waiting = quota::waiting_among(deferral, &listed);
    for window in listed {
        if window.state == WindowState::Submitted
            || deferral.backing_off(&window.id)
            || waiting.contains(&window.id)
        {
            continue;
        }
        let Some(guard) = BusyGuard::try_take(deferral, &window.id) else {
            continue;
        };
        let deferral = deferral.clone();
        deferral.clone().spawn(async move {
            let _guard = guard;
            let id = window.id.clone();
            let record = window.clone();
            match submit_leased(&deferral, window).await {
                Ok(true) => deferral.succeeded_attempt(&id),
                // Another replica holds it; looked at again next pass.
                Ok(false) => {}
                Err(err) if err.is_permanent() => {
                    tracing::warn!(window = %id, error = %err, "window submission failed for a reason that will not clear; failing the window");
                    deferral.metrics.submit_failures.inc();
                    if let Err(store) = fail_window(&deferral, &record, &err.to_string()).await {
                        tracing::warn!(window = %id, error = %store, "could not fail the window; will retry");
                        deferral.failed_attempt(&id);
                    } else {
                        deferral.succeeded_attempt(&id);
                    }
                    deferral.flush_wake.notify_one();
                }
                Err(err) => {
                    tracing::warn!(window = %id, error = %err, "window submission failed; will retry");
                    deferral.metrics.submit_failures.inc();
                    deferral.failed_attempt(&id);
                    deferral.flush_wake.notify_one();
                }
            }
        });
    }
    Ok(next)
}

/// Seals every open window with `reason` (shutdown, operator flush).
pub async fn seal_all(deferral: &Deferral, reason: FlushReason) -> Result<usize, StoreError> {
    let now = now_ms();
    let mut sealed = 0;
    for window in deferral.store.open_windows().await? {
        if deferral.store.seal_window(&window.id, reason, now).await? {
            deferral
                .metrics
                .flushes
                .with_label_values(&[reason.as_str()])
                .inc();
            sealed += 1;
        }
    }
    deferral.flush_wake.notify_one();
    Ok(sealed)
}

/// Submits every sealed window now, one after another (used at shutdown).
pub async fn submit_sealed(deferral: &Deferral) {
    let windows = match deferral.store.windows_in(&quota::QUEUED).await {
        Ok(w) => w,
        Err(err) => {
            tracing::error!(error = %err, "cannot list sealed windows");
            return;
        }
    };
    // Windows waiting for quota stay sealed for the next start.
    let waiting = quota::waiting_among(deferral, &windows);
    let due = windows
        .into_iter()
        .filter(|w| w.state != WindowState::Submitted && !waiting.contains(&w.id));
    for window in due {
        let Some(_guard) = BusyGuard::try_take(deferral, &window.id) else {
            continue;
        };
        let id = window.id.clone();
        if let Err(err) = submit_leased(deferral, window).await {
            tracing::warn!(window = %id, error = %err, "window not submitted at shutdown; the next start will");
        }
    }
}

/// [`submit`] under the window's lease: false, with nothing done, when
/// another process holds it.
pub async fn submit_leased(deferral: &Deferral, window: WindowRecord) -> Result<bool, SubmitError> {
    let lease = Lease::Window(window.id.clone());
    Ok(leased(deferral, lease, submit(deferral, window))
        .await?
        .is_some())
}

/// Takes one window from wherever it stands to `submitted`. Called under
/// the window's lease; the record it is handed was read before the lease
/// was taken, so the window is read again: another task or replica may
/// have moved it on meanwhile (review L3).
pub async fn submit(deferral: &Deferral, window: WindowRecord) -> Result<(), SubmitError> {
    let Some(mut window) = deferral.store.window(&window.id).await? else {
        return Ok(());
    };
    let submittable = [
        WindowState::Sealed,
        WindowState::Uploaded,
        WindowState::Creating,
    ];
    if !submittable.contains(&window.state) {
        return Ok(());
    }
    let upstream = deferral
        .upstream(&window.key.upstream)
        .ok_or_else(|| SubmitError::UnknownUpstream(window.key.upstream.clone()))?;
    let key = upstream
        .key_for(&window)
        .ok_or_else(|| SubmitError::NoKey(window.id.to_string()))?
        .to_owned();
    let client = &upstream.client.scoped(&window.key.scope);

    if window.state == WindowState::Sealed {
        if !answer_too_late(deferral, upstream, &window).await? {
            return Ok(());
        }
        // One page of the window tells whether any member is still open;
        // listing every id would cost memory in proportion to the window.
        let first = deferral.store.window_lines(&window.id).next().await;
        if first.transpose()?.is_none() {
            // Every member was cancelled or answered realtime: nothing to submit.
            deferral
                .store
                .finish_window(&window.id, WindowOutcome::Completed, now_ms())
                .await?;
            return Ok(());
        }
        let store = deferral.store.clone();
        let (id, dialect, endpoint) = (
            window.id.clone(),
            client.dialect(),
            window.key.endpoint.clone(),
        );
        let file_id = if dialect == Dialect::Anthropic {
            // No file: the requests go inline in the create call.
            INLINE_FILE.to_owned()
        } else {
            let file_id = client
                .upload(&key, &input_filename(&id), move || {
                    let endpoint = endpoint.clone();
                    store.window_lines(&id).map(move |row| {
                        let (request, body) = row.map_err(std::io::Error::other)?;
                        let mut line = Vec::with_capacity(body.len() + 96);
                        write_input_line(dialect, request.as_str(), &endpoint, &body, &mut line)
                            .map_err(std::io::Error::other)?;
                        Ok::<Bytes, std::io::Error>(Bytes::from(line))
                    })
                })
                .await?;
            tracing::info!(window = %window.id, file = %file_id, "window input uploaded");
            file_id
        };
        if !deferral.store.record_upload(&window.id, &file_id).await? {
            // Someone else moved the window on (another replica): our
            // upload is surplus.
            let _ = client.delete_file(&key, &file_id).await;
            return Ok(());
        }
        // Copies of an earlier attempt (one that timed out but went
        // through, or one before a crash) are surplus now.
        drop_surplus_copies(client, &key, &window, &file_id).await;
        window.state = WindowState::Uploaded;
        window.file_id = Some(file_id);
    }

    // A window already in `creating` may have a job whose id we never
    // stored (a crash, or a create that timed out after it succeeded).
    let adopt = window.state == WindowState::Creating;
    if window.state == WindowState::Uploaded && !deferral.store.mark_creating(&window.id).await? {
        return Ok(());
    }
    let file_id = window.file_id.clone().unwrap_or_default();
    let inline = client.dialect() == Dialect::Anthropic;
    let existing = if adopt && inline {
        super::inline::adopt(deferral, client, &key, &window).await?
    } else if adopt {
        let since = window.sealed_at.unwrap_or(window.opened_at) / 1000 - 3600;
        client.find_job_for_window(&key, &window.id, since).await?
    } else {
        None
    };
    let (job, created) = match existing {
        Some(job) => {
            tracing::info!(window = %window.id, job = %job.id, "adopted a job created before a restart");
            (job, false)
        }
        None => {
            let attempt = if inline {
                match super::inline::create(deferral, client, &key, &window).await? {
                    Ok(Created::Job(job)) => Ok(*job),
                    Ok(Created::Settled) => return Ok(()),
                    Err(err) => Err(err),
                }
            } else {
                client
                    .create_job(
                        &key,
                        &file_id,
                        &window.key.model,
                        &window.key.endpoint,
                        &window.id,
                    )
                    .await
            };
            match attempt {
                Ok(job) => (job, true),
                Err(err) if err.is_enqueued_token_limit() => {
                    quota::back_to_waiting(deferral, upstream, &key, &window).await?;
                    return Ok(());
                }
                Err(err) => return Err(err.into()),
            }
        }
    };
    if !deferral
        .store
        .record_job(&window.id, &job.id, now_ms())
        .await?
    {
        if created {
            // Another task recorded a job for the window first: ours would
            // never be polled, yet billed. Cancel it.
            tracing::warn!(window = %window.id, job = %job.id, "the window already has a job; cancelling the surplus one");
            if let Err(err) = client.cancel_job(&key, &job.id).await {
                tracing::warn!(window = %window.id, job = %job.id, error = %err, "could not cancel a surplus job");
            }
        }
        return Ok(());
    }
    deferral
        .metrics
        .batch_jobs
        .with_label_values(&[
            &window.key.upstream,
            deferral.metrics.model_label(&window.key.model),
            "submitted",
        ])
        .inc();
    tracing::info!(window = %window.id, job = %job.id, requests = window.count, "batch job submitted");
    deferral.poll_wake.notify_one();
    Ok(())
}
