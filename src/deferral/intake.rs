//! Intake: a deferrable call becomes a stored request, then is answered in
//! the mode its caller chose. The request is committed to the store before
//! anything is acknowledged (the 202, or the first byte of a held answer).

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::answer::{
    accepted_response, carpool_headers, final_response, final_status_and_body, wait_final,
};
use super::backpressure::GateError;
use super::engine::{now_ms, Deferral};
use super::optin::{self, Answer};
use super::{sse, sse_anthropic, sse_responses};
use crate::config::{AuthMode, UpstreamConfig};
use crate::model::{prefixed_hex, Dialect, RequestId, Scope};
use crate::proxy::classify::CALLBACK_HEADER;
use crate::proxy::headers;
use crate::server::auth::{caller_key, Caller};
use crate::server::error::ApiError;
use crate::store::{Accepted, DeliveryMode, NewRequest, RequestRecord, StoreError, WindowLimits};
use crate::webhooks::target;

/// SSE comment cadence while a streamed wait-mode call is held.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::IdempotencyConflict => ApiError::Unprocessable {
                message: "this Idempotency-Key was already used with a different request body \
                          (or different OpenAI-Organization / OpenAI-Project headers)"
                    .to_owned(),
                code: "idempotency_key_reused",
            },
            other => ApiError::Internal {
                reason: other.to_string(),
            },
        }
    }
}

/// A deferrable call, already authenticated, routed and parsed.
pub struct Deferred<'a> {
    pub caller: &'a Caller,
    pub upstream: &'a UpstreamConfig,
    /// The endpoint as the provider names it, e.g. `/v1/chat/completions`.
    pub endpoint: &'a str,
    pub model: String,
    pub stream: bool,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub answer: Answer,
}

/// The request's fingerprint for retry detection and idempotent repeats:
/// endpoint, scope and exact body. The scope is part of what the request
/// is (the same body under another project is billed elsewhere), so an
/// Idempotency-Key reused under another scope is a conflict and an SDK
/// retry re-attaches only within its own scope; re-attaching stays keyed by
/// credential and endpoint. No scope hashes as before scopes existed.
pub fn body_hash(endpoint: &str, scope: &Scope, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(endpoint.as_bytes());
    h.update([0]);
    if !scope.is_empty() {
        h.update(scope.to_stored().as_bytes());
        h.update([0]);
    }
    h.update(body);
    prefixed_hex("", &h.finalize())
}

