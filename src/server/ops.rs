//! Operations endpoints: liveness, readiness, metrics. Open (no key), so
//! probes and Prometheus need no credentials; they reveal no secrets.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// 200 when every upstream answers; 503 while draining or when one does not.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    let report = state.readiness.check().await;
    let store = match state.deferral.store.ping().await {
        Ok(()) => json!({"ready": true}),
        Err(err) => json!({"ready": false, "error": err.to_string()}),
    };
    let store_ready = store["ready"] == true;
    let (status, word) = if report.ready() && store_ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unready")
    };
    (
        status,
        Json(json!({"status": word, "store": store, "upstreams": report.upstreams})),
    )
        .into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // The window gauges from the store as of this scrape, not the flusher's
    // last pass (which may be minutes old after an idle spell). A store
    // error leaves the last values in place rather than failing the scrape.
    match state.deferral.store.open_windows().await {
        Ok(open) => state
            .metrics
            .observe_open_windows(&open, crate::deferral::engine::now_ms()),
        Err(error) => tracing::warn!(%error, "window gauges not refreshed for this scrape"),
    }
    if let Err(error) = crate::deferral::quota::waiting(&state.deferral).await {
        tracing::warn!(%error, "quota gauge not refreshed for this scrape");
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
