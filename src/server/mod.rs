//! The HTTP edge: the router, thin handlers, request observation (id, log
//! line, request metrics), caller authentication and the one error → HTTP
//! mapping. Handlers extract, delegate and render; decisions live in
//! `crate::proxy` (and later `crate::deferral`).
//!
//! Routes carpool serves itself: `GET /healthz`, `GET /readyz`,
//! `GET /metrics`, the request handles under `/v1/carpool/requests`, and
//! the operator's API under `/admin/` ([`admin`]) and its page at `GET /admin/`
//! ([`console`]). Everything else falls through to the pass-through proxy,
//! which authenticates per upstream (see [`auth`]).

mod admin;
pub mod auth;
mod console;
pub mod error;
pub mod listen;
pub mod observe;
mod ops;
mod requests;
mod savings;

use axum::routing::{get, post};
use axum::{middleware, Router};

pub use auth::Caller;
pub use error::{ApiError, Blame};

use std::sync::Arc;

use crate::app::AppState;

/// Handlers share one `AppState` behind an `Arc`: extracting it per call is
/// one reference count, not one per field.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/carpool/requests", get(requests::list))
        .route(
            "/v1/carpool/requests/{id}",
            get(requests::get).delete(requests::cancel),
        )
        .route("/v1/carpool/requests/{id}/result", get(requests::result))
        .route("/admin", get(console::redirect))
        .route("/admin/", get(console::page))
        .route("/admin/windows", get(admin::windows))
        .route("/admin/windows/{id}/flush", post(admin::flush_one))
        .route("/admin/flush", post(admin::flush_all))
        .route("/admin/jobs", get(admin::jobs))
        .route("/admin/savings", get(savings::savings))
        .route("/admin/requests", get(admin::request_counts))
        .route("/admin/dead-letters", get(admin::dead_letters))
        .route(
            "/admin/dead-letters/replay",
            post(admin::replay_dead_letters),
        )
        .route(
            "/admin/dead-letters/{id}/replay",
            post(admin::replay_dead_letter),
        )
        // Deferrable calls reach the deferral through `proxy::classify` in
        // the fallback.
        .fallback(passthrough)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

async fn passthrough(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    crate::proxy::handle(state, request).await
}
