//! When a batch cannot answer: the failure chain and realtime calls.
//!
//! A job that failed, expired, timed out or was cancelled has its finished
//! lines delivered by reconciliation first; what is left goes down one
//! chain, starting where the model's `on_batch_failure` says:
//!
//! 1. `resubmit`: each request still under `resubmit_limit` resubmissions is
//!    put back in the open window of its key (the next job).
//! 2. `realtime`: the rest are sent to the synchronous endpoint and
//!    answered with `Carpool-Served-By: realtime`.
//! 3. `error`: whatever is still open fails with 502 and the provider's
//!    reason (a realtime call that could not be made lands here too).
//!
//! Every step is one store transition per request, and the window is
//! finished only after the chain ran, so a crash midway re-runs the chain
//! on restart for exactly the requests it had not reached.

use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use futures_util::future::join_all;

use super::reconcile::upstream_message;
use crate::config::{FailurePolicy, Secret};
use crate::deferral::engine::{now_ms, BatchUpstream, Deferral, FallbackGuard};
use crate::deferral::lease::{leased, LeaseLost};
use crate::model::{RequestId, ServedBy};
use crate::pricing::TokenUsage;
use crate::providers::{JobPhase, JobView, RetryPolicy};
use crate::proxy::headers;
use crate::server::auth::Caller;
use crate::store::{Lease, Resolution, ResolvedStatus, StoreError, WindowRecord};

/// Realtime calls one window's failure runs at once.
const CONCURRENCY: usize = 8;

/// Attempts of one realtime call (429, 5xx, connection errors retried).
const ATTEMPTS: u32 = 3;

/// Largest realtime answer stored.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Keys a realtime fallback drops from the caller's body: the answer is
/// stored, then replayed (as SSE to a streaming caller).
const STRIPPED_KEYS: &[&str] = &["stream", "stream_options"];

/// Why a request went realtime (the `reason` label of the metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    Deadline,
    Failed,
    Expired,
    Cancelled,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deadline => "deadline",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// The reason a job in `phase` gives its unfinished requests.
    pub fn of(phase: JobPhase) -> Self {
        match phase {
            JobPhase::Expired => Self::Expired,
            JobPhase::Cancelled => Self::Cancelled,
            _ => Self::Failed,
        }
    }
}

/// A request to answer realtime, and how.
pub struct Candidate<'a> {
    pub id: &'a RequestId,
    pub upstream: &'a BatchUpstream,
    pub endpoint: &'a str,
    pub model: &'a str,
    /// The upstream key (carpool's own, or the window owner's).
    pub key: Option<&'a str>,
    pub reason: FallbackReason,
    /// Said to the caller if the realtime call cannot be made.
    pub context: &'a str,
}

/// What the chain did with a window's unfinished requests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChainTally {
    pub resubmitted: u64,
    pub realtime: u64,
    pub failed: u64,
    /// Some requests are being answered realtime by another task (the
    /// deadline worker): the chain stopped short of `error`, and the window
    /// must stay unfinished so a later pass completes it.
    pub unsettled: bool,
}

/// The error code and message a job's end gives its unfinished requests:
/// the provider's own errors when it gave any.
pub fn job_failure(job: &JobView) -> (String, String) {
    let phase = job.phase.as_str();
    let message = if job.errors.is_empty() {
        format!(
            "the batch job {} ended {phase} ({})",
            job.id, job.raw_status
        )
    } else {
        format!(
            "the batch job {} ended {phase}: {}",
            job.id,
            job.errors.join("; ")
        )
    };
    (format!("batch_{phase}"), message)
}

