//! Rendering deferred requests for callers: the request object of SPEC
//! section 1, a finished request as the synchronous call would have
//! answered, and the held wait for a result.

use std::borrow::Cow;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::engine::Deferral;
use crate::model::{RequestId, RequestStatus};
use crate::providers::lines::error_body;
use crate::store::{secs, RequestRecord, StoreError};

/// How often a held caller re-reads the store even without a wake-up (a
/// result stored by another replica wakes no one here).
const RECHECK: Duration = Duration::from_secs(15);

/// The `carpool.request` object, borrowed from its record and serialized
/// straight to bytes: this is the body of every 202.
#[derive(Serialize)]
pub struct RequestObject<'a> {
    id: &'a str,
    object: &'static str,
    status: &'static str,
    endpoint: &'a str,
    model: &'a str,
    created_at: i64,
    submitted_at: Option<i64>,
    completed_at: Option<i64>,
    batch_id: Option<&'a str>,
    served_by: Option<&'static str>,
    response: Option<StoredResponse<'a>>,
    error: Option<StoredError<'a>>,
}

#[derive(Serialize)]
struct StoredResponse<'a> {
    status_code: u16,
    body: StoredBody<'a>,
}

#[derive(Serialize)]
struct StoredError<'a> {
    code: Option<&'a str>,
    message: Option<&'a str>,
}

/// A stored body: JSON as it is, anything else as a string.
#[derive(Serialize)]
#[serde(untagged)]
enum StoredBody<'a> {
    Json(&'a RawValue),
    Text(Cow<'a, str>),
}

impl<'a> StoredBody<'a> {
    fn of(body: &'a [u8]) -> Self {
        match std::str::from_utf8(body) {
            Ok(text) => match serde_json::from_str::<&RawValue>(text) {
                Ok(raw) => Self::Json(raw),
                Err(_) => Self::Text(Cow::Borrowed(text)),
            },
            Err(_) => Self::Text(String::from_utf8_lossy(body)),
        }
    }
}

/// The `carpool.request` object of `r`.
pub fn request_object(r: &RequestRecord) -> RequestObject<'_> {
    RequestObject {
        id: r.id.as_str(),
        object: "carpool.request",
        status: r.status.as_str(),
        endpoint: &r.endpoint,
        model: &r.model,
        created_at: secs(r.created_at),
        submitted_at: r.submitted_at.map(secs),
        completed_at: r.completed_at.map(secs),
        batch_id: r.batch_id.as_deref(),
        served_by: r.served_by.map(|s| s.as_str()),
        response: match (r.response_status, &r.response_body) {
            (Some(status_code), Some(body)) => Some(StoredResponse {
                status_code,
                body: StoredBody::of(body),
            }),
            _ => None,
        },
        error: match (&r.error_code, &r.error_message) {
            (None, None) => None,
            (code, message) => Some(StoredError {
                code: code.as_deref(),
                message: message.as_deref(),
            }),
        },
    }
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
    // Strings, numbers and validated raw JSON into a Vec: serde_json has no
    // way to fail here, so the empty object is never sent in practice.
    let body = serde_json::to_vec(&request_object(r)).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Body::from(body));
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
    // A limit too far to represent is no limit.
    let until = limit.and_then(|d| Instant::now().checked_add(d));
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

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::model::{ServedBy, WindowId};
    use crate::store::DeliveryMode;

    /// A queued request in a window of its own, for tests to adjust.
    pub(crate) fn record() -> RequestRecord {
        RequestRecord {
            id: RequestId::generate(),
            status: RequestStatus::Queued,
            upstream: "u".into(),
            endpoint: "/v1/chat/completions".into(),
            model: "m".into(),
            mode: DeliveryMode::Async,
            created_at: 1_700_000_000_999,
            submitted_at: None,
            completed_at: None,
            batch_id: None,
            served_by: None,
            response_status: None,
            response_body: None,
            error_code: None,
            error_message: None,
            deadline: None,
            callback_url: None,
            window_id: Some(WindowId::generate()),
        }
    }

    fn rendered(r: &RequestRecord) -> Value {
        serde_json::from_slice(&serde_json::to_vec(&request_object(r)).unwrap()).unwrap()
    }

    #[test]
    fn a_pending_request_has_null_response_and_error() {
        let r = record();
        assert_eq!(
            rendered(&r),
            json!({
                "id": r.id.as_str(), "object": "carpool.request", "status": "queued",
                "endpoint": "/v1/chat/completions", "model": "m", "created_at": 1_700_000_000,
                "submitted_at": null, "completed_at": null, "batch_id": null,
                "served_by": null, "response": null, "error": null,
            })
        );
    }

    #[test]
    fn a_stored_json_body_is_embedded_as_json_and_anything_else_as_text() {
        let mut r = record();
        r.status = RequestStatus::Succeeded;
        r.served_by = Some(ServedBy::Batch);
        r.batch_id = Some("job-1".into());
        r.response_status = Some(200);
        r.response_body = Some(Bytes::from_static(b"{\"id\": \"x\", \"n\": [1, 2]}"));
        let v = rendered(&r);
        assert_eq!(
            v["response"],
            json!({"status_code": 200, "body": {"id": "x", "n": [1, 2]}})
        );
        assert_eq!(v["served_by"], "batch");
        assert_eq!(v["batch_id"], "job-1");

        r.response_body = Some(Bytes::from_static(b"upstream said no"));
        assert_eq!(rendered(&r)["response"]["body"], "upstream said no");
        r.response_body = Some(Bytes::from_static(b"\xffbad"));
        assert_eq!(rendered(&r)["response"]["body"], "\u{fffd}bad");
    }

    #[test]
    fn an_error_carries_its_code_and_message() {
        let mut r = record();
        r.status = RequestStatus::Failed;
        r.error_code = Some("batch_failed".into());
        assert_eq!(
            rendered(&r)["error"],
            json!({"code": "batch_failed", "message": null})
        );
    }
}
