//! Reconciliation: a finished job's output and error files, streamed line
//! by line into stored results. After a completed job every member found in
//! neither file is failed to its caller; after a job that failed, expired
//! or was cancelled, lines the provider did not finish (a failure without
//! an HTTP answer, e.g. `batch_expired`) are left open and the rest go down
//! the failure chain ([`super::fallback`]). Idempotent: re-running it after
//! a crash changes only requests that are still open.

use std::collections::HashSet;

use bytes::Bytes;

use super::fallback::{self, ChainTally};
use super::spool::{Spool, SpoolError};
use crate::deferral::engine::{now_ms, BatchUpstream, Deferral};
use crate::model::{RequestId, ServedBy};
use crate::pricing::TokenUsage;
use crate::providers::{parse_result_line, JobPhase, JobView, LineReader, ProviderError};
use crate::store::{Resolution, ResolvedStatus, StoreError, WindowRecord};

/// Open requests read per page, and at most as many results written per
/// transaction, when a spooled file is taken in the store's order.
const CHUNK: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
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
    };
    Ok(ResultLine {
        resolution,
        answered,
    })
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
/// in the store's order, a page of the window's open requests at a time,
/// and stored a chunk per transaction, waking waiters chunk by chunk.
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
    let stream = upstream.client.download(key, file_id).await?;
    let mut reader = LineReader::new(Box::pin(stream));
    let mut spool = Spool::fill(&mut reader, |skipped| {
        tally.unmatched_lines += 1;
        tracing::warn!(window = %window.id, file = file_id, reason = %skipped.reason, "result line skipped");
    })
    .await?;
    if spool.repeated > 0 {
        tracing::warn!(window = %window.id, file = file_id, lines = spool.repeated, "repeated result lines skipped; the first of each was kept");
    }
    // Each chunk is stored while the next one is read and parsed: the
    // commit's fsync leaves the CPU free for it.
    let mut after = 0;
    let mut ready = next_chunk(
        deferral, window, job, file_id, &mut spool, &mut after, tally,
    )
    .await?;
    while let Some(chunk) = ready {
        let (_, next) = tokio::try_join!(
            store_chunk(deferral, window, chunk),
            next_chunk(deferral, window, job, file_id, &mut spool, &mut after, tally),
        )?;
        ready = next;
    }
    // Lines for requests of ours that are not open in this window: already
    // answered (a re-run after a crash, or the output file before the error
    // file), cancelled, or moved elsewhere.
    tally.not_open += spool.left() as u64;
    Ok(())
}

/// The results of the next page of the window's open requests that have a
/// line in the spool; `None` once the window or the spool is exhausted.
async fn next_chunk(
    deferral: &Deferral,
    window: &WindowRecord,
    job: &JobView,
    file_id: &str,
    spool: &mut Spool,
    after: &mut i64,
    tally: &mut Tally,
) -> Result<Option<Vec<Resolution>>, ReconcileError> {
    loop {
        if spool.left() == 0 {
            return Ok(None);
        }
        let page = deferral
            .store
            .open_members(&window.id, *after, CHUNK as u32)
            .await?;
        let Some(&(last, _)) = page.last() else {
            return Ok(None);
        };
        *after = last;
        let ids: Vec<RequestId> = page.into_iter().map(|(_, id)| id).collect();
        let mut chunk = Vec::with_capacity(ids.len());
        for line in spool.take(&ids).await? {
            match result_line(&line, now_ms()) {
                Ok(ResultLine {
                    answered: false, ..
                }) if job.phase != JobPhase::Completed => tally.unfinished += 1,
                Ok(ResultLine { resolution, .. }) => {
                    if resolution.status == ResolvedStatus::Succeeded {
                        tally.succeeded += 1;
                    } else {
                        tally.failed += 1;
                    }
                    chunk.push(resolution);
                }
                Err(reason) => {
                    tally.unmatched_lines += 1;
                    tracing::warn!(window = %window.id, file = file_id, reason = reason.as_deref().unwrap_or("foreign custom_id"), "result line skipped");
                }
            }
        }
        if !chunk.is_empty() {
            return Ok(Some(chunk));
        }
    }
}

async fn store_chunk(
    deferral: &Deferral,
    window: &WindowRecord,
    chunk: Vec<Resolution>,
) -> Result<(), ReconcileError> {
    // Counted once stored, and only what the store applied: a re-run after
    // a crash must not count the same answers twice.
    let facts: Vec<_> = chunk
        .iter()
        .map(|r| {
            let usage = r.response_body.as_deref().and_then(TokenUsage::from_body);
            (
                r.id.clone(),
                r.status,
                r.served_by.unwrap_or(ServedBy::Batch),
                usage,
            )
        })
        .collect();
    let changed = deferral.store.resolve(&window.id, chunk).await?;
    let applied: HashSet<&RequestId> = changed.iter().collect();
    let price = deferral.config.prices.for_model(&window.key.model);
    for (id, status, served_by, usage) in &facts {
        if applied.contains(id) {
            deferral
                .metrics
                .record_result(&window.key.model, *status, *served_by, *usage, price);
        }
    }
    deferral.waiters.wake(&changed);
    Ok(())
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