/// Runs the failure chain over the still open requests of `window`, whose
/// job `job` ended badly. `key` is the key of the window's batch calls.
pub async fn settle_unfinished(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: Option<&str>,
    window: &WindowRecord,
    job: &JobView,
) -> Result<ChainTally, StoreError> {
    let policy = deferral
        .config
        .batching
        .policy_for(&window.key.model, upstream.config.dialect);
    let reason = FallbackReason::of(job.phase);
    let (code, message) = job_failure(job);
    let mut tally = ChainTally::default();

    if policy.on_batch_failure == FailurePolicy::Resubmit && policy.resubmit_limit > 0 {
        let moved = deferral
            .store
            .resubmit(&window.id, policy.resubmit_limit, now_ms())
            .await?;
        if !moved.is_empty() {
            tally.resubmitted = moved.len() as u64;
            deferral
                .metrics
                .resubmissions
                .with_label_values(&[reason.as_str()])
                .inc_by(tally.resubmitted);
            tracing::info!(window = %window.id, job = %job.id, requests = moved.len(), "resubmitting the unfinished requests of a batch job");
            deferral.flush_wake.notify_one();
        }
    }

    if policy.on_batch_failure.allows_realtime() {
        let open = deferral.store.open_request_ids(&window.id).await?;
        let context = format!("{message}; the realtime fallback failed too");
        for chunk in open.chunks(CONCURRENCY) {
            let calls: Vec<_> = chunk
                .iter()
                .map(|id| {
                    realtime(
                        deferral,
                        Candidate {
                            id,
                            upstream,
                            endpoint: &window.key.endpoint,
                            model: &window.key.model,
                            key,
                            reason,
                            context: &context,
                        },
                    )
                })
                .collect();
            for result in join_all(calls).await {
                if result? {
                    tally.realtime += 1;
                }
            }
        }
    }

    // A request another task is answering realtime right now must not be
    // failed under it: leave the window to the next pass.
    let open = deferral.store.open_request_ids(&window.id).await?;
    if open.iter().any(|id| deferral.fallbacks.contains(id)) {
        tally.unsettled = true;
        return Ok(tally);
    }
    let failed = deferral
        .store
        .fail_unresolved(&window.id, &code, &message, now_ms())
        .await?;
    tally.failed = failed.len() as u64;
    deferral.waiters.wake(&failed);
    Ok(tally)
}

