//! The deadline worker: a request still open when its fallback time comes
//! (its deadline minus `fallback_margin`, never more than half its wait, see
//! [`policy::fallback_at`]) is sent as a realtime call when the policy allows
//! (any batch result for it that comes later is dropped: results apply only
//! to open requests), else it expires (504).
//!
//! A request is paid once where it can be:
//! - one still in an open (or sealed, not yet uploading) window is not in
//!   any batch file: it is answered realtime at its fallback time, or at
//!   once when its fallback is nearer than the model's expected batch
//!   turnaround (no batch could answer it in time);
//! - one whose line is already in a batch is answered realtime only while
//!   someone still waits for it: an async or callback caller that named its
//!   deadline, or a `wait` caller still held by this process (each replica
//!   answers its own held callers). Every such answer is counted in
//!   `carpool_double_paid_total`. A `wait` caller that went away leaves its
//!   request to the batch (its SDK's retry re-attaches to it).
//!
//! Nothing here lives only in memory: due requests are read from the store
//! each pass, a page at a time by (deadline, id), so requests a pass leaves
//! to their batch never hide the ones behind them. A fallback cut short by
//! a shutdown or a crash is simply due again on the next start. At shutdown
//! the worker stops looking and lets the calls in flight finish (each is
//! bounded by the request timeout).

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::fallback::{self, Candidate, FallbackReason};
use crate::deferral::engine::{ms, now_ms, BatchUpstream, Deferral};
use crate::deferral::policy;
use crate::model::RequestId;
use crate::store::{
    DeliveryMode, DueCursor, DueRequest, RequestRecord, Resolution, ResolvedStatus, StoreError,
    WindowRecord, WindowState,
};

/// Longest sleep between passes when nothing wakes the worker.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Due requests read per page.
const PAGE: u32 = 256;

/// Pages read per pass; the next pass goes on from where this one stopped.
const PAGES_PER_PASS: usize = 16;

