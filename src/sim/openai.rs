//! OpenAI batches: `POST/GET /v1/batches`, `GET /v1/batches/{id}`,
//! `POST /v1/batches/{id}/cancel`, in OpenAI's object shape.
//!
//! Input problems do not refuse the create call: the batch is accepted in
//! `validating` and then ends `failed`, nothing run, with one entry in
//! `errors.data` for the first bad line (reference section 0, B4).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::answers::ENDPOINTS;
use super::edge::credential;
use super::error::ApiError;
use super::files::{parse_num, FileKind};
use super::jobs::{
    check_common, first_error_only, mark_failures, parse_jsonl, InputError, Job, JobSpec, Line,
    View,
};
use super::state::{lock, random_hex, CallIds, Sim};
use super::sync_api::parse_body;
use crate::model::Dialect;

const WINDOW_SECS: u64 = 24 * 3600;

pub async fn create(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = parse_body(&body)?;
    let file_id = req
        .get("input_file_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing("input_file_id"))?;
    let endpoint = req
        .get("endpoint")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing("endpoint"))?;
    if !ENDPOINTS.contains(&endpoint) || !Dialect::Openai.batchable(endpoint) {
        return Err(
            ApiError::invalid(format!("unsupported endpoint '{endpoint}'")).param("endpoint"),
        );
    }
    // OpenAI sells 24h; compatible providers also these.
    match req.get("completion_window").and_then(Value::as_str) {
        Some("24h" | "1h" | "48h" | "72h" | "7d") => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "invalid completion_window '{other}': supported are 1h, 24h, 48h, 72h and 7d"
            ))
            .param("completion_window"))
        }
        None => return Err(ApiError::missing("completion_window")),
    }
    let metadata = check_metadata(req.get("metadata"))?;
    let file = sim
        .files
        .get(file_id)
        .map(|f| f.value().clone())
        .ok_or_else(|| ApiError::not_found("file", file_id))?;
    if file.kind != FileKind::Upload || file.purpose != "batch" {
        return Err(
            ApiError::invalid(format!("file '{file_id}' does not have purpose 'batch'"))
                .param("input_file_id"),
        );
    }

    let opts = sim.opts();
    let (mut lines, errors, model) = validate(&file.data, endpoint, opts.max_requests_per_job);
    let (outcome, failures, invalid) = {
        let mut book = lock(&sim.faults);
        (
            book.take_job_outcome(),
            book.line_failures(),
            book.take_invalid_line(lines.len()),
        )
    };
    mark_failures(&mut lines, &failures);
    let mut errors = errors;
    if let Some((line, code)) = invalid {
        errors.push(InputError::injected(&code, line));
    }
    first_error_only(&mut errors);
    if outcome == Some(super::faults::JobOutcome::Failed) && errors.is_empty() {
        errors.push(InputError::job(
            "simulated_failure",
            "The batch failed (simulated).",
        ));
    }
    let spec = JobSpec {
        id: format!("batch_{}", random_hex(16)),
        dialect: Dialect::Openai,
        endpoint: endpoint.to_owned(),
        model,
        metadata,
        input_file_ids: vec![file_id.to_owned()],
        inline: false,
        credential: credential(&headers),
        extra: json!({"completion_window": req.get("completion_window")}),
    };
    let job = Job::new(spec, lines, errors, outcome, &opts);
    let id = job.id.clone();
    let job = match super::quota::add_within_limit(&sim, job) {
        Ok(job) => job,
        Err(refused) => {
            let (mut job, refused) = *refused;
            let error = refused.as_job_error(job.spec.model.as_deref());
            job.refuse(error);
            sim.add_job(job)
        }
    };
    let rendered = {
        let mut job = lock(&job);
        let view = job.advance(&sim, Instant::now());
        render(&job, &view)
    };
    let mut response = Json(rendered).into_response();
    response.extensions_mut().insert(CallIds {
        job_id: Some(id),
        file_id: Some(file_id.to_owned()),
    });
    Ok(response)
}

/// OpenAI's per-line rules: JSON objects with a string `custom_id`,
/// `method: POST`, `url` equal to the endpoint, an object `body`, and one
/// model for the whole file.
fn validate(
    data: &[u8],
    endpoint: &str,
    max_requests: usize,
) -> (Vec<Line>, Vec<InputError>, Option<String>) {
    let mut errors = Vec::new();
    let mut items = Vec::new();
    let mut model: Option<String> = None;
    for (n, obj) in parse_jsonl(data, &mut errors) {
        let Some(custom_id) = obj.get("custom_id").and_then(Value::as_str) else {
            errors.push(line_error(
                "missing_required_parameter",
                n,
                "custom_id",
                "Each line needs a string `custom_id`.",
            ));
            continue;
        };
        if obj.get("method").and_then(Value::as_str) != Some("POST") {
            errors.push(line_error(
                "invalid_method",
                n,
                "method",
                "`method` must be 'POST'.",
            ));
        }
        let url = obj.get("url").and_then(Value::as_str).unwrap_or_default();
        if url != endpoint {
            errors.push(line_error(
                "invalid_url",
                n,
                "url",
                &format!("The url '{url}' does not match the batch endpoint '{endpoint}'."),
            ));
        }
        let Some(body) = obj.get("body").filter(|b| b.is_object()) else {
            errors.push(line_error(
                "invalid_body",
                n,
                "body",
                "`body` must be a JSON object.",
            ));
            continue;
        };
        if endpoint == "/v1/responses" && body.get("background") == Some(&Value::Bool(true)) {
            errors.push(line_error(
                "invalid_request",
                n,
                "body.background",
                "Background responses are not supported in batch requests (`body.background` must not be true).",
            ));
        }
        let Some(m) = body.get("model").and_then(Value::as_str) else {
            errors.push(line_error(
                "invalid_request",
                n,
                "body.model",
                "The request is missing a model (`body.model`).",
            ));
            continue;
        };
        match &model {
            None => model = Some(m.to_owned()),
            Some(first) if first != m => errors.push(line_error(
                "mismatched_model",
                n,
                "body.model",
                &format!("The model '{m}' differs from '{first}': one model per batch file."),
            )),
            Some(_) => {}
        }
        items.push((n, custom_id.to_owned(), body.clone()));
    }
    check_common(&items, max_requests, &mut errors);
    let lines = items
        .into_iter()
        .map(|(_, custom_id, body)| Line {
            custom_id,
            body,
            injected: None,
        })
        .collect();
    (lines, errors, model)
}