/// Stores the call, then answers it.
pub async fn defer(deferral: &Deferral, call: Deferred<'_>) -> Result<Intake, ApiError> {
    // Under passthrough the caller's key pays for the batch: without one that
    // parses, the window could never be submitted, so nothing is stored.
    if call.upstream.auth == AuthMode::Passthrough && caller_key(call.headers).is_none() {
        return Err(ApiError::Unauthorized);
    }
    if !call.upstream.dialect.batchable(call.endpoint) {
        return Err(ApiError::Unprocessable {
            message: format!(
                "{} cannot be deferred: the {} batch API does not accept it",
                call.endpoint,
                call.upstream.dialect.as_str()
            ),
            code: "not_batchable",
        });
    }
    super::refusals::check(call.endpoint, &call.body)?;
    let deadline = optin::deadline(call.headers, &call.answer, SystemTime::now())?;
    let idempotency_key = match call.headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "Idempotency-Key must be 1 to 255 characters of text",
                        "invalid_idempotency_key",
                    )
                })?
                .to_owned(),
        ),
    };
    let policy = deferral
        .config
        .batching
        .policy_for(&call.model, call.upstream.dialect);
    let callback_url = callback(deferral, call.headers)?;
    let mode = match (&callback_url, &call.answer) {
        (Some(_), _) => DeliveryMode::Callback,
        (None, Answer::Wait) => DeliveryMode::Wait,
        (None, _) => DeliveryMode::Async,
    };
    let upstream_key = window_key(&call);
    let scope = scope(call.upstream.dialect, call.headers)?;
    let admission = deferral
        .gate
        .admit(
            &deferral.store,
            &call.caller.credential_hash,
            (
                call.upstream.name.clone(),
                call.endpoint.to_owned(),
                call.model.clone(),
            ),
        )
        .await
        .map_err(|err| refused(deferral, err))?;
    let accepted = deferral
        .store
        .accept(NewRequest {
            id: RequestId::generate(),
            credential_hash: call.caller.credential_hash.clone(),
            upstream: call.upstream.name.clone(),
            endpoint: call.endpoint.to_owned(),
            model: call.model.clone(),
            body_hash: body_hash(call.endpoint, &scope, &call.body),
            scope,
            forward_headers: headers::replayable(call.headers),
            body: call.body,
            idempotency_key,
            sdk_retry: optin::is_sdk_retry(call.headers),
            mode,
            deadline,
            callback_url,
            upstream_key,
            limits: WindowLimits {
                max_requests: policy.max_requests,
                max_bytes: policy.max_bytes,
            },
            now: now_ms(),
        })
        .await;
    let accepted = match accepted {
        Ok(a) if a.created => {
            deferral.gate.keep(admission);
            a
        }
        Ok(a) => {
            deferral.gate.release(admission);
            a
        }
        Err(err) => {
            deferral.gate.release(admission);
            return Err(err.into());
        }
    };
    // A window the store sealed on the way in (full) is counted here, once.
    let sealed = [
        accepted.sealed_previous.as_ref().map(|(_, reason)| *reason),
        accepted.window.as_ref().and_then(|w| w.sealed),
    ];
    for reason in sealed.into_iter().flatten() {
        deferral
            .metrics
            .flushes
            .with_label_values(&[reason.as_str()])
            .inc();
    }
    if accepted.created {
        if flusher_must_look(&accepted, deadline.is_some()) {
            deferral.flush_wake.notify_one();
        }
        if deadline.is_some() {
            deferral.deadline_wake.notify_one();
        }
    }
    deferral
        .metrics
        .deferred_accepted
        .with_label_values(&[
            mode.as_str(),
            if accepted.created {
                "new"
            } else {
                "reattached"
            },
        ])
        .inc();
    let record = accepted.record;
    let credential = call.caller.credential_hash.clone();

    Ok(match call.answer {
        Answer::Wait if call.stream => {
            Intake::Answered(held_stream(deferral.clone(), record, credential))
        }
        Answer::Wait | Answer::AsyncAfter(_) => Intake::Held(Box::new(Held {
            record,
            credential,
            answer: call.answer,
        })),
        Answer::Async { .. } => Intake::Answered(with_preference(
            accepted_response(&record, retry_after(deferral)),
            &call.answer,
        )),
    })
}

/// What intake leaves for the connection once the call is stored.
pub enum Intake {
    /// The answer, ready now: a 202 with a handle, or a held stream that
    /// replays its result when it comes.
    Answered(Response),
    /// A caller to hold until its request is final (or its `wait=N` is up).
    Held(Box<Held>),
}

/// A held caller: only what its answer needs. The connection waits on this
/// after the original request (headers, body, and the parser buffers they
/// point into) has been dropped, so each of many thousands of held callers
/// costs as little memory as the connection itself.
pub struct Held {
    record: RequestRecord,
    credential: String,
    answer: Answer,
}

impl Held {
    /// The upstream the request was routed to (the response's metric label).
    pub fn upstream(&self) -> &str {
        &self.record.upstream
    }

    /// Waits for the request, then answers like the synchronous call would
    /// (`Wait`), or with the result or a 202 when `wait=N` is up (`AsyncAfter`).
    pub async fn answer(self, deferral: &Deferral) -> Result<Response, ApiError> {
        let Held {
            record,
            credential,
            answer,
        } = self;
        let limit = match answer {
            Answer::AsyncAfter(limit) => Some(limit),
            _ => None,
        };
        let now = wait_final(deferral, &record.id, &credential, limit)
            .await?
            .unwrap_or(record);
        let response = match answer {
            Answer::AsyncAfter(_) if !now.status.is_final() => {
                accepted_response(&now, retry_after(deferral))
            }
            Answer::AsyncAfter(_) => {
                observe_answer(deferral, "prefer_wait", &now);
                final_response(&now)
            }
            _ => {
                observe_answer(deferral, "wait", &now);
                final_response(&now)
            }
        };
        Ok(with_preference(response, &answer))
    }
}

