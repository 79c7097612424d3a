//! Mistral batch jobs: `/v1/batch/jobs` create (from `input_files` or inline
//! `requests`), get (`?inline=true`), list, cancel, delete, in Mistral's
//! object shape.
//!
//! Schema problems (no endpoint, both or neither input, too many inline
//! requests, bad metadata) refuse the create call with 422; problems inside
//! the lines end the job `FAILED` with `errors` (reference A2, A4).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::answers::ENDPOINTS;
use super::edge::credential;
use super::error::ApiError;
use super::faults::JobOutcome;
use super::files::FileKind;
use super::jobs::{
    check_common, mark_failures, parse_jsonl, InputError, Job, JobSpec, Line, Stage, View,
};
use super::state::{lock, uuid_v4, CallIds, Sim};
use super::sync_api::parse_body;
use crate::model::Dialect;

/// The `ApiEndpoint` enum of the Mistral spec.
const MISTRAL_ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fim/completions",
    "/v1/moderations",
    "/v1/chat/moderations",
    "/v1/ocr",
    "/v1/classifications",
    "/v1/chat/classifications",
    "/v1/conversations",
    "/v1/audio/transcriptions",
];

pub async fn create(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = parse_body(&body)?;
    let endpoint = req
        .get("endpoint")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::unprocessable("`endpoint` is required").param("endpoint"))?;
    if !MISTRAL_ENDPOINTS.contains(&endpoint) {
        return Err(
            ApiError::unprocessable(format!("invalid endpoint '{endpoint}'")).param("endpoint"),
        );
    }
    if !ENDPOINTS.contains(&endpoint) {
        return Err(ApiError::invalid(format!(
            "the simulator does not run batches for '{endpoint}'"
        ))
        .param("endpoint"));
    }
    let model = req.get("model").and_then(Value::as_str).map(str::to_owned);
    let metadata = check_metadata(req.get("metadata"))?;
    let timeout_hours = match req.get("timeout_hours") {
        None | Some(Value::Null) => 24,
        Some(v) => match v.as_u64() {
            Some(h) if (1..168).contains(&h) => h,
            _ => {
                return Err(ApiError::unprocessable(
                    "`timeout_hours` must be an integer from 1 to 167",
                )
                .param("timeout_hours"))
            }
        },
    };
    let opts = sim.opts();
    let files = non_null(req.get("input_files"));
    let requests = non_null(req.get("requests"));
    let mut errors = Vec::new();
    let (items, input_file_ids, inline) = match (files, requests) {
        (Some(files), None) => {
            let ids: Vec<String> = files
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if ids.is_empty() {
                return Err(ApiError::unprocessable("`input_files` must list file ids")
                    .param("input_files"));
            }
            let mut parsed = Vec::new();
            for id in &ids {
                let file = sim
                    .files
                    .get(id)
                    .map(|f| f.value().clone())
                    .ok_or_else(|| ApiError::not_found("file", id))?;
                if file.kind != FileKind::Upload {
                    return Err(ApiError::invalid(format!(
                        "file '{id}' is not an uploaded input file"
                    )));
                }
                parsed.extend(parse_jsonl(&file.data, &mut errors));
            }
            (parsed, ids, false)
        }
        (None, Some(requests)) => {
            let list = requests.as_array().cloned().unwrap_or_default();
            if list.len() > opts.max_inline_requests {
                return Err(ApiError::unprocessable(format!(
                    "`requests` holds at most {} items",
                    opts.max_inline_requests
                ))
                .param("requests"));
            }
            (
                list.into_iter()
                    .enumerate()
                    .map(|(i, r)| (i + 1, r))
                    .collect(),
                Vec::new(),
                true,
            )
        }
        _ => {
            return Err(ApiError::unprocessable(
                "send exactly one of `input_files` and `requests`",
            ))
        }
    };

    let mut checked = Vec::new();
    for (n, item) in items {
        let Some(custom_id) = item.get("custom_id").and_then(Value::as_str) else {
            errors.push(InputError {
                code: "missing_custom_id".to_owned(),
                line: Some(n),
                message: format!("Line {n}: `custom_id` is required."),
                param: Some("custom_id".to_owned()),
            });
            continue;
        };
        let Some(mut body) = item.get("body").filter(|b| b.is_object()).cloned() else {
            errors.push(InputError {
                code: "invalid_body".to_owned(),
                line: Some(n),
                message: format!("Line {n}: `body` must be a JSON object."),
                param: Some("body".to_owned()),
            });
            continue;
        };
        if let (Some(m), Some(obj)) = (&model, body.as_object_mut()) {
            obj.entry("model").or_insert_with(|| json!(m));
        }
        checked.push((n, custom_id.to_owned(), body));
    }
    check_common(&checked, opts.max_requests_per_job, &mut errors);
    let job_model = model.or_else(|| {
        checked
            .first()
            .and_then(|(_, _, b)| b.get("model").and_then(Value::as_str).map(str::to_owned))
    });
    let mut lines: Vec<Line> = checked
        .into_iter()
        .map(|(_, custom_id, body)| Line {
            custom_id,
            body,
            injected: None,
        })
        .collect();
    let (outcome, failures, invalid) = {
        let mut book = lock(&sim.faults);
        (
            book.take_job_outcome(),
            book.line_failures(),
            book.take_invalid_line(lines.len()),
        )
    };
    mark_failures(&mut lines, &failures);
    if let Some((line, code)) = invalid {
        errors.push(InputError::injected(&code, line));
    }
    if outcome == Some(JobOutcome::Failed) && errors.is_empty() {
        errors.push(InputError::job(
            "simulated_failure",
            "The job failed (simulated).",
        ));
    }
    let spec = JobSpec {
        id: uuid_v4(),
        dialect: Dialect::Mistral,
        endpoint: endpoint.to_owned(),
        model: job_model,
        metadata,
        input_file_ids,
        inline,
        credential: credential(&headers),
        extra: json!({
            "timeout_hours": timeout_hours,
            "agent_id": req.get("agent_id").cloned().unwrap_or(Value::Null),
        }),
    };
    let job = Job::new(spec, lines, errors, outcome, &opts);
    let id = job.id.clone();
    let first_file = job.spec.input_file_ids.first().cloned();
    let job = super::quota::add_within_limit(&sim, job).map_err(|refused| {
        let (job, refused) = *refused;
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            refused.message(job.spec.model.as_deref()),
        )
        .code(super::quota::CODE)
    })?;
    let rendered = {
        let mut job = lock(&job);
        let view = job.advance(&sim, Instant::now());
        render(&sim, &job, &view, false)
    };
    let mut response = Json(rendered).into_response();
    response.extensions_mut().insert(CallIds {
        job_id: Some(id),
        file_id: first_file,
    });
    Ok(response)
}

