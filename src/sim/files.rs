//! The Files API both dialects share: upload, list, retrieve, content, delete.
//!
//! `/v1/files` is one route for both providers, so uploaded files render in a
//! superset of the two object shapes (OpenAI's fields plus Mistral's
//! `sample_type`, `source`, `num_lines`, ...), which both SDKs accept. Result
//! files a job writes take their own dialect's shape.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use serde_json::{json, Value};

use super::error::ApiError;
use super::state::{random_hex, unix_now, uuid_v4, CallIds, Sim};
use crate::model::Dialect;

const CHUNK: usize = 64 * 1024;

const PURPOSES: &[&str] = &[
    "batch",
    "fine-tune",
    "ocr",
    "audio",
    "assistants",
    "vision",
    "user_data",
    "evals",
];

/// Who made a file, which decides its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Upload,
    Output(Dialect),
    Errors(Dialect),
}

#[derive(Clone, Debug)]
pub struct StoredFile {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub data: Bytes,
    pub created_at: u64,
    pub num_lines: usize,
    pub kind: FileKind,
    pub seq: u64,
}

impl StoredFile {
    /// The file object, in the shape of its kind.
    pub fn render(&self) -> Value {
        let mut obj = json!({
            "id": self.id,
            "object": "file",
            "bytes": self.data.len(),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "expires_at": null,
            "status": "processed",
            "status_details": null,
        });
        let mistral = |sample_type: &str, source: &str| {
            json!({
                "sample_type": sample_type,
                "source": source,
                "num_lines": self.num_lines,
                "mimetype": "application/jsonl",
                "signature": null,
                "visibility": "workspace",
            })
        };
        let extra = match self.kind {
            FileKind::Upload if self.purpose == "batch" => mistral("batch_request", "upload"),
            FileKind::Upload => mistral("instruct", "upload"),
            FileKind::Output(Dialect::Mistral) => mistral("batch_result", "mistral"),
            FileKind::Errors(Dialect::Mistral) => mistral("batch_error", "mistral"),
            FileKind::Output(Dialect::Openai | Dialect::Anthropic)
            | FileKind::Errors(Dialect::Openai | Dialect::Anthropic) => json!({}),
        };
        if let (Some(obj), Some(extra)) = (obj.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
        }
        obj
    }
}

pub fn count_lines(data: &[u8]) -> usize {
    data.split(|b| *b == b'\n')
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
        .count()
}

/// Store a result file a job wrote and return its id.
pub fn store_result(sim: &Sim, kind: FileKind, job_id: &str, data: Bytes) -> String {
    let (id, filename, purpose) = match kind {
        FileKind::Output(Dialect::Mistral) | FileKind::Errors(Dialect::Mistral) => {
            let suffix = if matches!(kind, FileKind::Output(_)) {
                "output"
            } else {
                "error"
            };
            (uuid_v4(), format!("{job_id}_{suffix}.jsonl"), "batch")
        }
        _ => {
            let suffix = if matches!(kind, FileKind::Output(_)) {
                "output"
            } else {
                "error"
            };
            (
                format!("file-{}", random_hex(12)),
                format!("{job_id}_{suffix}.jsonl"),
                "batch_output",
            )
        }
    };
    let file = StoredFile {
        id: id.clone(),
        filename,
        purpose: purpose.to_owned(),
        num_lines: count_lines(&data),
        data,
        created_at: unix_now(),
        kind,
        seq: sim.next_seq(),
    };
    sim.files.insert(id.clone(), file);
    id
}