/// Answers one open request by a realtime call and stores the answer
/// (`served_by = realtime`) if the request is still open; returns whether
/// it was stored. The upstream's own answer is stored whatever its status
/// (what the synchronous call would have returned); a call that cannot be
/// made at all stores a 502 failure saying `context` and why.
///
/// Replicas sharing the store send it one at a time: the call is made under
/// the request's lease ([`crate::deferral::lease`]); false when another
/// process holds it, or took it over midway.
pub async fn realtime(deferral: &Deferral, c: Candidate<'_>) -> Result<bool, StoreError> {
    let Some(_guard) = FallbackGuard::try_take(deferral, c.id) else {
        // Another task of this process is answering it right now.
        return Ok(false);
    };
    match leased(deferral, Lease::Request(c.id.clone()), answer(deferral, &c)).await {
        Ok(stored) => Ok(stored.unwrap_or(false)),
        Err(RealtimeError::Store(err)) => Err(err),
        Err(RealtimeError::Lost(lost)) => {
            tracing::warn!(request = %c.id, error = %lost, "realtime fallback stopped: another process answers it");
            Ok(false)
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RealtimeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lost(#[from] LeaseLost),
}

/// [`realtime`]'s work, under the lease.
async fn answer(deferral: &Deferral, c: &Candidate<'_>) -> Result<bool, RealtimeError> {
    // Answered meanwhile (by its batch, or a fallback that just finished).
    if !deferral.store.is_open(c.id).await? {
        return Ok(false);
    }
    let Some(body) = deferral.store.request_body(c.id).await? else {
        return Ok(false);
    };
    deferral
        .metrics
        .fallbacks
        .with_label_values(&[c.reason.as_str()])
        .inc();
    let caller = Caller {
        credential_hash: String::new(),
        client_name: None,
        upstream_key: c.key.map(Secret::new),
    };
    // What a pass-through would have sent; the scoping headers are among
    // them (stored with every end-to-end header at intake).
    let headers = headers::from_pairs(&deferral.store.request_headers(c.id).await?);
    let called = call(deferral, c, &caller, &headers, realtime_body(body)).await;
    let now = now_ms();
    let resolution = match called {
        Ok((status, body)) => {
            let ok = (200..300).contains(&status);
            Resolution {
                id: c.id.clone(),
                status: if ok {
                    ResolvedStatus::Succeeded
                } else {
                    ResolvedStatus::Failed
                },
                served_by: Some(ServedBy::Realtime),
                response_status: Some(status),
                error_code: (!ok).then(|| format!("upstream_{status}")),
                error_message: (!ok).then(|| upstream_message(&body)),
                response_body: Some(body),
                completed_at: now,
            }
        }
        Err(reason) => Resolution {
            id: c.id.clone(),
            status: ResolvedStatus::Failed,
            served_by: None,
            response_status: None,
            response_body: None,
            error_code: Some("realtime_failed".to_owned()),
            error_message: Some(format!("{}: {reason}", c.context)),
            completed_at: now,
        },
    };
    let status = resolution.status;
    let usage = resolution
        .response_body
        .as_deref()
        .and_then(TokenUsage::from_body);
    let stored = deferral.store.resolve_one(resolution).await?;
    if stored {
        deferral
            .metrics
            .record_result(c.model, status, ServedBy::Realtime, usage, None);
        deferral.waiters.wake(std::slice::from_ref(c.id));
        tracing::info!(request = %c.id, reason = c.reason.as_str(), "answered by a realtime call");
    }
    Ok(stored)
}

/// One realtime call with its retries: the status and body, or why there is
/// none.
async fn call(
    deferral: &Deferral,
    c: &Candidate<'_>,
    caller: &Caller,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(u16, Bytes), String> {
    let pacing = RetryPolicy {
        max_attempts: ATTEMPTS,
        base_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(5),
        observer: None,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sent = deferral
            .forwarder
            .forward_json(
                &c.upstream.config,
                caller,
                c.endpoint,
                headers,
                body.clone(),
                "fallback",
            )
            .await;
        let retry_after;
        match sent {
            Ok(relayed) => {
                let status = relayed.response.status();
                retry_after = relayed
                    .response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    // Capped: a caller whose deadline came is answered in seconds.
                    .map(|s| Duration::from_secs_f64(s.min(pacing.max_delay.as_secs_f64())));
                let retryable = status.as_u16() == 429 || status.is_server_error();
                if !retryable || attempt >= ATTEMPTS {
                    let bytes = axum::body::to_bytes(relayed.response.into_body(), MAX_ANSWER)
                        .await
                        .map_err(|e| format!("the realtime answer could not be read: {e}"))?;
                    return Ok((status.as_u16(), bytes));
                }
                tracing::warn!(request = %c.id, status = status.as_u16(), attempt, "realtime fallback refused; retrying");
            }
            Err(err) => {
                if attempt >= ATTEMPTS {
                    return Err(err.to_string());
                }
                retry_after = None;
                tracing::warn!(request = %c.id, error = %err, attempt, "realtime fallback failed; retrying");
            }
        }
        deferral
            .metrics
            .upstream_retries
            .with_label_values(&["fallback", "realtime"])
            .inc();
        tokio::time::sleep(pacing.delay(attempt - 1, retry_after)).await;
    }
}

/// The caller's body without `stream` / `stream_options`; untouched when it
/// has neither (or is not an object).
fn realtime_body(body: Bytes) -> Bytes {
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice(&body) else {
        return body;
    };
    let before = map.len();
    for k in STRIPPED_KEYS {
        map.remove(*k);
    }
    if map.len() == before {
        return body;
    }
    serde_json::to_vec(&map).map(Bytes::from).unwrap_or(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_body_drops_stream_keys_only() {
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"n":1}"#,
        );
        let v: serde_json::Value = serde_json::from_slice(&realtime_body(body)).unwrap();
        assert_eq!(v, serde_json::json!({"model": "m", "n": 1}));
        let plain = Bytes::from_static(br#"{"model": "m"}"#);
        assert_eq!(realtime_body(plain.clone()), plain);
    }

    #[test]
    fn job_failure_carries_the_providers_errors() {
        let job = JobView {
            id: "job-1".into(),
            phase: JobPhase::Failed,
            raw_status: "failed".into(),
            output_file: None,
            error_file: None,
            errors: vec!["line 1: model not found".into()],
            named_lines: Vec::new(),
            total: 1,
            succeeded: 0,
            failed: 0,
            window: None,
            created_at: 0,
        };
        let (code, message) = job_failure(&job);
        assert_eq!(code, "batch_failed");
        assert!(message.contains("line 1: model not found"), "{message}");
    }
}
