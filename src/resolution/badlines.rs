//! One caller's bad line never sinks the others (SPEC section 3).
//!
//! OpenAI validates a batch file and fails the whole batch at the first bad
//! line it finds, naming it in `errors.data[].line` and running nothing
//! (reference section 0). Resubmitting the same file would fail again, so:
//! the named lines fail to their own callers (400 with the provider's code
//! and message, status `failed`, a webhook where asked), and every other
//! open request goes back to a fresh window that is sealed at once, without
//! counting against `resubmit_limit`.
//!
//! Line numbers are mapped to requests from the provider's own copy of the
//! input file (its `custom_id` at that line): exact whatever left the
//! window between upload and failure (a cancel, a realtime fallback),
//! where our own rows could only guess. A provider that names no line, or
//! whose file cannot be read for a reason that will not clear, leaves the
//! window to the usual failure chain.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use serde_json::{json, Value};

use super::fallback::ChainTally;
use super::reconcile::ReconcileError;
use crate::deferral::engine::{now_ms, BatchUpstream, Deferral};
use crate::model::{RequestId, ServedBy};
use crate::providers::{BatchClient, JobPhase, JobView, LineReader, NamedLine};
use crate::store::{FlushReason, Resolution, ResolvedStatus, StoreError, WindowRecord};

/// Handles a job refused for named lines; `None` when the usual failure
/// chain must run instead (no line named, or none of ours found).
pub async fn settle_named_lines(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: &str,
    window: &WindowRecord,
    job: &JobView,
) -> Result<Option<ChainTally>, ReconcileError> {
    if job.phase != JobPhase::Failed || job.named_lines.is_empty() {
        return Ok(None);
    }
    let Some(file_id) = window.file_id.as_deref() else {
        return Ok(None);
    };
    let client = upstream.client.scoped(&window.key.scope);
    let max_line = deferral.config.batching.max_result_line;
    let named = match lines_to_requests(&client, key, file_id, max_line, &job.named_lines).await {
        Ok(named) if !named.is_empty() => named,
        Ok(_) => return Ok(None),
        Err(err) if err.is_permanent() => {
            tracing::warn!(window = %window.id, error = %err, "the input file of a refused batch cannot be read; the whole window goes down the failure chain");
            return Ok(None);
        }
        Err(err) => return Err(err.into()),
    };
    let failed = fail_named(deferral, window, named).await?;
    let resubmitted = resubmit_rest(deferral, window).await?;
    tracing::info!(window = %window.id, job = %job.id, failed, resubmitted, "batch refused for named lines: those failed, the rest resubmitted");
    Ok(Some(ChainTally {
        resubmitted,
        failed,
        ..ChainTally::default()
    }))
}

/// The request at each named line of the input file, read from the
/// provider's copy, up to the last line named.
async fn lines_to_requests(
    client: &BatchClient,
    key: &str,
    file_id: &str,
    max_line: u64,
    named: &[NamedLine],
) -> Result<Vec<(RequestId, NamedLine)>, crate::providers::ProviderError> {
    let mut wanted: BTreeMap<u64, &NamedLine> = BTreeMap::new();
    for line in named {
        wanted.entry(line.line).or_insert(line);
    }
    let last = wanted.keys().next_back().copied().unwrap_or(0);
    let stream = client.download(key, file_id).await?;
    let mut reader = LineReader::new(Box::pin(stream), max_line);
    let mut found = Vec::new();
    let mut n = 0;
    while n < last {
        let Some(raw) = reader.next_line().await? else {
            break;
        };
        n += 1;
        if let Some(line) = wanted.get(&n) {
            if let Some(id) = custom_id(&raw) {
                found.push((id, (*line).clone()));
            }
        }
    }
    Ok(found)
}

fn custom_id(line: &Bytes) -> Option<RequestId> {
    let v: Value = serde_json::from_slice(line).ok()?;
    RequestId::parse(v.get("custom_id")?.as_str()?)
}

/// Fails each named request still open in the window: 400 with an
/// OpenAI-style error object carrying the provider's code, message and
/// param (what the synchronous call would have said of a bad request).
async fn fail_named(
    deferral: &Deferral,
    window: &WindowRecord,
    named: Vec<(RequestId, NamedLine)>,
) -> Result<u64, ReconcileError> {
    let now = now_ms();
    let resolutions = named
        .into_iter()
        .map(|(id, line)| {
            let body = json!({"error": {
                "message": line.message,
                "type": "invalid_request_error",
                "param": line.param,
                "code": line.code,
            }});
            Resolution {
                id,
                status: ResolvedStatus::Failed,
                served_by: Some(ServedBy::Batch),
                response_status: Some(400),
                response_body: Some(Bytes::from(body.to_string())),
                error_code: Some(line.code),
                error_message: Some(line.message),
                completed_at: now,
                charge: None,
            }
        })
        .collect();
    Ok(store_refused(deferral, window, resolutions).await?)
}

/// Stores the failures of requests a provider refused by name, then counts
/// and wakes those still open (shared with the inline create's refusals).
pub(crate) async fn store_refused(
    deferral: &Deferral,
    window: &WindowRecord,
    resolutions: Vec<Resolution>,
) -> Result<u64, StoreError> {
    let changed = deferral.store.resolve(&window.id, resolutions).await?;
    for _ in &changed {
        deferral.metrics.record_result(
            &window.key.model,
            ResolvedStatus::Failed,
            ServedBy::Batch,
            None,
        );
    }
    deferral.waiters.wake(&changed);
    Ok(changed.len() as u64)
}

/// Puts every other open request of the window back in the open window of
/// its key, uncounted, and seals that window so it is submitted now.
pub(crate) async fn resubmit_rest(
    deferral: &Deferral,
    window: &WindowRecord,
) -> Result<u64, ReconcileError> {
    let open = deferral.store.open_request_ids(&window.id).await?;
    if open.is_empty() {
        return Ok(0);
    }
    let moved = deferral.store.requeue_uncounted(open, now_ms()).await?;
    let moved: HashSet<RequestId> = moved.into_iter().collect();
    let now = now_ms();
    for open in deferral.store.open_windows().await? {
        if open.key == window.key
            && deferral
                .store
                .seal_window(&open.id, FlushReason::Resubmit, now)
                .await?
        {
            deferral
                .metrics
                .flushes
                .with_label_values(&[FlushReason::Resubmit.as_str()])
                .inc();
        }
    }
    deferral.flush_wake.notify_one();
    Ok(moved.len() as u64)
}
