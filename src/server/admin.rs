//! The operator's API under `/admin/`, behind `server.admin_token`: open
//! windows, flushing one (or all), and the batch jobs in flight. Every
//! route refuses a missing or wrong token with 401; without a configured
//! token the whole API is refused.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use super::auth::bearer;
use super::ApiError;
use crate::app::AppState;
use crate::deferral::engine::now_ms;
use crate::deferral::flusher;
use crate::model::WindowId;
use crate::store::{secs, FlushReason, WindowState};

/// Checks the admin token in constant time.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = state.config.server.admin_token.as_ref();
    match (token, bearer(headers)) {
        (Some(token), Some(presented)) if token.matches(presented) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// `GET /admin/windows`: open windows with model, count, bytes and age.
pub async fn windows(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let now = now_ms();
    let windows = state.deferral.store.open_windows().await?;
    let data: Vec<Value> = windows
        .iter()
        .map(|w| {
            json!({
                "id": w.id.as_str(),
                "upstream": w.key.upstream,
                "endpoint": w.key.endpoint,
                "model": w.key.model,
                "requests": w.count,
                "bytes": w.bytes,
                "opened_at": secs(w.opened_at),
                "age_seconds": (now - w.opened_at).max(0) as f64 / 1000.0,
                "earliest_deadline": w.earliest_deadline.map(secs),
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `POST /admin/windows/{id}/flush`: seals one open window now.
pub async fn flush_one(
    State(state): State<AppState>,
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
    State(state): State<AppState>,
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
    State(state): State<AppState>,
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
