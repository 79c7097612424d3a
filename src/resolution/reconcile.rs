//! Reconciliation: a finished job's output and error files, streamed line
//! by line into stored results. After a completed job every member found in
//! neither file is failed to its caller; after a job that failed, expired
//! or was cancelled, lines the provider did not finish (a failure without
//! an HTTP answer, e.g. `batch_expired`) are left open and the rest go down
//! the failure chain ([`super::fallback`]). Idempotent: re-running it after
//! a crash changes only requests that are still open.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use super::fallback::{self, ChainTally};
use super::spool::{Spool, SpoolError};
use crate::deferral::engine::{now_ms, BatchUpstream, Deferral};
use crate::model::{RequestId, ServedBy};
use crate::pricing::{Charge, TokenUsage};
use crate::providers::{parse_result_line, JobPhase, JobView, LineReader, ProviderError};
use crate::store::{Resolution, ResolvedStatus, StoreError, WindowRecord};

/// Results written to the store per transaction.
const CHUNK: usize = 2_000;

/// Chunks handed to the store and not yet stored, at most.
const STORING: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    LeaseLost(#[from] crate::deferral::lease::LeaseLost),
    #[error("storing a chunk of results did not finish: {0}")]
    Storing(#[from] tokio::task::JoinError),
}

/// What one reconciliation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub succeeded: u64,
    pub failed: u64,
    pub unmatched_lines: u64,
    /// Lines for requests of ours that were no longer open in the window.
    pub not_open: u64,
    /// Lines of a job that ended badly which the provider never ran.
    pub unfinished: u64,
    pub missing: u64,
    /// What the failure chain did with the unfinished requests.
    pub chain: ChainTally,
    /// Time spent downloading and spooling the result files.
    pub spooling: Duration,
    /// Time spent storing their results.
    pub storing: Duration,
}

impl Tally {
    fn add(&mut self, stored: Stored) {
        self.succeeded += stored.succeeded;
        self.failed += stored.failed;
        self.not_open += stored.not_open;
    }
}

/// One result line read: the result, and whether the provider answered it
/// at all (false for a failure without an HTTP answer, e.g. `batch_expired`).
pub struct ResultLine {
    pub resolution: Resolution,
    pub answered: bool,
}

/// Maps one result line to a resolution; `None` for a line that names no
/// request of ours (logged and counted by the caller).
pub fn resolution_of(line: &[u8], now: i64) -> Result<Resolution, Option<String>> {
    result_line(line, now).map(|l| l.resolution)
}

/// [`resolution_of`], saying also whether the line was answered.
pub fn result_line(line: &[u8], now: i64) -> Result<ResultLine, Option<String>> {
    let outcome = parse_result_line(line).map_err(|e| Some(e.to_string()))?;
    let answered = outcome.error.is_none();
    let id = RequestId::parse(&outcome.custom_id).ok_or(None)?;
    let succeeded = outcome.succeeded();
    let (error_code, error_message) = match (&outcome.error, succeeded) {
        (Some(f), _) => (Some(f.code.clone()), Some(f.message.clone())),
        (None, true) => (None, None),
        (None, false) => (
            Some(format!("upstream_{}", outcome.status_code)),
            Some(upstream_message(&outcome.body)),
        ),
    };
    let expired = outcome
        .error
        .as_ref()
        .is_some_and(|f| f.code == "batch_expired");
    let resolution = Resolution {
        id,
        status: if succeeded {
            ResolvedStatus::Succeeded
        } else if expired {
            ResolvedStatus::Expired
        } else {
            ResolvedStatus::Failed
        },
        served_by: Some(ServedBy::Batch),
        response_status: Some(outcome.status_code),
        response_body: Some(outcome.body),
        error_code,
        error_message,
        completed_at: now,
        // Priced when its chunk is stored (`store_chunk`).
        charge: None,
    };
    Ok(ResultLine {
        resolution,
        answered,
    })
}

/// The `model` an answer names.
fn answer_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

pub(crate) fn upstream_message(body: &Bytes) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "the upstream refused this request".to_owned())
}

