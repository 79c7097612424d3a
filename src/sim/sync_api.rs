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

/// A synchronous call's service tier, as OpenAI serves it: a call asking
/// for `service_tier: "flex"` waits out the flex faults and may be refused
/// (429/503 without capacity, 400 for a model without flex); the answer
/// then says the tier that served it (`flex`, or `default` for any other
/// tier asked). A call that names no tier is answered as before.
pub async fn serve_tier(sim: &Sim, body: &Value, answer: &mut Value) -> Result<(), ApiError> {
    let Some(asked) = body.get("service_tier").and_then(Value::as_str) else {
        return Ok(());
    };
    let served = if asked == "flex" {
        let (delay, refused) = super::state::lock(&sim.faults).on_flex_call();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match refused {
            Some(400) => {
                return Err(ApiError::invalid(
                    "the flex service tier is not available for this model",
                )
                .param("service_tier"))
            }
            Some(status) => {
                let status = axum::http::StatusCode::from_u16(status)
                    .unwrap_or(axum::http::StatusCode::TOO_MANY_REQUESTS);
                return Err(ApiError::new(
                    status,
                    "rate_limit_error",
                    "resource unavailable: no flex capacity right now, retry later or use the default tier",
                )
                .code("resource_unavailable"));
            }
            None => "flex",
        }
    } else {
        "default"
    };
    if let Some(obj) = answer.as_object_mut() {
        obj.insert("service_tier".to_owned(), served.into());
    }
    Ok(())
}

/// Every non-chat synchronous endpoint: the answer for the body.
pub async fn answer(uri: Uri, body: Bytes) -> Result<Json<Value>, ApiError> {
    let body = parse_body(&body)?;
    Ok(Json(respond(uri.path(), &body)?))
}

pub async fn chat(State(sim): State<Arc<Sim>>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let mut answer = respond("/v1/chat/completions", &body)?;
        serve_tier(&sim, &body, &mut answer).await?;
        return Ok(Json(answer).into_response());
    }
    let pieces = sim.opts().stream_chunks;
    let frames = chat_stream_events(&body, pieces)?
        .iter()
        .map(|event| format!("data: {event}\n\n"))
        .chain(std::iter::once("data: [DONE]\n\n".to_owned()))
        .collect();
    Ok(paced_sse(&sim, frames))
}

/// `frames` as an event stream, paced like a provider's: the stream gate
/// holds everything after the first frame, and `chunk_delay` comes before
/// each later one.
pub fn paced_sse(sim: &Sim, frames: Vec<String>) -> Response {
    let delay = sim.opts().chunk_delay;
    let gate = sim.gate.subscribe();
    let frames = futures_util::stream::unfold(
        (0usize, frames.into_iter(), gate),
        move |(i, mut frames, mut gate)| async move {
            let frame = frames.next()?;
            if i == 1 {
                let _ = gate.wait_for(|held| !*held).await;
            }
            if i >= 1 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((
                Ok::<_, Infallible>(Bytes::from(frame)),
                (i + 1, frames, gate),
            ))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

pub async fn models() -> Json<Value> {
    Json(model_list())
}

pub async fn model(Path(id): Path<String>) -> Json<Value> {
    Json(model_card(&id))
}