fn non_null(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

/// Mistral's metadata rules: string keys of 1 to 32 characters, string
/// values of 1 to 512.
fn check_metadata(meta: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(meta) = non_null(meta) else {
        return Ok(None);
    };
    let bad = |msg: &str| Err(ApiError::unprocessable(msg.to_owned()).param("metadata"));
    let Some(map) = meta.as_object() else {
        return bad("`metadata` must be an object");
    };
    for (k, v) in map {
        let Some(v) = v.as_str() else {
            return bad("`metadata` values must be strings");
        };
        if !(1..=32).contains(&k.chars().count()) || !(1..=512).contains(&v.chars().count()) {
            return bad("`metadata` keys hold 1 to 32 characters and values 1 to 512");
        }
    }
    Ok(Some(meta.clone()))
}

fn find(sim: &Sim, id: &str) -> Result<Arc<Mutex<Job>>, ApiError> {
    sim.find_job(id)
        .filter(|j| lock(j).spec.dialect == Dialect::Mistral)
        .ok_or_else(|| ApiError::not_found("batch job", id))
}

pub async fn get(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let inline = q.get("inline").map(String::as_str) == Some("true");
    let job = find(&sim, &id)?;
    let mut job = lock(&job);
    let view = job.advance(&sim, Instant::now());
    Ok(Json(render(&sim, &job, &view, inline)))
}

pub async fn cancel(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&sim, &id)?;
    let mut job = lock(&job);
    let view = job.cancel(&sim, Instant::now())?;
    Ok(Json(render(&sim, &job, &view, false)))
}

pub async fn delete(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&sim, &id)?;
    sim.job_index.remove(&id);
    lock(&sim.jobs).retain(|j| !Arc::ptr_eq(j, &job));
    Ok(Json(json!({"id": id, "object": "batch", "deleted": true})))
}