/// Applies one result file: spooled to disk first ([`Spool`]), then taken
/// in the store's order and stored a chunk per transaction, each chunk
/// while the next is read and parsed, waking waiters chunk by chunk.
/// Lines without an answer are skipped when the job did not complete: the
/// failure chain decides what becomes of those requests.
async fn apply_file(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: &str,
    window: &WindowRecord,
    job: &JobView,
    file_id: &str,
    tally: &mut Tally,
) -> Result<(), ReconcileError> {
    let started = Instant::now();
    let stream = upstream
        .client
        .scoped(&window.key.scope)
        .download(key, file_id)
        .await?;
    let mut reader = LineReader::new(Box::pin(stream), deferral.config.batching.max_result_line);
    let mut spool = Spool::fill(&mut reader, |skipped| {
        tally.unmatched_lines += 1;
        tracing::warn!(window = %window.id, file = file_id, reason = %skipped.reason, "result line skipped");
    })
    .await?;
    if spool.repeated > 0 {
        tracing::warn!(window = %window.id, file = file_id, lines = spool.repeated, "repeated result lines skipped; the first of each was kept");
    }
    let spooled = Instant::now();
    tally.spooling += spooled - started;
    tracing::debug!(window = %window.id, file = file_id, lines = spool.left(), ms = (spooled - started).as_millis() as u64, "result file spooled");
    // Up to STORING chunks wait in the store's queue while the next one is
    // read and parsed, so its connection never waits for the parse.
    let mut storing = JoinSet::new();
    while let Some(chunk) = next_chunk(window, job, file_id, &mut spool, tally).await? {
        if storing.len() >= STORING {
            tally.add(next_stored(&mut storing).await?);
        }
        storing.spawn(store_chunk(deferral.clone(), window.clone(), chunk));
    }
    while !storing.is_empty() {
        tally.add(next_stored(&mut storing).await?);
    }
    tally.storing += spooled.elapsed();
    Ok(())
}

/// A chunk of results, with what each one counts for in the metrics once
/// stored.
struct Chunk {
    resolutions: Vec<Resolution>,
    usage: Vec<Option<TokenUsage>>,
    /// The answer's `model`, where a window mixes models.
    models: Vec<Option<String>>,
}

/// The results of the next lines of the spool; `None` once it is empty.
async fn next_chunk(
    window: &WindowRecord,
    job: &JobView,
    file_id: &str,
    spool: &mut Spool,
    tally: &mut Tally,
) -> Result<Option<Chunk>, ReconcileError> {
    while spool.left() > 0 {
        let mixed = window.key.model == crate::model::MIXED_MODELS;
        let mut chunk = Chunk {
            resolutions: Vec::with_capacity(CHUNK),
            usage: Vec::with_capacity(CHUNK),
            models: Vec::with_capacity(CHUNK),
        };
        for line in spool.take(CHUNK).await? {
            match result_line(&line, now_ms()) {
                Ok(ResultLine {
                    answered: false, ..
                }) if job.phase != JobPhase::Completed => tally.unfinished += 1,
                Ok(ResultLine { resolution, .. }) => {
                    chunk.usage.push(
                        resolution
                            .response_body
                            .as_deref()
                            .and_then(TokenUsage::from_body),
                    );
                    chunk.models.push(
                        resolution
                            .response_body
                            .as_deref()
                            .filter(|_| mixed)
                            .and_then(answer_model),
                    );
                    chunk.resolutions.push(resolution);
                }
                Err(reason) => {
                    tally.unmatched_lines += 1;
                    tracing::warn!(window = %window.id, file = file_id, reason = reason.as_deref().unwrap_or("foreign custom_id"), "result line skipped");
                }
            }
        }
        if !chunk.resolutions.is_empty() {
            return Ok(Some(chunk));
        }
    }
    Ok(None)
}

/// What storing one chunk did.
#[derive(Default)]
struct Stored {
    succeeded: u64,
    failed: u64,
    /// Results whose request was no longer open in this window: answered
    /// before a crash, by the output file before the error file, cancelled
    /// or moved to another window.
    not_open: u64,
}

/// The next chunk the store finished with.
async fn next_stored(
    storing: &mut JoinSet<Result<Stored, ReconcileError>>,
) -> Result<Stored, ReconcileError> {
    match storing.join_next().await {
        Some(stored) => stored?,
        None => Ok(Stored::default()),
    }
}