/// Records accept-to-answer time for an answer given on a held connection.
fn observe_answer(deferral: &Deferral, mode: &str, record: &RequestRecord) {
    if let Some(done) = record.completed_at {
        let secs = (done - record.created_at).max(0) as f64 / 1000.0;
        deferral
            .metrics
            .deferred_answer
            .with_label_values(&[mode])
            .observe(secs);
    }
}

/// The `Carpool-Callback` URL, checked before anything is stored: http or
/// https only, and not a host the SSRF guard can refuse without DNS (an IP
/// literal or `localhost` that is not allow-listed). Host names are judged
/// again, resolved, at each delivery.
fn callback(deferral: &Deferral, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(CALLBACK_HEADER) else {
        return Ok(None);
    };
    let invalid = |message: String| ApiError::BadRequest {
        message,
        param: Some("Carpool-Callback".to_owned()),
        code: "invalid_callback",
    };
    let raw = value
        .to_str()
        .map_err(|_| invalid("Carpool-Callback is not valid text".to_owned()))?;
    let webhooks = &deferral.config.webhooks;
    if webhooks.secrets.is_empty() {
        return Err(ApiError::Unprocessable {
            message: "this carpool has no webhook signing secret configured, so it cannot deliver a Carpool-Callback".to_owned(),
            code: "callbacks_not_configured",
        });
    }
    let url =
        target::check_at_intake(raw, &webhooks.allow_hosts).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(url.into()))
}

/// The caller's scoping headers for the upstream's dialect (SPEC section
/// 2). They go on every batch call as they came, so they must be text.
fn scope(dialect: Dialect, headers: &HeaderMap) -> Result<Scope, ApiError> {
    let mut pairs = Vec::new();
    for name in dialect.scoping_headers() {
        for value in headers.get_all(*name) {
            let text = value.to_str().map_err(|_| ApiError::BadRequest {
                message: format!("the {name} header must be printable ASCII text"),
                param: Some((*name).to_owned()),
                code: "invalid_header",
            })?;
            pairs.push(((*name).to_owned(), text.to_owned()));
        }
    }
    Ok(Scope::new(pairs))
}

/// The key the window's batch calls need from this caller: under
/// passthrough auth the caller's own bearer key (kept on the window until it
/// finishes, never on the request); under managed auth none, since carpool's
/// key is in the config.
fn window_key(call: &Deferred<'_>) -> Option<String> {
    match call.upstream.auth {
        AuthMode::Passthrough => caller_key(call.headers).map(str::to_owned),
        AuthMode::Managed => None,
    }
}

/// A call past an intake ceiling: 429 with `Retry-After`, nothing stored.
fn refused(deferral: &Deferral, err: GateError) -> ApiError {
    match err {
        GateError::Full(scope) => {
            deferral
                .metrics
                .intake_refused
                .with_label_values(&[scope.as_str()])
                .inc();
            ApiError::TooManyRequests {
                retry_after: retry_after(deferral).min(Duration::from_secs(60)),
                code: scope.key(),
            }
        }
        GateError::Store(err) => err.into(),
    }
}

/// Whether a stored request changed anything the flusher schedules by: a
/// window opened (its `max_wait` starts), a window sealed (it is to be
/// submitted), or a deadline that may now be the window's earliest. A
/// request that only joins an open window changes none of them, and waking
/// the flusher for it would cost two store reads per accepted call.
fn flusher_must_look(accepted: &Accepted, has_deadline: bool) -> bool {
    has_deadline
        || accepted.sealed_previous.is_some()
        || accepted
            .window
            .as_ref()
            .map_or(true, |w| w.count <= 1 || w.sealed.is_some())
}

