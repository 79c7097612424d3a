//! Thin handlers for the request handle API: authenticate, extract, and
//! delegate to [`crate::deferral::handles`].

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::error::ApiQuery;
use super::{ApiError, Caller};
use crate::app::AppState;
use crate::deferral::handles::{self, ListQuery};

/// Handles carry no model: a caller any upstream accepts may ask, and sees
/// only what its own credential made, through whichever upstream.
fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    Caller::admissible(headers, &state.config.upstreams, &state.config.clients)
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
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    handles::list(&state.deferral, &caller(&state, &headers)?, query).await
}
