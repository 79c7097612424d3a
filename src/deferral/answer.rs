//! Rendering deferred requests for callers: the request object of SPEC
//! section 1, a finished request as the synchronous call would have
//! answered, and the held wait for a result.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::engine::Deferral;
use crate::model::{RequestId, RequestStatus};
use crate::providers::lines::error_body;
use crate::store::{secs, RequestRecord, StoreError};

/// How often a held caller re-reads the store even without a wake-up (a
/// result stored by another replica wakes no one here).
const RECHECK: Duration = Duration::from_secs(15);

/// The `carpool.request` object.
pub fn request_object(r: &RequestRecord) -> Value {
    let response = match (r.response_status, &r.response_body) {
        (Some(status), Some(body)) => json!({ "status_code": status, "body": raw_json(body) }),
        _ => Value::Null,
    };
    let error = match (&r.error_code, &r.error_message) {
        (None, None) => Value::Null,
        (code, message) => json!({ "code": code, "message": message }),
    };
    json!({
        "id": r.id.as_str(),
        "object": "carpool.request",
        "status": r.status.as_str(),
        "endpoint": r.endpoint,
        "model": r.model,
        "created_at": secs(r.created_at),
        "submitted_at": r.submitted_at.map(secs),
        "completed_at": r.completed_at.map(secs),
        "batch_id": r.batch_id,
        "served_by": r.served_by.map(|s| s.as_str()),
        "response": response,
        "error": error,
    })
}

/// A stored body as JSON, or as a string when it is not JSON.
fn raw_json(body: &Bytes) -> Value {
    std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<Box<RawValue>>(text).ok())
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_else(|| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// `Carpool-Request-Id`, and once known `Carpool-Batch-Id` and `Carpool-Served-By`.
pub fn carpool_headers(r: &RequestRecord, headers: &mut HeaderMap) {
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    put("carpool-request-id", r.id.as_str());
    if let Some(batch) = &r.batch_id {
        put("carpool-batch-id", batch);
    }
    if let Some(served) = r.served_by {
        put("carpool-served-by", served.as_str());
    }
}

/// The status and body the caller gets for a finished request: the
/// upstream's own when there is one, else an OpenAI-style error.
pub fn final_status_and_body(r: &RequestRecord) -> (StatusCode, Bytes) {
    if let (Some(status), Some(body)) = (r.response_status, &r.response_body) {
        if let Ok(status) = StatusCode::from_u16(status) {
            return (status, body.clone());
        }
    }
    let message = r
        .error_message
        .clone()
        .unwrap_or_else(|| format!("request {}", r.status.as_str()));
    let code = r
        .error_code
        .clone()
        .unwrap_or_else(|| r.status.as_str().to_owned());
    match r.status {
        RequestStatus::Expired => (
            StatusCode::GATEWAY_TIMEOUT,
            error_body(&code, &message, "upstream_error"),
        ),
        RequestStatus::Cancelled => (
            StatusCode::CONFLICT,
            error_body(
                "cancelled",
                "the request was cancelled before it was answered",
                "invalid_request_error",
            ),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            error_body(&code, &message, "upstream_error"),
        ),
    }
}

/// A finished request answered as the synchronous call would have been.
pub fn final_response(r: &RequestRecord) -> Response {
    let (status, body) = final_status_and_body(r);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    carpool_headers(r, response.headers_mut());
    response
}

/// A JSON response carrying the request object.
pub fn object_response(status: StatusCode, r: &RequestRecord) -> Response {
    let mut response = Response::new(Body::from(request_object(r).to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    carpool_headers(r, response.headers_mut());
    response
}

/// 202 with `Location` and `Retry-After`: the request is still pending.
pub fn accepted_response(r: &RequestRecord, retry_after: Duration) -> Response {
    let mut response = object_response(StatusCode::ACCEPTED, r);
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/carpool/requests/{}", r.id)) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs().max(1)),
    );
    response
}

/// Waits until the request is final or `limit` passes; returns its record
/// either way (`None` only if it vanished, e.g. purged).
pub async fn wait_final(
    deferral: &Deferral,
    id: &RequestId,
    credential_hash: &str,
    limit: Option<Duration>,
) -> Result<Option<RequestRecord>, StoreError> {
    let waiter = deferral.waiters.register(id);
    let until = limit.map(|d| Instant::now() + d);
    loop {
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Boxed: a held caller spends its whole wait in this loop, and the
        // store read's future would otherwise be most of its frame.
        let Some(record) = Box::pin(deferral.store.get(id, credential_hash)).await? else {
            return Ok(None);
        };
        if record.status.is_final() {
            return Ok(Some(record));
        }
        let recheck = until.map_or(RECHECK, |u| {
            RECHECK.min(u.saturating_duration_since(Instant::now()))
        });
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(recheck) => {
                if until.is_some_and(|u| Instant::now() >= u) {
                    return Ok(Some(record));
                }
            }
        }
    }
}
