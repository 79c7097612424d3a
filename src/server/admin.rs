//! The operator's API under `/admin/`, behind `server.admin_token`: open
//! windows, flushing one (or all), the batch jobs in flight, and webhook
//! dead letters (list, replay one or all), request counts by status, and
//! the operator's page at `GET /admin/` ([`console`]). Every
//! route refuses a missing or wrong token with 401; without a configured
//! token the whole API is refused.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use super::auth::bearer;
use super::error::ApiQuery;
use super::ApiError;
use crate::app::AppState;
use crate::config::redact_url;
use crate::deferral::engine::now_ms;
use crate::deferral::{flusher, policy};
use crate::model::{DeliveryId, RequestStatus, WindowId};
use crate::store::{secs, DeliveryRecord, FlushReason, WindowState};

/// Checks the admin token in constant time.
pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = state.config.server.admin_token.as_ref();
    match (token, bearer(headers)) {
        (Some(token), Some(presented)) if token.matches(presented) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// `GET /admin/windows`: open windows with model, dialect, count, bytes
/// and age, the limits that seal them (`max_requests` and `max_bytes` at
/// intake, `max_wait` by age), and the forecast `flush`: which time
/// threshold seals the window if no request fills it first, and when.
pub async fn windows(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let now = now_ms();
    let deferral = &state.deferral;
    let windows = deferral.store.open_windows().await?;
    let data: Vec<Value> = windows
        .iter()
        .map(|w| {
            // A window whose upstream left the config has no policy: the
            // flusher's next pass seals it.
            let (dialect, max_wait, flush) = match deferral.upstream(&w.key.upstream) {
                Some(upstream) => {
                    let (policy, age, turnaround) = flusher::timing(deferral, w, upstream, now);
                    let (reason, after) = policy::next_flush(age, policy.max_wait, turnaround);
                    (
                        Some(upstream.config.dialect.as_str()),
                        Some(policy.max_wait.as_secs_f64()),
                        json!({"reason": reason.as_str(), "in_seconds": after.as_secs_f64()}),
                    )
                }
                None => (None, None, json!({"reason": "operator", "in_seconds": 0.0})),
            };
            json!({
                "id": w.id.as_str(),
                "upstream": w.key.upstream,
                "dialect": dialect,
                "endpoint": w.key.endpoint,
                "model": w.key.model,
                "requests": w.count,
                "bytes": w.bytes,
                "opened_at": secs(w.opened_at),
                "age_seconds": (now - w.opened_at).max(0) as f64 / 1000.0,
                "earliest_deadline": w.earliest_deadline.map(secs),
                "max_requests": w.limits.max_requests,
                "max_bytes": w.limits.max_bytes,
                "max_wait_seconds": max_wait,
                "flush": flush,
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `GET /admin/requests`: how many stored requests are in each status
/// (every status listed, zero when none), and their total.
pub async fn request_counts(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let counts = state.deferral.store.request_counts().await?;
    let mut by_status = serde_json::Map::new();
    for status in RequestStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        by_status.insert(status.as_str().to_owned(), json!(n));
    }
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    Ok(Json(json!({
        "object": "carpool.request_counts",
        "by_status": by_status,
        "total": total,
    })))
}

/// `POST /admin/windows/{id}/flush`: seals one open window now.
pub async fn flush_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let not_found = || ApiError::NotFound {
        what: format!("open window {id}"),
    };
    let window = WindowId::parse(&id).ok_or_else(not_found)?;
    let deferral = &state.deferral;
    if !deferral
        .store
        .seal_window(&window, FlushReason::Operator, now_ms())
        .await?
    {
        return Err(not_found());
    }
    deferral
        .metrics
        .flushes
        .with_label_values(&[FlushReason::Operator.as_str()])
        .inc();
    deferral.flush_wake.notify_one();
    tracing::info!(window = %window, "window flushed by an operator");
    Ok(Json(json!({ "id": window.as_str(), "flushed": true })))
}

/// `POST /admin/flush`: seals every open window now.
pub async fn flush_all(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let sealed = flusher::seal_all(&state.deferral, FlushReason::Operator).await?;
    tracing::info!(windows = sealed, "all open windows flushed by an operator");
    Ok(Json(json!({ "flushed": sealed })))
}

/// `GET /admin/jobs`: windows past open and not yet finished: being
/// uploaded, created, or running at the provider, with its last status.
pub async fn jobs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let states = [
        WindowState::Sealed,
        WindowState::Uploaded,
        WindowState::Creating,
        WindowState::Submitted,
    ];
    let windows = state.deferral.store.windows_in(&states).await?;
    let data: Vec<Value> = windows
        .iter()
        .map(|w| {
            json!({
                "window": w.id.as_str(),
                "state": w.state.as_str(),
                "upstream": w.key.upstream,
                "endpoint": w.key.endpoint,
                "model": w.key.model,
                "requests": w.count,
                "bytes": w.bytes,
                "flush_reason": w.flush_reason.map(|r| r.as_str()),
                "input_file_id": w.file_id,
                "job_id": w.job_id,
                "provider_status": w.provider_status,
                "sealed_at": w.sealed_at.map(secs),
                "submitted_at": w.submitted_at.map(secs),
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

// ---- webhook dead letters ----------------------------------------------------

#[derive(Debug, Default, serde::Deserialize)]
pub struct DeadLetterQuery {
    pub limit: Option<u32>,
}

/// A dead letter as the operator sees it: the callback URL with its query
/// values masked (receivers often put a token there; the operator needs
/// the host, path and parameter names to find the receiver, not it).
fn dead_letter(d: &DeliveryRecord) -> Value {
    json!({
        "id": d.id.as_str(),
        "object": "carpool.dead_letter",
        "request_id": d.request_id.as_str(),
        "url": redact_url(&d.url),
        "type": d.event,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "reason": d.last_error,
        "created_at": secs(d.created_at),
        "dead_at": d.finished_at.map(secs),
    })
}

/// `GET /admin/dead-letters?limit=N`: deliveries given up on, most recent
/// first (default 100, at most 1000).
pub async fn dead_letters(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let dead = state.webhooks.store.dead_letters(limit).await?;
    let data: Vec<Value> = dead.iter().map(dead_letter).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `POST /admin/dead-letters/{id}/replay`: delivers a dead letter again,
/// with a fresh attempt count and the same `webhook-id`.
pub async fn replay_dead_letter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let not_found = || ApiError::NotFound {
        what: format!("dead letter {id}"),
    };
    let delivery = DeliveryId::parse(&id).ok_or_else(not_found)?;
    if !state
        .webhooks
        .store
        .replay_dead_letter(&delivery, now_ms())
        .await?
    {
        return Err(not_found());
    }
    state.webhooks.wake();
    tracing::info!(delivery = %delivery, "dead letter replayed by an operator");
    Ok(Json(json!({ "id": delivery.as_str(), "replayed": true })))
}

/// `POST /admin/dead-letters/replay`: every dead letter delivered again.
pub async fn replay_dead_letters(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let n = state.webhooks.store.replay_dead_letters(now_ms()).await?;
    state.webhooks.wake();
    tracing::info!(deliveries = n, "all dead letters replayed by an operator");
    Ok(Json(json!({ "replayed": n })))
}
