//! Submitting a window as an Anthropic Message Batch: no file, the
//! requests go inline in the create call, streamed from the store.
//!
//! Two things differ from the file-based dialects ([`super::flusher`]):
//!
//! - **A create refused for named requests.** Anthropic validates the
//!   whole batch at create and answers 400 naming `requests.N`. The named
//!   requests fail to their own callers (400, Anthropic's error body, status
//!   `failed`); the rest go back to a fresh window sealed at once, uncounted
//!   ([`crate::resolution::badlines::resubmit_rest`]).
//! - **Finding the batch after a crash without metadata.** Anthropic
//!   batches carry none, so a window found in `creating` looks through the
//!   key's batches created since it was sealed (less [`CLOCK_SKEW`]): one
//!   that has ended is ours when its results' first `custom_id` is a member
//!   of the window; one still running is ours when its request count fits
//!   the window (no more than the window held, no fewer than are still
//!   open), no live window has it, and it is the only such one. Two such
//!   running batches are ambiguous: the window waits until they end and
//!   their results tell. No batch found means none was made: create.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use super::engine::{now_ms, Deferral};
use super::flusher::SubmitError;
use crate::model::{Dialect, RequestId, ServedBy};
use crate::providers::anthropic::{error_body, named_requests};
use crate::providers::{
    write_input_line, BatchClient, JobPhase, JobView, LineReader, ProviderError,
};
use crate::resolution::badlines::resubmit_rest;
use crate::store::{Resolution, ResolvedStatus, WindowOutcome, WindowRecord, WindowState};

/// What stands for the input file of a window whose requests go inline.
pub const INLINE_FILE: &str = "inline";

/// How far the provider's clock may be behind ours when looking for a batch.
const CLOCK_SKEW: Duration = Duration::from_secs(600);

/// What a create call came to.
pub enum Created {
    Job(Box<JobView>),
    /// Refused for named requests: those failed, the rest were put back,
    /// the window is finished.
    Settled,
}

/// Creates the window's batch, streaming its open requests from the store.
/// The outer error is ours (the store); the inner one the provider's.
pub async fn create(
    deferral: &Deferral,
    client: &BatchClient,
    key: &str,
    window: &WindowRecord,
) -> Result<Result<Created, ProviderError>, SubmitError> {
    // The ids in the order sent, to read `requests.N` back: one id per
    // request (under 8 MB at the 100,000 cap), never the bodies.
    let sent: Arc<Mutex<Vec<RequestId>>> = Arc::default();
    let order = Arc::clone(&sent);
    let endpoint = window.key.endpoint.clone();
    let lines = deferral.store.window_lines(&window.id).map(move |row| {
        let (request, body) = row.map_err(std::io::Error::other)?;
        let mut line = Vec::with_capacity(body.len() + 64);
        write_input_line(
            Dialect::Anthropic,
            request.as_str(),
            &endpoint,
            &body,
            &mut line,
        )
        .map_err(std::io::Error::other)?;
        order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
        Ok::<Bytes, std::io::Error>(Bytes::from(line))
    });
    let err = match client.create_inline(key, lines).await {
        Ok(job) => return Ok(Ok(Created::Job(Box::new(job)))),
        Err(err) => err,
    };
    let ProviderError::Status {
        status: 400,
        message,
        ..
    } = &err
    else {
        return Ok(Err(err));
    };
    let named = named_requests(message);
    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(PoisonError::into_inner));
    let refused: Vec<(RequestId, String)> = named
        .iter()
        .filter_map(|line| {
            let index = usize::try_from(line.line.checked_sub(1)?).ok()?;
            Some((sent.get(index)?.clone(), line.message.clone()))
        })
        .collect();
    if refused.is_empty() {
        return Ok(Err(err));
    }
    let failed = fail_refused(deferral, window, refused).await?;
    let resubmitted = resubmit_rest(deferral, window)
        .await
        .map_err(SubmitError::from)?;
    deferral
        .store
        .finish_window(&window.id, WindowOutcome::Failed, now_ms())
        .await?;
    tracing::info!(window = %window.id, failed, resubmitted, "batch refused at create for named requests: those failed, the rest resubmitted");
    Ok(Ok(Created::Settled))
}

/// Fails each refused request still open in the window: 400 with
/// Anthropic's error body and the provider's message.
async fn fail_refused(
    deferral: &Deferral,
    window: &WindowRecord,
    refused: Vec<(RequestId, String)>,
) -> Result<u64, SubmitError> {
    let now = now_ms();
    let resolutions = refused
        .into_iter()
        .map(|(id, message)| Resolution {
            id,
            status: ResolvedStatus::Failed,
            served_by: Some(ServedBy::Batch),
            response_status: Some(400),
            response_body: Some(Bytes::from(
                error_body("invalid_request_error", &message).to_string(),
            )),
            error_code: Some("invalid_request_error".to_owned()),
            error_message: Some(message),
            completed_at: now,
            charge: None,
        })
        .collect();
    Ok(crate::resolution::badlines::store_refused(deferral, window, resolutions).await?)
}

/// The batch created for a window found in `creating`, if there is one
/// (see the module docs); an error while it cannot yet be told.
pub async fn adopt(
    deferral: &Deferral,
    client: &BatchClient,
    key: &str,
    window: &WindowRecord,
) -> Result<Option<JobView>, SubmitError> {
    let skew = i64::try_from(CLOCK_SKEW.as_secs()).unwrap_or(0);
    let since = window.sealed_at.unwrap_or(window.opened_at) / 1000 - skew;
    let candidates = client.batches_since(key, since).await?;
    if candidates.is_empty() {
        return Ok(None);
    }
    let claimed: HashSet<String> = deferral
        .store
        .windows_in(&[WindowState::Submitted])
        .await?
        .into_iter()
        .filter_map(|w| w.job_id)
        .collect();
    let open = deferral.store.open_request_ids(&window.id).await?.len() as u64;
    let mut running = Vec::new();
    for batch in candidates {
        if claimed.contains(&batch.id) {
            continue;
        }
        if batch.phase.is_terminal() {
            if first_result_is_ours(deferral, client, key, window, &batch).await? {
                return Ok(Some(batch));
            }
        } else if batch.phase == JobPhase::Running && (open..=window.count).contains(&batch.total) {
            running.push(batch);
        }
    }
    match running.len() {
        0 => Ok(None),
        1 => Ok(running.pop()),
        n => {
            tracing::info!(window = %window.id, candidates = n, "several running batches could be the window's; waiting until their results tell");
            Err(SubmitError::Ambiguous)
        }
    }
}

/// Whether an ended batch's first result names a request of `window`.
async fn first_result_is_ours(
    deferral: &Deferral,
    client: &BatchClient,
    key: &str,
    window: &WindowRecord,
    batch: &JobView,
) -> Result<bool, SubmitError> {
    let Some(results) = batch.output_file.as_deref() else {
        return Ok(false);
    };
    let stream = client.download(key, results).await?;
    let mut reader = LineReader::new(Box::pin(stream), deferral.config.batching.max_result_line);
    let Some(line) = reader.next_line().await? else {
        return Ok(false);
    };
    let id = serde_json::from_slice::<Value>(&line)
        .ok()
        .and_then(|v| RequestId::parse(v.get("custom_id")?.as_str()?));
    let Some(id) = id else {
        return Ok(false);
    };
    Ok(deferral
        .store
        .request_by_id(&id)
        .await?
        .is_some_and(|r| r.window_id.as_ref() == Some(&window.id)))
}