fn retry_after(deferral: &Deferral) -> Duration {
    deferral
        .config
        .batching
        .poll_interval
        .max(Duration::from_secs(1))
}

fn with_preference(mut response: Response, answer: &Answer) -> Response {
    if let Some(applied) = optin::preference_applied(answer) {
        if let Ok(v) = HeaderValue::from_str(&applied) {
            response.headers_mut().insert("preference-applied", v);
        }
        response
            .headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Prefer"));
    }
    response
}

/// A streamed wait-mode call: SSE at once, keep-alive comments while the
/// request waits, then the result replayed as chunk events.
fn held_stream(deferral: Deferral, record: RequestRecord, credential: String) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let id = record.id.clone();
    let keep_alive = if record.endpoint == "/v1/messages" {
        sse_anthropic::KEEP_ALIVE
    } else {
        sse::KEEP_ALIVE
    };
    deferral.clone().spawn(async move {
        if tx.send(Bytes::from_static(keep_alive)).await.is_err() {
            return;
        }
        let done = loop {
            tokio::select! {
                result = wait_final(&deferral, &id, &credential, Some(KEEP_ALIVE_EVERY)) => match result {
                    Ok(Some(r)) if r.status.is_final() => break r,
                    Ok(Some(_)) => {
                        if tx.send(Bytes::from_static(keep_alive)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(err) => {
                        tracing::error!(request = %id, error = %err, "store read failed while holding a stream");
                        return;
                    }
                },
                _ = tx.closed() => return,
            }
        };
        let (status, body) = final_status_and_body(&done);
        let events = if done.endpoint == "/v1/responses" {
            sse_responses::replay(status.as_u16(), &body)
        } else if done.endpoint == "/v1/messages" {
            sse_anthropic::replay(status.as_u16(), &body)
        } else {
            sse::replay(status.as_u16(), &body)
        };
        for event in events {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<Bytes, Infallible>(chunk), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    carpool_headers(&record, headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WindowId;
    use crate::store::{FlushReason, WindowSlot};

    #[test]
    fn body_hash_depends_on_endpoint_scope_and_exact_bytes() {
        let none = Scope::default();
        let a = body_hash("/v1/chat/completions", &none, b"{\"model\":\"m\"}");
        assert_eq!(
            a,
            body_hash("/v1/chat/completions", &none, b"{\"model\":\"m\"}")
        );
        assert_ne!(a, body_hash("/v1/embeddings", &none, b"{\"model\":\"m\"}"));
        assert_ne!(
            a,
            body_hash("/v1/chat/completions", &none, b"{\"model\": \"m\"}")
        );
        let project = Scope::new([("openai-project".to_owned(), "proj_A".to_owned())]);
        assert_ne!(
            a,
            body_hash("/v1/chat/completions", &project, b"{\"model\":\"m\"}")
        );
    }

    fn accepted(count: u64, sealed: bool, sealed_previous: bool) -> Accepted {
        let record = crate::deferral::answer::tests::record();
        let window = record.window_id.clone().unwrap_or_else(WindowId::generate);
        Accepted {
            record,
            created: true,
            window: Some(WindowSlot {
                id: window.clone(),
                count,
                bytes: 10,
                opened_at: 0,
                sealed: sealed.then_some(FlushReason::MaxRequests),
            }),
            sealed_previous: sealed_previous.then_some((window, FlushReason::MaxBytes)),
        }
    }

    #[test]
    fn the_flusher_is_woken_only_when_its_schedule_may_change() {
        // Joining an open window: nothing for the flusher to do.
        assert!(!flusher_must_look(&accepted(5, false, false), false));
        // A new window, a full one, the previous one sealed, a deadline.
        assert!(flusher_must_look(&accepted(1, false, false), false));
        assert!(flusher_must_look(&accepted(5, true, false), false));
        assert!(flusher_must_look(&accepted(1, false, true), false));
        assert!(flusher_must_look(&accepted(5, false, false), true));
    }
}