pub async fn upload(
    State(sim): State<Arc<Sim>>,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let cap = sim.opts().max_file_bytes;
    let mut purpose = None;
    let mut file: Option<(String, Bytes)> = None;
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("malformed multipart body: {e}")))?
    {
        match field.name() {
            Some("purpose") => {
                let text = field
                    .text()
                    .await
                    .map_err(|e| ApiError::invalid(format!("unreadable `purpose`: {e}")))?;
                purpose = Some(text);
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let mut buf = BytesMut::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| ApiError::invalid(format!("unreadable `file`: {e}")))?
                {
                    if (buf.len() + chunk.len()) as u64 > cap {
                        return Err(ApiError::too_large(format!(
                            "file exceeds the maximum size of {cap} bytes"
                        )));
                    }
                    buf.extend_from_slice(&chunk);
                }
                file = Some((name, buf.freeze()));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::missing("purpose"))?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid(format!("invalid purpose '{purpose}'")).param("purpose"));
    }
    let (filename, data) = file.ok_or_else(|| ApiError::missing("file"))?;
    let stored = StoredFile {
        id: format!("file-{}", random_hex(12)),
        filename,
        purpose,
        num_lines: count_lines(&data),
        data,
        created_at: unix_now(),
        kind: FileKind::Upload,
        seq: sim.next_seq(),
    };
    let body = stored.render();
    let id = stored.id.clone();
    sim.files.insert(id.clone(), stored);
    let mut response = Json(body).into_response();
    response.extensions_mut().insert(CallIds {
        file_id: Some(id),
        job_id: None,
    });
    Ok(response)
}

fn get_file(sim: &Sim, id: &str) -> Result<StoredFile, ApiError> {
    sim.files
        .get(id)
        .map(|f| f.value().clone())
        .ok_or_else(|| ApiError::not_found("file", id))
}

pub async fn retrieve(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut obj = get_file(&sim, &id)?.render();
    obj["deleted"] = json!(false);
    Ok(Json(obj))
}

/// The stored bytes, sent as a stream of chunks.
pub async fn content(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let data = get_file(&sim, &id)?.data;
    let len = data.len();
    let chunks: Vec<Result<Bytes, Infallible>> = (0..len)
        .step_by(CHUNK)
        .map(|start| Ok(data.slice(start..(start + CHUNK).min(len))))
        .collect();
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

pub async fn delete(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    sim.files
        .remove(&id)
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

/// Both pagination styles, each answered in its own shape: `page`/
/// `page_size` (Mistral) gets `{object, data, total}`; `after`/`limit`
/// (OpenAI, the default) gets `{object, data, first_id, last_id,
/// has_more}`. Newest first unless `order=asc`; `purpose` filters.
pub async fn list(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let mut files: Vec<StoredFile> = sim
        .files
        .iter()
        .map(|f| f.value().clone())
        .filter(|f| q.get("purpose").map_or(true, |p| &f.purpose == p))
        .collect();
    let ascending = q.get("order").map(String::as_str) == Some("asc");
    files.sort_by_key(|f| f.seq);
    if !ascending {
        files.reverse();
    }
    let total = files.len();
    if q.contains_key("page") || q.contains_key("page_size") {
        let page = parse_num(&q, "page", 0)?;
        let size = parse_num(&q, "page_size", 100)?.max(1);
        let data: Vec<Value> = files
            .iter()
            .skip(page.saturating_mul(size))
            .take(size)
            .map(StoredFile::render)
            .collect();
        return Ok(Json(
            json!({"object": "list", "data": data, "total": total}),
        ));
    }
    let page: Vec<StoredFile> = {
        let limit = parse_num(&q, "limit", 10_000)?.clamp(1, 10_000);
        let start = match q.get("after") {
            Some(after) => files
                .iter()
                .position(|f| &f.id == after)
                .map(|i| i + 1)
                .ok_or_else(|| ApiError::not_found("file", after))?,
            None => 0,
        };
        files.into_iter().skip(start).take(limit + 1).collect()
    };
    let (page, has_more) = trim_page(page, &q);
    Ok(Json(json!({
        "object": "list",
        "data": page.iter().map(StoredFile::render).collect::<Vec<_>>(),
        "first_id": page.first().map(|f| f.id.clone()),
        "last_id": page.last().map(|f| f.id.clone()),
        "has_more": has_more,
    })))
}

/// Cursor pages fetch one extra item to learn whether more follow.
fn trim_page(mut page: Vec<StoredFile>, q: &HashMap<String, String>) -> (Vec<StoredFile>, bool) {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10_000)
        .clamp(1, 10_000);
    let more = page.len() > limit;
    page.truncate(limit);
    (page, more)
}

pub fn parse_num(
    q: &HashMap<String, String>,
    key: &str,
    default: usize,
) -> Result<usize, ApiError> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            ApiError::invalid(format!("`{key}` must be a non-negative integer")).param(key)
        }),
    }
}
