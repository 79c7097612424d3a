//! The synchronous endpoints: chat (plain and SSE), embeddings, FIM,
//! moderations, legacy completions and models. Handlers parse, call the pure
//! [`answers`](super::answers) and render.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::answers::{chat_stream_events, model_card, model_list, respond};
use super::error::ApiError;
use super::state::Sim;

/// A request body as JSON, or the 400 a provider gives for anything else.
pub fn parse_body(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice::<Value>(bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))
}

/// Every non-chat synchronous endpoint: the answer for the body.
pub async fn answer(uri: Uri, body: Bytes) -> Result<Json<Value>, ApiError> {
    let body = parse_body(&body)?;
    Ok(Json(respond(uri.path(), &body)?))
}

pub async fn chat(State(sim): State<Arc<Sim>>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return Ok(Json(respond("/v1/chat/completions", &body)?).into_response());
    }
    let (pieces, delay) = {
        let opts = sim.opts();
        (opts.stream_chunks, opts.chunk_delay)
    };
    let events = chat_stream_events(&body, pieces)?;
    let gate = sim.gate.subscribe();
    let frames = futures_util::stream::unfold(
        (0usize, events, gate),
        move |(i, events, mut gate)| async move {
            if i > events.len() {
                return None;
            }
            if i == 1 {
                // The stream gate: hold everything after the first event.
                let _ = gate.wait_for(|held| !*held).await;
            }
            if i >= 1 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let frame = match events.get(i) {
                Some(event) => format!("data: {event}\n\n"),
                None => "data: [DONE]\n\n".to_owned(),
            };
            Some((
                Ok::<_, Infallible>(Bytes::from(frame)),
                (i + 1, events, gate),
            ))
        },
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response())
}

pub async fn models() -> Json<Value> {
    Json(model_list())
}

pub async fn model(Path(id): Path<String>) -> Json<Value> {
    Json(model_card(&id))
}