/// Filters: `status` (repeated), `model`, `metadata` (JSON, `metadata[k]=v`,
/// or unknown top-level keys, as form-exploded), `created_after` (unix
/// seconds or an ISO date is compared loosely: only unix seconds filter),
/// `order_by`; pages by `page` / `page_size`.
pub async fn list(
    State(sim): State<Arc<Sim>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let mut statuses = Vec::new();
    let mut meta: Vec<(String, String)> = Vec::new();
    let mut page = 0usize;
    let mut page_size = 100usize;
    let mut model = None;
    let mut ascending = false;
    let mut created_after: Option<u64> = None;
    for (k, v) in pairs {
        let num = |v: &str| {
            v.parse::<usize>().map_err(|_| {
                ApiError::unprocessable(format!("`{k}` must be a non-negative integer")).param(&k)
            })
        };
        match k.as_str() {
            "status" => statuses.extend(v.split(',').map(str::to_owned)),
            "page" => page = num(&v)?,
            "page_size" => page_size = num(&v)?.max(1),
            "model" => model = Some(v),
            "order_by" => ascending = v == "created",
            "created_after" => created_after = v.parse().ok(),
            "metadata" => {
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&v) {
                    meta.extend(
                        map.into_iter()
                            .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned())),
                    );
                }
            }
            "agent_id" | "created_by_me" => {}
            other => {
                let key = other
                    .strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                    .unwrap_or(other);
                meta.push((key.to_owned(), v));
            }
        }
    }
    let now = Instant::now();
    let mut all: Vec<Value> = sim
        .listed_jobs()
        .iter()
        .filter_map(|j| {
            let mut job = lock(j);
            if job.spec.dialect != Dialect::Mistral {
                return None;
            }
            let view = job.advance(&sim, now);
            let obj = render(&sim, &job, &view, false);
            let keep = (statuses.is_empty()
                || statuses.iter().any(|s| obj["status"] == s.as_str()))
                && model.as_deref().map_or(true, |m| obj["model"] == m)
                && created_after.map_or(true, |t| job.created_at > t)
                && meta.iter().all(|(k, v)| obj["metadata"][k] == v.as_str());
            keep.then_some(obj)
        })
        .collect();
    if !ascending {
        all.reverse();
    }
    let total = all.len();
    let data: Vec<Value> = all
        .into_iter()
        .skip(page * page_size)
        .take(page_size)
        .collect();
    Ok(Json(
        json!({"object": "list", "data": data, "total": total}),
    ))
}

/// The BatchJob object (reference A4).
pub fn render(sim: &Sim, job: &Job, view: &View, inline: bool) -> Value {
    let mut obj = json!({
        "id": job.id,
        "object": "batch",
        "input_files": job.spec.input_file_ids,
        "metadata": job.spec.metadata,
        "endpoint": job.spec.endpoint,
        "model": job.spec.model,
        "agent_id": job.spec.extra["agent_id"],
        "output_file": view.output_file,
        "error_file": view.error_file,
        "errors": job.errors.iter().map(|e| json!({"message": e.message, "count": 1})).collect::<Vec<_>>(),
        "status": view.stage.word(Dialect::Mistral),
        "created_at": job.created_at,
        "total_requests": view.total,
        "completed_requests": view.processed,
        "succeeded_requests": view.succeeded,
        "failed_requests": view.failed,
        "started_at": view.started_at,
        "completed_at": if view.stage.is_terminal() { view.ended_at } else { None },
        "timeout_hours": job.spec.extra["timeout_hours"],
    });
    if inline {
        obj["outputs"] = if view.stage.is_terminal() && view.stage != Stage::Failed {
            json!(result_lines(sim, [&view.output_file, &view.error_file]))
        } else {
            Value::Null
        };
    }
    obj
}

/// Every line of the job's result files (for `?inline=true`).
fn result_lines(sim: &Sim, files: [&Option<String>; 2]) -> Vec<Value> {
    files
        .into_iter()
        .flatten()
        .filter_map(|id| sim.files.get(id).map(|f| f.data.clone()))
        .flat_map(|data| {
            data.split(|b| *b == b'\n')
                .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}
