//! Anthropic: `POST /v1/messages` (plain, and `stream: true` as its event
//! sequence) and Message Batches (`/v1/messages/batches`: create with
//! inline `requests`, get, list, cancel, results), in Anthropic's shapes
//! (reference section C): `x-api-key` and `anthropic-version`, RFC 3339
//! times, `processing_status` in_progress / canceling / ended, errors as
//! `{"type":"error","error":{"type","message"}}`.
//!
//! Input problems refuse the create call with a 400 naming `requests.N`
//! (the first bad request, 0-based), as Anthropic does; nothing is made.
//! A [`Fault::InvalidLine`](super::Fault) refuses it the same way at that
//! line. [`JobOutcome::Failed`] does not apply: an Anthropic batch does
//! not fail as a whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::answers::Digest32;
use super::answers::{content_text, echo, required_model, respond, split_chars, token_estimate};
use super::edge::credential;
use super::error::ApiError;
use super::faults::JobOutcome;
use super::jobs::{mark_failures, Job, JobSpec, Line, Stage, View};
use super::state::{lock, random_hex, CallIds, Sim};
use super::sync_api::{paced_sse, parse_body};
use crate::model::Dialect;
use crate::providers::anthropic::{error_type_of_status, format_rfc3339};

const ENDPOINT: &str = "/v1/messages";
const EXPIRES_SECS: u64 = 24 * 3600;

/// Anthropic's error body for a simulator refusal.
pub fn envelope(err: &ApiError) -> Value {
    json!({
        "type": "error",
        "error": {"type": error_type_of_status(err.status.as_u16()), "message": err.message},
    })
}

/// An [`ApiError`] rendered in Anthropic's shape.
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(err: ApiError) -> Self {
        Self(err)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        (self.0.status, Json(envelope(&self.0))).into_response()
    }
}

type Reply<T> = Result<T, AnthropicError>;

/// Anthropic refuses a call without `anthropic-version`.
fn check_version(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers
        .get("anthropic-version")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) if !v.trim().is_empty() => Ok(()),
        _ => Err(ApiError::invalid("anthropic-version: header is required")),
    }
}

/// The deterministic Message for a Messages body.
pub(super) fn answer(obj: &Map<String, Value>, d: &Digest32) -> Result<Value, ApiError> {
    let model = required_model(obj)?;
    match obj.get("max_tokens").and_then(Value::as_i64) {
        Some(n) if n >= 1 => {}
        Some(_) => {
            return Err(
                ApiError::invalid("max_tokens: Input should be greater than or equal to 1")
                    .param("max_tokens"),
            )
        }
        None => return Err(ApiError::invalid("max_tokens: Field required").param("max_tokens")),
    }
    let messages = match obj.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        _ => return Err(ApiError::invalid("messages: Field required").param("messages")),
    };
    let mut input_tokens = obj
        .get("system")
        .map(|s| token_estimate(&content_text(s)))
        .unwrap_or(0);
    let mut last_user = String::new();
    for msg in messages {
        let text = content_text(msg.get("content").unwrap_or(&Value::Null));
        input_tokens += token_estimate(&text) + 3;
        if msg.get("role").and_then(Value::as_str) == Some("user") {
            last_user = text;
        }
    }
    let text = format!("Simulated answer {} to: {}", d.short(), echo(&last_user));
    Ok(json!({
        "id": format!("msg_sim{}", d.short()),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": token_estimate(&text)},
    }))
}

