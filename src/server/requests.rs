//! Thin handlers for the request handle API: authenticate, extract, and
//! delegate to [`crate::deferral::handles`].

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::{ApiError, Caller};
use crate::app::AppState;
use crate::deferral::handles::{self, ListQuery};

/// Handles carry no model, so the first upstream's auth mode applies; the
/// handle is bound to the hash of the key presented either way.
fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    Caller::authenticate(headers, state.config.route(None), &state.config.clients)
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    handles::get(&state.deferral, &caller(&state, &headers)?, &id).await
}

pub async fn result(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    handles::result(&state.deferral, &caller(&state, &headers)?, &id).await
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    handles::cancel(&state.deferral, &caller(&state, &headers)?, &id).await
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    handles::list(&state.deferral, &caller(&state, &headers)?, query).await
}
