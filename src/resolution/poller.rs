//! The poller: asks the provider about every submitted job each
//! `poll_interval`, and reconciles the ones that ended. Each window is
//! polled under its lease ([`crate::deferral::lease`]), so replicas sharing
//! the store do not reconcile one job twice (nor run its failure chain's
//! realtime calls twice).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::orphans::drop_copies_at_end;
use super::reconcile::{reconcile, ReconcileError};
use super::spool::SpoolError;
use crate::deferral::engine::{now_ms, BatchUpstream, BusyGuard, Deferral};
use crate::deferral::flusher::fail_window;
use crate::deferral::lease::leased;
use crate::providers::JobPhase;
use crate::store::{Lease, StoreError, WindowOutcome, WindowRecord, WindowState};

pub async fn run(deferral: Deferral, shutdown: CancellationToken) {
    let interval = deferral.config.batching.poll_interval;
    loop {
        if let Err(err) = tick(&deferral, &shutdown).await {
            tracing::error!(error = %err, "poller pass failed; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = deferral.poll_wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn tick(deferral: &Deferral, shutdown: &CancellationToken) -> Result<(), StoreError> {
    for window in deferral.store.windows_in(&[WindowState::Submitted]).await? {
        if shutdown.is_cancelled() {
            break;
        }
        let Some(guard) = BusyGuard::try_take(deferral, &window.id) else {
            continue;
        };
        let deferral = deferral.clone();
        deferral.clone().spawn(async move {
            let _guard = guard;
            let id = window.id.clone();
            if let Err(err) = poll_leased(&deferral, window).await {
                tracing::warn!(window = %id, error = %err, "polling a batch job failed; will retry");
            }
        });
    }
    Ok(())
}

/// [`poll_one`] under the window's lease: false, with nothing done, when
/// another process holds it.
pub async fn poll_leased(
    deferral: &Deferral,
    window: WindowRecord,
) -> Result<bool, ReconcileError> {
    let lease = Lease::Window(window.id.clone());
    Ok(leased(deferral, lease, poll_one(deferral, window))
        .await?
        .is_some())
}

/// Polls one window's job and reconciles it once it ended. A window that
/// can never be polled (its upstream gone from the config, no key, no job
/// id) or whose provider answers in a way that will not clear (a 4xx on
/// the job or its files, an unreadable answer) goes down the failure chain
/// with the reason instead of being polled again forever; transient
/// errors are left for the next pass.
async fn poll_one(deferral: &Deferral, window: WindowRecord) -> Result<(), ReconcileError> {
    let Some(upstream) = deferral.upstream(&window.key.upstream) else {
        let reason = format!(
            "upstream \"{}\" is no longer configured, so its batch job cannot be polled",
            window.key.upstream
        );
        return give_up(deferral, &window, &reason).await;
    };
    let Some(job_id) = window.job_id.as_deref() else {
        return give_up(deferral, &window, "no batch job id was recorded").await;
    };
    let Some(key) = upstream.key_for(&window) else {
        let reason = "no upstream key to poll the batch job with";
        return give_up(deferral, &window, reason).await;
    };
    match poll_job(deferral, upstream, key, job_id, &window).await {
        Err(err) if is_permanent(&err) => give_up(deferral, &window, &err.to_string()).await,
        done => done,
    }
}

/// Whether a poll or reconciliation failed for a reason retrying cannot help.
fn is_permanent(err: &ReconcileError) -> bool {
    match err {
        ReconcileError::Provider(err) | ReconcileError::Spool(SpoolError::Provider(err)) => {
            err.is_permanent()
        }
        _ => false,
    }
}

/// Fails the window's open requests down the failure chain with `reason`.
async fn give_up(
    deferral: &Deferral,
    window: &WindowRecord,
    reason: &str,
) -> Result<(), ReconcileError> {
    tracing::warn!(window = %window.id, reason, "a batch job cannot be polled; failing its window");
    // It deletes the window's input file too.
    fail_window(deferral, window, reason).await?;
    Ok(())
}

/// Asks the provider about `job_id`; once it ended, reconciles it,
/// finishes the window and deletes its files.
async fn poll_job(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: &str,
    job_id: &str,
    window: &WindowRecord,
) -> Result<(), ReconcileError> {
    let client = &upstream.client.scoped(&window.key.scope);
    let job = client.get_job(key, job_id).await?;
    if window.provider_status.as_deref() != Some(job.raw_status.as_str()) {
        deferral
            .store
            .record_job_status(&window.id, &job.raw_status)
            .await?;
    }
    if !job.phase.is_terminal()
        || crate::deferral::quota::on_terminal_job(deferral, upstream, key, window, &job).await?
    {
        return Ok(());
    }
    let started = window.submitted_at.unwrap_or(window.opened_at);
    let tally = reconcile(deferral, upstream, key, window, &job).await?;
    if tally.chain.unsettled {
        tracing::info!(window = %window.id, "realtime fallbacks still in flight; the window finishes on a later pass");
        return Ok(());
    }
    let outcome = if job.phase == JobPhase::Completed {
        WindowOutcome::Completed
    } else {
        WindowOutcome::Failed
    };
    deferral
        .store
        .finish_window(&window.id, outcome, now_ms())
        .await?;
    deferral
        .metrics
        .batch_jobs
        .with_label_values(&[
            &window.key.upstream,
            deferral.metrics.model_label(&window.key.model),
            job.phase.as_str(),
        ])
        .inc();
    let took = Duration::from_millis((now_ms() - started).max(0) as u64);
    deferral
        .metrics
        .batch_turnaround
        .observe(took.as_secs_f64());
    if job.phase == JobPhase::Completed {
        deferral
            .turnarounds
            .record(&window.key.upstream, &window.key.model, took);
    }
    tracing::info!(
        window = %window.id, job = %job.id, status = %job.raw_status,
        succeeded = tally.succeeded, failed = tally.failed, missing = tally.missing,
        unfinished = tally.unfinished, resubmitted = tally.chain.resubmitted, realtime = tally.chain.realtime,
        spooling_ms = tally.spooling.as_millis() as u64, storing_ms = tally.storing.as_millis() as u64,
        "batch job reconciled"
    );
    let files = [
        window.file_id.as_deref(),
        job.output_file.as_deref(),
        job.error_file.as_deref(),
    ];
    delete_files(deferral, upstream, key, window, files.into_iter().flatten()).await;
    drop_copies_at_end(client, upstream.config.auth, key, window).await;
    Ok(())
}

/// Deletes a finished window's files at the provider when the config says
/// so (`delete_files`): best effort, a failure is only logged.
async fn delete_files<'a>(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: &str,
    window: &WindowRecord,
    files: impl Iterator<Item = &'a str>,
) {
    if !deferral.config.batching.delete_files {
        return;
    }
    for file in files {
        if let Err(err) = upstream
            .client
            .scoped(&window.key.scope)
            .delete_file(key, file)
            .await
        {
            tracing::warn!(window = %window.id, file, error = %err, "could not delete a provider file");
        }
    }
}