/// The events of a streamed Message (`message_start` … `message_stop`),
/// as `(event name, data)`; the text deltas concatenate to the plain answer.
pub fn stream_events(message: &Value, pieces: usize) -> Vec<(&'static str, Value)> {
    let text = message["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = json!(1);
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": start}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    for piece in split_chars(&text, pieces.max(1)) {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((
        "message_delta",
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": null},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        }),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    events
}

/// `POST /v1/messages`.
pub async fn messages(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<Response> {
    check_version(&headers)?;
    let body = parse_body(&body)?;
    let message = respond(ENDPOINT, &body)?;
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return Ok(Json(message).into_response());
    }
    let frames = stream_events(&message, sim.opts().stream_chunks)
        .into_iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    Ok(paced_sse(&sim, frames))
}

/// A result line of a request the batch's cancel stopped.
pub fn canceled_line(custom_id: &str) -> Value {
    json!({"custom_id": custom_id, "result": {"type": "canceled"}})
}

fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The first problem of the inline requests, worded as Anthropic does:
/// `requests.N.<field>: <reason>` (N 0-based).
fn validate(requests: &[Value], max: usize) -> Result<Vec<Line>, ApiError> {
    if requests.is_empty() {
        return Err(ApiError::invalid(
            "requests: List should have at least 1 item",
        ));
    }
    if requests.len() > max {
        return Err(ApiError::invalid(format!(
            "requests: List should have at most {max} items"
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut lines = Vec::with_capacity(requests.len());
    for (i, item) in requests.iter().enumerate() {
        let bad = |field: &str, reason: &str| {
            Err(ApiError::invalid(format!("requests.{i}.{field}: {reason}")))
        };
        let Some(custom_id) = item.get("custom_id").and_then(Value::as_str) else {
            return bad("custom_id", "Field required");
        };
        if !valid_custom_id(custom_id) {
            return bad(
                "custom_id",
                "String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
            );
        }
        if !seen.insert(custom_id.to_owned()) {
            return bad("custom_id", "Duplicate custom_id in the batch");
        }
        let Some(params) = item.get("params").filter(|p| p.is_object()) else {
            return bad("params", "Field required");
        };
        if params.get("stream").and_then(Value::as_bool) == Some(true) {
            return bad("params.stream", "Streaming is not supported in batches");
        }
        if let Err(err) = respond(ENDPOINT, params) {
            if err.status == StatusCode::BAD_REQUEST {
                return bad("params", &err.message);
            }
        }
        lines.push(Line {
            custom_id: custom_id.to_owned(),
            body: params.clone(),
            injected: None,
        });
    }
    Ok(lines)
}

/// `POST /v1/messages/batches`.
pub async fn create(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<Response> {
    check_version(&headers)?;
    let req = parse_body(&body)?;
    let requests = req
        .get("requests")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("requests: Field required"))?;
    let opts = sim.opts();
    let mut lines = validate(requests, opts.max_requests_per_job)?;
    let (outcome, failures, invalid) = {
        let mut book = lock(&sim.faults);
        (
            book.take_job_outcome(),
            book.line_failures(),
            book.take_invalid_line(lines.len()),
        )
    };
    if let Some((line, code)) = invalid {
        return Err(
            ApiError::invalid(format!("requests.{}.params: {code} (simulated)", line - 1)).into(),
        );
    }
    mark_failures(&mut lines, &failures);
    let outcome = outcome.filter(|o| *o != JobOutcome::Failed);
    let beta = headers
        .get("anthropic-beta")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let spec = JobSpec {
        id: format!("msgbatch_{}", random_hex(12)),
        dialect: Dialect::Anthropic,
        endpoint: ENDPOINT.to_owned(),
        model: None,
        metadata: None,
        input_file_ids: Vec::new(),
        inline: true,
        credential: credential(&headers),
        extra: json!({"anthropic_beta": beta}),
    };
    let job = Job::new(spec, lines, Vec::new(), outcome, &opts);
    let id = job.id.clone();
    let job = super::quota::add_within_limit(&sim, job).map_err(|refused| {
        let (job, refused) = *refused;
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            refused.message(job.spec.model.as_deref()),
        )
    })?;
    let rendered = {
        let mut job = lock(&job);
        let view = job.advance(&sim, Instant::now());
        render(&job, &view, &base(&headers))
    };
    let mut response = Json(rendered).into_response();
    response.extensions_mut().insert(CallIds {
        job_id: Some(id),
        file_id: None,
    });
    Ok(response)
}

/// Where the batch's `results_url` points: the host the call came to.
fn base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn find(sim: &Sim, id: &str) -> Result<Arc<std::sync::Mutex<Job>>, ApiError> {
    sim.find_job(id)
        .filter(|j| lock(j).spec.dialect == Dialect::Anthropic)
        .ok_or_else(|| ApiError::not_found("message batch", id))
}

/// `GET /v1/messages/batches/{id}`.
pub async fn get(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<Json<Value>> {
    let job = find(&sim, &id)?;
    let mut job = lock(&job);
    let view = job.advance(&sim, Instant::now());
    Ok(Json(render(&job, &view, &base(&headers))))
}

/// `POST /v1/messages/batches/{id}/cancel`.
pub async fn cancel(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<Json<Value>> {
    let job = find(&sim, &id)?;
    let mut job = lock(&job);
    let now = Instant::now();
    // Cancelling an ended batch is a no-op answer, not a conflict.
    let view = match job.cancel(&sim, now) {
        Ok(view) => view,
        Err(_) => job.advance(&sim, now),
    };
    Ok(Json(render(&job, &view, &base(&headers))))
}

/// `GET /v1/messages/batches/{id}/results`: JSONL, once ended.
pub async fn results(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Reply<Response> {
    let job = find(&sim, &id)?;
    let view = lock(&job).advance(&sim, Instant::now());
    if !view.stage.is_terminal() {
        return Err(ApiError::invalid(format!(
            "Message batch {id} has not yet ended; its results are not available"
        ))
        .into());
    }
    let data = view
        .output_file
        .and_then(|f| sim.files.get(&f).map(|f| f.data.clone()))
        .unwrap_or_default();
    Ok((
        [(header::CONTENT_TYPE, "application/binary")],
        Body::from(data),
    )
        .into_response())
}

/// `GET /v1/messages/batches`: the key's batches, newest first, paged by
/// `after_id` / `before_id`, `limit` 1..=1000 (default 20).
pub async fn list(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<Json<Value>> {
    let limit = match q.get("limit") {
        None => 20,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::invalid("limit: Input should be between 1 and 1000"))?,
    };
    let key = credential(&headers);
    let base = base(&headers);
    let now = Instant::now();
    let mut all: Vec<Value> = sim
        .all_jobs()
        .iter()
        .filter_map(|j| {
            let mut job = lock(j);
            (job.spec.dialect == Dialect::Anthropic && job.spec.credential == key).then(|| {
                let view = job.advance(&sim, now);
                render(&job, &view, &base)
            })
        })
        .collect();
    all.reverse();
    let position = |id: &String| all.iter().position(|b| b["id"] == id.as_str());
    let (start, end) = match (q.get("after_id"), q.get("before_id")) {
        (Some(after), _) => {
            let at = position(after).ok_or_else(|| ApiError::not_found("message batch", after))?;
            (at + 1, all.len())
        }
        (None, Some(before)) => {
            let at =
                position(before).ok_or_else(|| ApiError::not_found("message batch", before))?;
            (at.saturating_sub(limit), at)
        }
        (None, None) => (0, all.len()),
    };
    let page: Vec<Value> = all[start..end].iter().take(limit).cloned().collect();
    let has_more = end > start + page.len();
    Ok(Json(json!({
        "data": page,
        "has_more": has_more,
        "first_id": page.first().map(|b| b["id"].clone()),
        "last_id": page.last().map(|b| b["id"].clone()),
    })))
}

/// The Message Batch object (reference C2).
pub fn render(job: &Job, view: &View, base: &str) -> Value {
    let ended = view.stage.is_terminal();
    let total = view.total as u64;
    let unprocessed = total - (view.processed as u64).min(total);
    let counts = if ended {
        json!({
            "processing": 0,
            "succeeded": view.succeeded,
            "errored": view.failed,
            "canceled": if view.stage == Stage::Cancelled { unprocessed } else { 0 },
            "expired": if view.stage == Stage::Expired { unprocessed } else { 0 },
        })
    } else {
        json!({"processing": total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    };
    let time = |t: u64| format_rfc3339(i64::try_from(t).unwrap_or(i64::MAX));
    json!({
        "id": job.id,
        "type": "message_batch",
        "processing_status": view.stage.word(Dialect::Anthropic),
        "request_counts": counts,
        "ended_at": view.ended_at.map(time),
        "created_at": time(job.created_at),
        "expires_at": time(job.created_at + EXPIRES_SECS),
        "archived_at": null,
        "cancel_initiated_at": view.cancelling_at.map(time),
        "results_url": ended.then(|| format!("{base}/v1/messages/batches/{}/results", job.id)),
    })
}
