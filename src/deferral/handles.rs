//! The request handle API (SPEC section 1): read, fetch the result, cancel
//! and list a caller's own deferred requests. Bound to the credential that
//! made them: any other credential gets 404, never 403.

use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::answer::{accepted_response, final_response, object_response, request_object};
use super::engine::{now_ms, Deferral};
use crate::model::{RequestId, RequestStatus};
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::store::{CancelOutcome, RequestRecord};

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        what: format!("request {id}"),
    }
}

async fn find(deferral: &Deferral, caller: &Caller, id: &str) -> Result<RequestRecord, ApiError> {
    let parsed = RequestId::parse(id).ok_or_else(|| not_found(id))?;
    deferral
        .store
        .get(&parsed, &caller.credential_hash)
        .await?
        .ok_or_else(|| not_found(id))
}

/// `GET /v1/carpool/requests/{id}`
pub async fn get(deferral: &Deferral, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let record = find(deferral, caller, id).await?;
    Ok(object_response(StatusCode::OK, &record))
}

/// `GET /v1/carpool/requests/{id}/result`
pub async fn result(deferral: &Deferral, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let record = find(deferral, caller, id).await?;
    if record.status.is_final() {
        Ok(final_response(&record))
    } else {
        let retry = deferral
            .config
            .batching
            .poll_interval
            .max(std::time::Duration::from_secs(1));
        Ok(accepted_response(&record, retry))
    }
}

/// `DELETE /v1/carpool/requests/{id}`
pub async fn cancel(deferral: &Deferral, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let parsed = RequestId::parse(id).ok_or_else(|| not_found(id))?;
    match deferral
        .store
        .cancel(&parsed, &caller.credential_hash, now_ms())
        .await?
    {
        CancelOutcome::Cancelled(record) => {
            deferral.waiters.wake(std::slice::from_ref(&record.id));
            Ok(object_response(StatusCode::OK, &record))
        }
        CancelOutcome::AlreadyFinal(record) => Err(ApiError::Conflict {
            message: format!(
                "request {} is already {}",
                record.id,
                record.status.as_str()
            ),
        }),
        CancelOutcome::NotFound => Err(not_found(id)),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub status: Option<String>,
    pub limit: Option<u32>,
    pub after: Option<String>,
}

/// `GET /v1/carpool/requests?status=…&limit=…&after=…`, newest first.
pub async fn list(
    deferral: &Deferral,
    caller: &Caller,
    query: ListQuery,
) -> Result<Response, ApiError> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(RequestStatus::parse(s).ok_or_else(|| ApiError::BadRequest {
            message: format!("status must be one of queued, submitted, succeeded, failed, cancelled, expired, not {s:?}"),
            param: Some("status".to_owned()),
            code: "invalid_status",
        })?),
    };
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let after = match query.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(RequestId::parse(a).ok_or_else(|| ApiError::BadRequest {
            message: format!("after must be a request id, not {a:?}"),
            param: Some("after".to_owned()),
            code: "invalid_cursor",
        })?),
    };
    let mut records = deferral
        .store
        .list(&caller.credential_hash, status, limit + 1, after.as_ref())
        .await?;
    let has_more = records.len() > limit as usize;
    records.truncate(limit as usize);
    let data: Vec<_> = records.iter().map(request_object).collect();
    let body = json!({
        "object": "list",
        "data": data,
        "first_id": records.first().map(|r| r.id.as_str()),
        "last_id": records.last().map(|r| r.id.as_str()),
        "has_more": has_more,
    });
    let mut response = Response::new(axum::body::Body::from(body.to_string()));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