pub async fn run(deferral: Deferral, shutdown: CancellationToken) {
    let mut in_flight = JoinSet::new();
    let mut resume = None;
    loop {
        let next = match tick(&deferral, &mut in_flight, &mut resume).await {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(error = %err, "deadline pass failed; retrying");
                resume = None;
                IDLE_CHECK
            }
        };
        while in_flight.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = deferral.deadline_wake.notified() => {}
            _ = tokio::time::sleep(next) => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Starts the fallback or expiry of every request now due; says when the
/// next one will be. `resume` is where the previous pass stopped reading,
/// when it stopped short of the end.
async fn tick(
    deferral: &Deferral,
    in_flight: &mut JoinSet<()>,
    resume: &mut Option<DueCursor>,
) -> Result<Duration, StoreError> {
    let now = now_ms();
    let horizon = now + ms(deferral.config.batching.max_fallback_margin()) + ms(IDLE_CHECK);
    let mut next = IDLE_CHECK;
    let mut cursor = resume.take();
    for _ in 0..PAGES_PER_PASS {
        let page = deferral
            .store
            .due_requests(horizon, cursor.as_ref(), PAGE)
            .await?;
        let full = page.len() == PAGE as usize;
        cursor = page.last().and_then(|due| {
            Some(DueCursor {
                deadline: due.record.deadline?,
                id: due.record.id.clone(),
            })
        });
        for due in page {
            if let Some(wait) = consider(deferral, in_flight, due, now) {
                next = next.min(wait);
            }
        }
        if !full {
            return Ok(next);
        }
    }
    *resume = cursor;
    Ok(Duration::ZERO)
}

/// Starts the fallback of one due request if its time has come; else says
/// how long until it does (`None`: not this worker's to answer).
fn consider(
    deferral: &Deferral,
    in_flight: &mut JoinSet<()>,
    due: DueRequest,
    now: i64,
) -> Option<Duration> {
    let request = due.record;
    let upstream = deferral.upstream(&request.upstream)?;
    let deadline = request.deadline?;
    let policy = deferral
        .config
        .batching
        .policy_for(&request.model, upstream.config.dialect);
    let fallback_at = policy::fallback_at(request.created_at, deadline, policy.fallback_margin);
    let in_batch = in_batch(deferral, &request, due.window);
    let fire_at = if in_batch {
        fallback_at
    } else {
        // Not in a batch yet: once no batch can be back before the fallback,
        // waiting longer gains nothing.
        let turnaround = deferral.turnarounds.expected(
            &request.upstream,
            &request.model,
            policy.expected_turnaround,
        );
        fallback_at.saturating_sub(ms(turnaround))
    };
    if fire_at > now {
        return Some(Duration::from_millis((fire_at - now) as u64));
    }
    if in_batch && !still_waited(deferral, &request) {
        // Its batch line is paid for and its caller is gone: the batch answers.
        return None;
    }
    if deferral.fallbacks.contains(&request.id) {
        return None;
    }
    let deferral = deferral.clone();
    let realtime = policy.on_batch_failure.allows_realtime();
    in_flight.spawn(async move {
        let id = request.id.clone();
        let result = if realtime {
            send_realtime(&deferral, &request, in_batch).await.map(|_| ())
        } else {
            expire(&deferral, &request).await
        };
        if let Err(err) = result {
            tracing::warn!(request = %id, error = %err, "deadline fallback failed; the next pass retries");
        }
    });
    None
}

/// Whether someone still waits for the request's answer: an async or
/// callback caller that named a deadline (it reads its handle or webhook
/// then), or a caller held on this process's connection.
fn still_waited(deferral: &Deferral, request: &RequestRecord) -> bool {
    request.mode != DeliveryMode::Wait || deferral.waiters.is_waited(&request.id)
}

/// Whether the request's line is (or may be, mid-upload) in a batch file:
/// its window got past `sealed`, or this process is uploading it now.
fn in_batch(deferral: &Deferral, request: &RequestRecord, window: Option<WindowState>) -> bool {
    match window {
        None | Some(WindowState::Open) => false,
        Some(WindowState::Sealed) => request
            .window_id
            .as_ref()
            .is_some_and(|w| deferral.busy.contains(w)),
        Some(_) => true,
    }
}

async fn send_realtime(
    deferral: &Deferral,
    request: &RequestRecord,
    in_batch: bool,
) -> Result<bool, StoreError> {
    let Some(upstream) = deferral.upstream(&request.upstream) else {
        return Ok(false);
    };
    // Passthrough upstreams: the key lives on the request's window.
    let window = match &request.window_id {
        Some(id) => deferral.store.window(id).await?,
        None => None,
    };
    let key = match &window {
        Some(w) => upstream.key_for(w),
        None => upstream.config.api_key.as_ref().map(|k| k.expose()),
    };
    let answered = fallback::realtime(
        deferral,
        Candidate {
            id: &request.id,
            upstream,
            endpoint: &request.endpoint,
            model: &request.model,
            key,
            reason: FallbackReason::Deadline,
            context: "the deadline arrived before the batch result and the realtime call failed",
        },
    )
    .await?;
    if answered && in_batch {
        deferral
            .metrics
            .double_paid
            .with_label_values(&[
                &request.upstream,
                deferral.metrics.model_label(&request.model),
            ])
            .inc();
        tracing::info!(request = %request.id, "answered realtime for its waiting caller while its line was in a live batch (paid twice)");
    }
    Ok(answered)
}

async fn expire(deferral: &Deferral, request: &RequestRecord) -> Result<(), StoreError> {
    let stored = deferral
        .store
        .resolve_one(Resolution {
            id: request.id.clone(),
            status: ResolvedStatus::Expired,
            served_by: None,
            response_status: None,
            response_body: None,
            error_code: Some("deadline_exceeded".to_owned()),
            error_message: Some(
                "the deadline arrived before the batch result, and on_batch_failure = \"error\" allows no realtime call"
                    .to_owned(),
            ),
            completed_at: now_ms(),
            charge: None,
        })
        .await?;
    if stored {
        deferral
            .metrics
            .requests_expired
            .with_label_values(&["deadline"])
            .inc();
        deferral.waiters.wake(std::slice::from_ref(&request.id));
        tracing::info!(request = %request.id, "expired at its deadline");
    }
    Ok(())
}

/// Before a sealed window is uploaded: answers realtime every member whose
/// fallback is nearer than the batch's expected turnaround, so it is never
/// put in a batch it cannot wait for and paid again. True when the window
/// may be uploaded now; false while such a member is still being answered
/// by another task (the next pass tries again).
pub async fn answer_too_late(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    window: &WindowRecord,
) -> Result<bool, StoreError> {
    let policy = deferral
        .config
        .batching
        .policy_for(&window.key.model, upstream.config.dialect);
    let turnaround = deferral.turnarounds.expected(
        &window.key.upstream,
        &window.key.model,
        policy.expected_turnaround,
    );
    let now = now_ms();
    let late: Vec<RequestId> = deferral
        .store
        .queued_deadlines(&window.id)
        .await?
        .into_iter()
        .filter(|m| {
            let fallback_at = policy::fallback_at(m.created_at, m.deadline, policy.fallback_margin);
            !policy::batch_in_time(fallback_at - now, turnaround)
        })
        .map(|m| m.id)
        .collect();
    if late.is_empty() {
        return Ok(true);
    }
    let key = upstream.key_for(window);
    for id in &late {
        let answered = fallback::realtime(
            deferral,
            Candidate {
                id,
                upstream,
                endpoint: &window.key.endpoint,
                model: &window.key.model,
                key,
                reason: FallbackReason::Deadline,
                context: "the deadline left no time for a batch and the realtime call failed",
            },
        )
        .await?;
        if !answered && deferral.store.is_open(id).await? {
            return Ok(false);
        }
    }
    tracing::info!(window = %window.id, requests = late.len(), "answered realtime before upload: too late for a batch");
    Ok(true)
}