/// Stores one chunk, then counts and wakes what it changed.
async fn store_chunk(
    deferral: Deferral,
    window: WindowRecord,
    chunk: Chunk,
) -> Result<Stored, ReconcileError> {
    // Counted once stored, and only what the store applied: a re-run after
    // a crash must not count the same answers twice.
    // A window of several models (Anthropic's) counts and prices each
    // result under the model that answered it.
    let mixed = window.key.model == crate::model::MIXED_MODELS;
    let models: Vec<String> = chunk
        .models
        .iter()
        .map(|m| match m.as_deref() {
            Some(model) if mixed => model.to_owned(),
            _ => window.key.model.clone(),
        })
        .collect();
    let mut resolutions = chunk.resolutions;
    for ((r, usage), model) in resolutions.iter_mut().zip(chunk.usage).zip(&models) {
        let served_by = r.served_by.unwrap_or(ServedBy::Batch);
        let price = deferral.config.prices.for_call(&window.key.upstream, model);
        r.charge = usage.map(|usage| Charge::of(usage, price, served_by));
    }
    let facts: Vec<_> = resolutions
        .iter()
        .map(|r| {
            (
                r.id.clone(),
                r.status,
                r.served_by.unwrap_or(ServedBy::Batch),
                r.charge,
            )
        })
        .collect();
    let changed = deferral.store.resolve(&window.id, resolutions).await?;
    let applied: HashSet<&RequestId> = changed.iter().collect();
    let mut stored = Stored::default();
    for ((id, status, served_by, charge), model) in facts.iter().zip(&models) {
        if !applied.contains(id) {
            stored.not_open += 1;
            continue;
        }
        if *status == ResolvedStatus::Succeeded {
            stored.succeeded += 1;
        } else {
            stored.failed += 1;
        }
        deferral
            .metrics
            .record_result(model, *status, *served_by, charge.as_ref());
    }
    deferral.waiters.wake(&changed);
    Ok(stored)
}

/// Reconciles a job that reached a terminal phase.
pub async fn reconcile(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: &str,
    window: &WindowRecord,
    job: &JobView,
) -> Result<Tally, ReconcileError> {
    let mut tally = Tally::default();
    for file in [&job.output_file, &job.error_file].into_iter().flatten() {
        apply_file(deferral, upstream, key, window, job, file, &mut tally).await?;
    }
    if job.phase != JobPhase::Completed {
        // Refused for named lines: only those fail, the rest go again.
        if let Some(chain) =
            super::badlines::settle_named_lines(deferral, upstream, key, window, job).await?
        {
            tally.chain = chain;
            return Ok(tally);
        }
        tally.chain =
            fallback::settle_unfinished(deferral, upstream, Some(key), window, job).await?;
        tally.missing = tally.chain.failed;
        return Ok(tally);
    }
    let missing = deferral
        .store
        .fail_unresolved(
            &window.id,
            "missing_result",
            "the provider returned no result for this request",
            now_ms(),
        )
        .await?;
    tally.missing = missing.len() as u64;
    deferral.waiters.wake(&missing);
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_line_resolves_its_own_request() {
        let id = RequestId::generate();
        let line = format!(
            r#"{{"custom_id":"{id}","response":{{"status_code":200,"body":{{"ok":true}}}}}}"#
        );
        let r = resolution_of(line.as_bytes(), 5).unwrap();
        assert_eq!(r.id, id);
        assert_eq!(r.status, ResolvedStatus::Succeeded);
        assert_eq!(r.response_status, Some(200));
        assert_eq!(r.error_code, None);
    }

    #[test]
    fn per_line_http_error_keeps_status_and_message() {
        let id = RequestId::generate();
        let line = format!(
            r#"{{"custom_id":"{id}","response":{{"status_code":422,"body":{{"error":{{"message":"too long"}}}}}}}}"#
        );
        let r = resolution_of(line.as_bytes(), 5).unwrap();
        assert_eq!(r.status, ResolvedStatus::Failed);
        assert_eq!(r.response_status, Some(422));
        assert_eq!(r.error_message.as_deref(), Some("too long"));
    }

    #[test]
    fn foreign_custom_id_is_skipped_not_resolved() {
        let line = br#"{"custom_id":"someone-else","response":{"status_code":200,"body":{}}}"#;
        assert_eq!(resolution_of(line, 0).unwrap_err(), None);
    }

    #[test]
    fn expired_line_marks_the_request_expired() {
        let id = RequestId::generate();
        let line = format!(
            r#"{{"custom_id":"{id}","response":null,"error":{{"code":"batch_expired","message":"late"}}}}"#
        );
        let r = resolution_of(line.as_bytes(), 0).unwrap();
        assert_eq!(r.status, ResolvedStatus::Expired);
        assert_eq!(r.response_status, Some(504));
    }
}
