//! The deadline worker: a request whose deadline minus its model's
//! `fallback_margin` arrives while it is still open is sent as a realtime
//! call when the policy allows (any batch result for it that comes later is
//! dropped: results apply only to open requests), else it expires (504).
//!
//! Nothing here lives only in memory: due requests are read from the store
//! each pass, so a fallback cut short by a shutdown or a crash is simply
//! due again on the next start. At shutdown the worker stops looking and
//! lets the calls in flight finish (each is bounded by the request timeout).

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::fallback::{self, Candidate, FallbackReason};
use crate::deferral::engine::{ms, now_ms, Deferral};
use crate::store::{RequestRecord, Resolution, ResolvedStatus, StoreError};

/// Longest sleep between passes when nothing wakes the worker.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Due requests read per pass.
const PAGE: u32 = 256;

pub async fn run(deferral: Deferral, shutdown: CancellationToken) {
    let mut in_flight = JoinSet::new();
    loop {
        let next = match tick(&deferral, &mut in_flight).await {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(error = %err, "deadline pass failed; retrying");
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
/// next one will be.
async fn tick(deferral: &Deferral, in_flight: &mut JoinSet<()>) -> Result<Duration, StoreError> {
    let now = now_ms();
    let horizon = now + ms(deferral.config.batching.max_fallback_margin()) + ms(IDLE_CHECK);
    let mut next = IDLE_CHECK;
    for request in deferral.store.due_requests(horizon, PAGE).await? {
        let Some(upstream) = deferral.upstream(&request.upstream) else {
            continue;
        };
        let policy = deferral
            .config
            .batching
            .policy_for(&request.model, upstream.config.dialect);
        let Some(deadline) = request.deadline else {
            continue;
        };
        let fire_at = deadline - ms(policy.fallback_margin);
        if fire_at > now {
            next = next.min(Duration::from_millis((fire_at - now) as u64));
            continue;
        }
        if deferral.fallbacks.contains(&request.id) {
            continue;
        }
        let deferral = deferral.clone();
        let realtime = policy.on_batch_failure.allows_realtime();
        in_flight.spawn(async move {
            let id = request.id.clone();
            let result = if realtime {
                send_realtime(&deferral, &request).await.map(|_| ())
            } else {
                expire(&deferral, &request).await
            };
            if let Err(err) = result {
                tracing::warn!(request = %id, error = %err, "deadline fallback failed; the next pass retries");
            }
        });
    }
    Ok(next)
}

async fn send_realtime(deferral: &Deferral, request: &RequestRecord) -> Result<bool, StoreError> {
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
    fallback::realtime(
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
    .await
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
