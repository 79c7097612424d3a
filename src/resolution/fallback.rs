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
use crate::pricing::{Charge, TokenUsage};
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
    let Some(record) = deferral.store.request_by_id(c.id).await? else {
        return Ok(false);
    };
    if record.status.is_final() {
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
    let body = realtime_body(body);
    let called = match flex(deferral, c, &caller, &headers, &body, record.deadline).await {
        Some(answer) => Ok(answer),
        None => call(deferral, c, &caller, &headers, body).await,
    };
    let now = now_ms();
    let resolution = match called {
        Ok((status, body)) => {
            let ok = (200..300).contains(&status);
            let served_by = tier_of(&body);
            let price = deferral
                .config
                .prices
                .for_call(&c.upstream.config.name, c.model);
            Resolution {
                id: c.id.clone(),
                status: if ok {
                    ResolvedStatus::Succeeded
                } else {
                    ResolvedStatus::Failed
                },
                served_by: Some(served_by),
                response_status: Some(status),
                error_code: (!ok).then(|| format!("upstream_{status}")),
                error_message: (!ok).then(|| upstream_message(&body)),
                charge: TokenUsage::from_body(&body).map(|u| Charge::of(u, price, served_by)),
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
            charge: None,
        },
    };
    let status = resolution.status;
    let served_by = resolution.served_by.unwrap_or(ServedBy::Realtime);
    let charge = resolution.charge;
    let stored = deferral.store.resolve_one(resolution).await?;
    if stored {
        deferral
            .metrics
            .record_result(c.model, status, served_by, charge.as_ref());
        deferral.waiters.wake(std::slice::from_ref(c.id));
        tracing::info!(request = %c.id, reason = c.reason.as_str(), served_by = served_by.as_str(), "answered by a realtime call");
    }
    Ok(stored)
}

/// The tier that served an answer, as the answer says (`service_tier`):
/// flex only when the provider says so, never assumed from what was asked.
fn tier_of(body: &[u8]) -> ServedBy {
    #[derive(serde::Deserialize)]
    struct Tier<'a> {
        #[serde(borrow)]
        service_tier: Option<&'a str>,
    }
    match serde_json::from_slice::<Tier<'_>>(body) {
        Ok(Tier {
            service_tier: Some("flex"),
        }) => ServedBy::Flex,
        _ => ServedBy::Realtime,
    }
}

/// The shortest flex attempt worth making.
const MIN_FLEX: Duration = Duration::from_secs(1);

/// How long a flex call may take: `flex_timeout`, but never more than half
/// of what is left before the deadline, so that a standard call still fits
/// after a flex call that was refused or too slow. `None`: no time for
/// both.
pub fn flex_budget(
    flex_timeout: Duration,
    now_ms: i64,
    deadline_ms: Option<i64>,
) -> Option<Duration> {
    let budget = match deadline_ms {
        None => flex_timeout,
        Some(deadline) => {
            let left = u64::try_from(deadline.saturating_sub(now_ms)).unwrap_or(0);
            flex_timeout.min(Duration::from_millis(left / 2))
        }
    };
    (budget >= MIN_FLEX).then_some(budget)
}

/// One flex call for a request whose upstream sells flex for its model:
/// its 2xx answer, or `None` (not tried, refused, too slow, failed), after
/// which the standard call is made at once. Never retried: a refusal for
/// capacity (429, 503) or an unsupported model (400) will not clear in the
/// time a deadline leaves.
async fn flex(
    deferral: &Deferral,
    c: &Candidate<'_>,
    caller: &Caller,
    headers: &HeaderMap,
    body: &Bytes,
    deadline: Option<i64>,
) -> Option<(u16, Bytes)> {
    let upstream = &c.upstream.config;
    if !upstream.flex_for(c.model) {
        return None;
    }
    let budget = flex_budget(upstream.flex_timeout, now_ms(), deadline)?;
    // A caller that named its own tier keeps it.
    let flex_body = with_flex_tier(body)?;
    let sent = tokio::time::timeout(budget, async {
        let relayed = deferral
            .forwarder
            .forward_json(upstream, caller, c.endpoint, headers, flex_body, "flex")
            .await
            .map_err(|e| e.to_string())?;
        let status = relayed.response.status().as_u16();
        let bytes = axum::body::to_bytes(relayed.response.into_body(), MAX_ANSWER)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((status, bytes))
    })
    .await;
    let (outcome, answer) = match sent {
        Ok(Ok((status, bytes))) if (200..300).contains(&status) => {
            ("served", Some((status, bytes)))
        }
        Ok(Ok((status, _))) => {
            tracing::info!(request = %c.id, status, "flex refused; calling the standard tier");
            ("refused", None)
        }
        Ok(Err(error)) => {
            tracing::warn!(request = %c.id, %error, "flex call failed; calling the standard tier");
            ("error", None)
        }
        Err(_) => {
            tracing::info!(request = %c.id, budget_ms = budget.as_millis() as u64, "flex too slow; calling the standard tier");
            ("timeout", None)
        }
    };
    deferral
        .metrics
        .flex_calls
        .with_label_values(&[outcome])
        .inc();
    answer
}

/// The body asking for the flex tier; `None` when the caller's body names
/// a `service_tier` of its own (or is not a JSON object).
fn with_flex_tier(body: &Bytes) -> Option<Bytes> {
    let serde_json::Value::Object(mut map) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    if map.contains_key("service_tier") {
        return None;
    }
    map.insert("service_tier".to_owned(), "flex".into());
    serde_json::to_vec(&map).ok().map(Bytes::from)
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
    fn flex_gets_half_of_what_the_deadline_leaves_and_never_less_than_a_second() {
        let fifteen = Duration::from_secs(900);
        assert_eq!(flex_budget(fifteen, 0, None), Some(fifteen));
        assert_eq!(
            flex_budget(fifteen, 0, Some(30_000)),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            flex_budget(Duration::from_secs(5), 0, Some(30_000)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(flex_budget(fifteen, 0, Some(1_500)), None);
        assert_eq!(flex_budget(fifteen, 10_000, Some(5_000)), None);
    }

    #[test]
    fn the_flex_tier_is_asked_only_when_the_caller_named_none() {
        let asked = with_flex_tier(&Bytes::from_static(br#"{"model":"m"}"#)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&asked).unwrap();
        assert_eq!(v, serde_json::json!({"model": "m", "service_tier": "flex"}));
        let own = Bytes::from_static(br#"{"model":"m","service_tier":"default"}"#);
        assert_eq!(with_flex_tier(&own), None);
        assert_eq!(with_flex_tier(&Bytes::from_static(b"[1]")), None);
    }

    #[test]
    fn the_served_tier_is_read_from_the_answer() {
        assert_eq!(
            tier_of(br#"{"service_tier":"flex","id":"x"}"#),
            ServedBy::Flex
        );
        assert_eq!(
            tier_of(br#"{"service_tier":"default"}"#),
            ServedBy::Realtime
        );
        assert_eq!(tier_of(br#"{"id":"x"}"#), ServedBy::Realtime);
        assert_eq!(tier_of(b"not json"), ServedBy::Realtime);
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