fn line_error(code: &str, line: usize, param: &str, message: &str) -> InputError {
    InputError {
        code: code.to_owned(),
        line: Some(line),
        message: message.to_owned(),
        param: Some(param.to_owned()),
    }
}

/// OpenAI's metadata rules: at most 16 string pairs, keys up to 64
/// characters, values up to 512.
fn check_metadata(meta: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(meta) = meta.filter(|m| !m.is_null()) else {
        return Ok(None);
    };
    let bad = |msg: &str| Err(ApiError::invalid(msg.to_owned()).param("metadata"));
    let Some(map) = meta.as_object() else {
        return bad("`metadata` must be an object");
    };
    if map.len() > 16 {
        return bad("`metadata` holds at most 16 pairs");
    }
    for (k, v) in map {
        let Some(v) = v.as_str() else {
            return bad("`metadata` values must be strings");
        };
        if k.chars().count() > 64 || v.chars().count() > 512 {
            return bad("`metadata` keys hold at most 64 characters and values 512");
        }
    }
    Ok(Some(meta.clone()))
}

fn find(sim: &Sim, id: &str) -> Result<Arc<std::sync::Mutex<Job>>, ApiError> {
    sim.find_job(id)
        .filter(|j| lock(j).spec.dialect == Dialect::Openai)
        .ok_or_else(|| ApiError::not_found("batch", id))
}

pub async fn get(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&sim, &id)?;
    let mut job = lock(&job);
    let view = job.advance(&sim, Instant::now());
    Ok(Json(render(&job, &view)))
}

pub async fn cancel(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&sim, &id)?;
    let mut job = lock(&job);
    let view = job.cancel(&sim, Instant::now())?;
    Ok(Json(render(&job, &view)))
}

/// Newest first, `after` a batch id, `limit` 1..=100 (default 20).
pub async fn list(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_num(&q, "limit", 20)?.clamp(1, 100);
    let now = Instant::now();
    let mut all: Vec<Value> = sim
        .listed_jobs()
        .iter()
        .filter_map(|j| {
            let mut job = lock(j);
            (job.spec.dialect == Dialect::Openai).then(|| {
                let view = job.advance(&sim, now);
                render(&job, &view)
            })
        })
        .collect();
    all.reverse();
    let start = match q.get("after") {
        Some(after) => all
            .iter()
            .position(|b| b["id"] == after.as_str())
            .map(|i| i + 1)
            .ok_or_else(|| ApiError::not_found("batch", after))?,
        None => 0,
    };
    let page: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
    let has_more = all.len() > start + page.len();
    Ok(Json(json!({
        "object": "list",
        "first_id": page.first().map(|b| b["id"].clone()),
        "last_id": page.last().map(|b| b["id"].clone()),
        "has_more": has_more,
        "data": page,
    })))
}

/// The Batch object (reference B4).
pub fn render(job: &Job, view: &View) -> Value {
    use super::jobs::Stage;
    let at = |stage: Stage| (view.stage == stage).then_some(view.ended_at).flatten();
    let errors = (!job.errors.is_empty()).then(|| {
        json!({
            "object": "list",
            "data": job.errors.iter().map(|e| json!({
                "code": e.code, "line": e.line, "message": e.message, "param": e.param,
            })).collect::<Vec<_>>(),
        })
    });
    let validated = view.stage != Stage::Queued && view.stage != Stage::Failed;
    json!({
        "id": job.id,
        "object": "batch",
        "endpoint": job.spec.endpoint,
        "model": job.spec.model,
        "errors": errors,
        "input_file_id": job.spec.input_file_ids.first(),
        "completion_window": job.spec.extra["completion_window"],
        "status": view.stage.word(Dialect::Openai),
        "output_file_id": view.output_file,
        "error_file_id": view.error_file,
        "created_at": job.created_at,
        "in_progress_at": view.started_at,
        "expires_at": job.created_at + WINDOW_SECS,
        "finalizing_at": view.finalizing_at,
        "completed_at": at(Stage::Completed),
        "failed_at": at(Stage::Failed),
        "expired_at": at(Stage::Expired),
        "cancelling_at": view.cancelling_at,
        "cancelled_at": at(Stage::Cancelled),
        "request_counts": {
            "total": if validated || view.processed > 0 { view.total } else { 0 },
            "completed": view.succeeded,
            "failed": view.failed,
        },
        "metadata": job.spec.metadata,
        "usage": {
            "input_tokens": view.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": view.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": view.input_tokens + view.output_tokens,
        },
    })
}
