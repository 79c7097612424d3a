//! The batch engine both dialects share: input validation, a job's timeline,
//! and the result files it writes when it ends.
//!
//! A job's progress is a pure function of the time since it was created
//! (`job_duration` + lines × `line_duration`), computed lazily whenever the
//! job is read. Reaching a terminal stage writes the output and error files
//! once. Dialect modules only parse requests and render objects.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use serde_json::{json, Value};

use super::answers::{canonical_hash, respond};
use super::error::ApiError;
use super::faults::{JobOutcome, LineFailures};
use super::files::{store_result, FileKind};
use super::state::{unix_now, JobRecord, Sim};
use super::SimOptions;
use crate::model::Dialect;

/// One request of a job.
#[derive(Clone, Debug)]
pub struct Line {
    pub custom_id: String,
    /// The body as the endpoint receives it (Mistral: job model filled in).
    pub body: Value,
    /// An injected failure status, fixed when the job was created.
    pub injected: Option<u16>,
}

/// A job-level input problem (OpenAI `errors.data[]`, Mistral `errors[]`).
#[derive(Clone, Debug, PartialEq)]
pub struct InputError {
    pub code: String,
    pub line: Option<usize>,
    pub message: String,
    pub param: Option<String>,
}

impl InputError {
    fn at(code: &str, line: usize, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            line: Some(line),
            message: message.into(),
            param: None,
        }
    }

    pub fn job(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            line: None,
            message: message.into(),
            param: None,
        }
    }
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Queued,
    Running,
    Finalizing,
    Cancelling,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl Stage {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Expired | Self::Cancelled
        )
    }

    pub fn word(self, dialect: Dialect) -> &'static str {
        match dialect {
            Dialect::Mistral => match self {
                Self::Queued => "QUEUED",
                Self::Running | Self::Finalizing => "RUNNING",
                Self::Cancelling => "CANCELLATION_REQUESTED",
                Self::Completed => "SUCCESS",
                Self::Failed => "FAILED",
                Self::Expired => "TIMEOUT_EXCEEDED",
                Self::Cancelled => "CANCELLED",
            },
            Dialect::Openai => match self {
                Self::Queued => "validating",
                Self::Running => "in_progress",
                Self::Finalizing => "finalizing",
                Self::Cancelling => "cancelling",
                Self::Completed => "completed",
                Self::Failed => "failed",
                Self::Expired => "expired",
                Self::Cancelled => "cancelled",
            },
            // Anthropic has one terminal status; how lines ended is in
            // the results.
            Dialect::Anthropic => match self {
                Self::Queued | Self::Running | Self::Finalizing => "in_progress",
                Self::Cancelling => "canceling",
                Self::Completed | Self::Failed | Self::Expired | Self::Cancelled => "ended",
            },
        }
    }
}

/// What a job looks like at one moment.
#[derive(Clone, Debug)]
pub struct View {
    pub stage: Stage,
    pub total: usize,
    pub processed: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub started_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub ended_at: Option<u64>,
    pub output_file: Option<String>,
    pub error_file: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What the dialect module hands over to create a job.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub id: String,
    pub dialect: Dialect,
    pub endpoint: String,
    pub model: Option<String>,
    pub metadata: Option<Value>,
    pub input_file_ids: Vec<String>,
    pub inline: bool,
    pub credential: Option<String>,
    /// Dialect extras echoed back (`completion_window`, `timeout_hours`, ...).
    pub extra: Value,
}

#[derive(Clone, Debug)]
struct Settled {
    stage: Stage,
    at: u64,
    processed: usize,
    output_file: Option<String>,
    error_file: Option<String>,
    input_tokens: u64,
    output_tokens: u64,
}

pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub created_at: u64,
    pub lines: Vec<Line>,
    pub errors: Vec<InputError>,
    /// Per line: did it succeed (true) when processed.
    ok: Vec<bool>,
    created: Instant,
    outcome: Option<JobOutcome>,
    validate_end: Duration,
    run_end: Duration,
    finalize_end: Duration,
    cancel_at: Option<Duration>,
    cancel_settle: Duration,
    settled: Option<Settled>,
}

impl Job {
    pub fn new(
        spec: JobSpec,
        lines: Vec<Line>,
        errors: Vec<InputError>,
        outcome: Option<JobOutcome>,
        opts: &SimOptions,
    ) -> Self {
        let d = opts.job_duration;
        let per_line = opts.line_duration.saturating_mul(lines.len() as u32);
        let ok = lines
            .iter()
            .map(|l| l.injected.is_none() && respond(&spec.endpoint, &l.body).is_ok())
            .collect();
        Self {
            id: spec.id.clone(),
            spec,
            created_at: unix_now(),
            lines,
            errors,
            ok,
            created: Instant::now(),
            outcome,
            validate_end: d / 4,
            run_end: d * 3 / 4 + per_line,
            finalize_end: d + per_line,
            cancel_at: None,
            cancel_settle: opts.cancel_duration,
            settled: None,
        }
    }

    /// Fails the job at once with `error`, as a provider does with a create
    /// it refuses at admission (an enqueued-token limit).
    pub fn refuse(&mut self, error: InputError) {
        self.errors.push(error);
        self.validate_end = Duration::ZERO;
    }

    fn unix_at(&self, offset: Duration) -> u64 {
        self.created_at + offset.as_secs()
    }

    fn progress(&self, elapsed: Duration) -> usize {
        let total = self.lines.len();
        if elapsed <= self.validate_end {
            return 0;
        }
        if elapsed >= self.run_end {
            return total;
        }
        let span = (self.run_end - self.validate_end).as_secs_f64();
        let done = (elapsed - self.validate_end).as_secs_f64() / span;
        ((total as f64) * done).floor() as usize
    }

    fn half(&self) -> usize {
        self.lines.len() / 2
    }

    /// Bring the job up to `now`, writing its result files if it just ended.
    pub fn advance(&mut self, sim: &Sim, now: Instant) -> View {
        if self.settled.is_none() {
            let elapsed = now.saturating_duration_since(self.created);
            if let Some((stage, processed)) = self.due_terminal(elapsed) {
                self.settle(sim, stage, processed);
            }
        }
        self.view(now)
    }

    /// The terminal stage reached by `elapsed`, with the lines done.
    fn due_terminal(&self, elapsed: Duration) -> Option<(Stage, usize)> {
        if !self.errors.is_empty() || self.outcome == Some(JobOutcome::Failed) {
            return (elapsed >= self.validate_end).then_some((Stage::Failed, 0));
        }
        if let Some(at) = self.cancel_at {
            let done = self.capped_progress(at);
            return (elapsed >= at + self.cancel_settle).then_some((Stage::Cancelled, done));
        }
        match self.outcome {
            Some(JobOutcome::Stuck) => None,
            Some(JobOutcome::Expired) => {
                (elapsed >= self.run_end).then(|| (Stage::Expired, self.half()))
            }
            _ => (elapsed >= self.finalize_end).then_some((Stage::Completed, self.lines.len())),
        }
    }

    /// Progress, held at half for jobs that expire or are stuck.
    fn capped_progress(&self, elapsed: Duration) -> usize {
        let p = self.progress(elapsed);
        match self.outcome {
            Some(JobOutcome::Stuck | JobOutcome::Expired) => p.min(self.half()),
            _ => p,
        }
    }

    fn view(&self, now: Instant) -> View {
        let elapsed = now.saturating_duration_since(self.created);
        let total = self.lines.len();
        if let Some(s) = &self.settled {
            let (succeeded, failed) = self.counts(s.processed);
            return View {
                stage: s.stage,
                total,
                processed: s.processed,
                succeeded,
                failed,
                started_at: (s.stage != Stage::Failed)
                    .then(|| self.unix_at(self.validate_end).min(s.at)),
                finalizing_at: (s.stage == Stage::Completed)
                    .then(|| self.unix_at(self.run_end).min(s.at)),
                cancelling_at: self.cancel_at.map(|c| self.unix_at(c)),
                ended_at: Some(s.at),
                output_file: s.output_file.clone(),
                error_file: s.error_file.clone(),
                input_tokens: s.input_tokens,
                output_tokens: s.output_tokens,
            };
        }
        let (stage, processed) = if let Some(at) = self.cancel_at {
            (Stage::Cancelling, self.capped_progress(at))
        } else if elapsed < self.validate_end {
            (Stage::Queued, 0)
        } else if elapsed < self.run_end || self.outcome == Some(JobOutcome::Stuck) {
            (Stage::Running, self.capped_progress(elapsed))
        } else if self.spec.dialect == Dialect::Openai {
            (Stage::Finalizing, total)
        } else {
            (Stage::Running, total)
        };
        let (succeeded, failed) = self.counts(processed);
        View {
            stage,
            total,
            processed,
            succeeded,
            failed,
            started_at: (elapsed >= self.validate_end).then(|| self.unix_at(self.validate_end)),
            finalizing_at: (stage == Stage::Finalizing).then(|| self.unix_at(self.run_end)),
            cancelling_at: self.cancel_at.map(|c| self.unix_at(c)),
            ended_at: None,
            output_file: None,
            error_file: None,
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    fn counts(&self, processed: usize) -> (usize, usize) {
        let ok = self.ok.iter().take(processed).filter(|ok| **ok).count();
        (ok, processed.min(self.ok.len()) - ok)
    }

    /// Ask to cancel; refused once the job has ended.
    pub fn cancel(&mut self, sim: &Sim, now: Instant) -> Result<View, ApiError> {
        let view = self.advance(sim, now);
        if view.stage.is_terminal() {
            return Err(ApiError::conflict(format!(
                "cannot cancel a batch with status {}",
                view.stage.word(self.spec.dialect)
            )));
        }
        if self.cancel_at.is_none() {
            self.cancel_at = Some(now.saturating_duration_since(self.created));
        }
        Ok(self.advance(sim, now))
    }

    /// Let a stuck job go on: it ends no earlier than its normal timeline.
    pub fn unstick(&mut self, now: Instant) {
        if self.outcome == Some(JobOutcome::Stuck) && self.settled.is_none() {
            self.outcome = None;
            let elapsed = now.saturating_duration_since(self.created);
            let tail = self.finalize_end - self.run_end;
            self.run_end = self.run_end.max(elapsed);
            self.finalize_end = self.run_end + tail;
        }
    }

    /// Make every pending step due now (stuck jobs stay stuck).
    pub fn hurry(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.created);
        self.validate_end = self.validate_end.min(elapsed);
        self.run_end = self.run_end.min(elapsed);
        self.finalize_end = self.finalize_end.min(elapsed);
        self.cancel_settle = Duration::ZERO;
    }

    /// Write the result files of a job that just ended.
    fn settle(&mut self, sim: &Sim, stage: Stage, processed: usize) {
        let dialect = self.spec.dialect;
        let mut output = Vec::new();
        let mut errors = Vec::new();
        let (mut input_tokens, mut output_tokens) = (0, 0);
        if stage != Stage::Failed {
            for (i, line) in self.lines.iter().enumerate() {
                if i < processed {
                    let result = match line.injected {
                        Some(status) => Err(injected_error(status)),
                        None => respond(&self.spec.endpoint, &line.body),
                    };
                    match result {
                        Ok(body) => {
                            // Chat and the rest count prompt and completion
                            // tokens; the Responses API input and output.
                            let usage = &body["usage"];
                            input_tokens += usage["prompt_tokens"]
                                .as_u64()
                                .or(usage["input_tokens"].as_u64())
                                .unwrap_or(0);
                            output_tokens += usage["completion_tokens"]
                                .as_u64()
                                .or(usage["output_tokens"].as_u64())
                                .unwrap_or(0);
                            output.push(success_line(dialect, &self.id, &line.custom_id, body));
                        }
                        Err(err) => {
                            errors.push(http_error_line(dialect, &self.id, &line.custom_id, &err))
                        }
                    }
                } else if stage == Stage::Expired {
                    errors.push(expired_line(dialect, &self.id, &line.custom_id));
                } else if stage == Stage::Cancelled && dialect == Dialect::Anthropic {
                    errors.push(super::anthropic::canceled_line(&line.custom_id));
                }
            }
        }
        if dialect == Dialect::Anthropic {
            // One results file holds every result type.
            output.append(&mut errors);
        }
        let mut rng = rand::thread_rng();
        output.shuffle(&mut rng);
        errors.shuffle(&mut rng);
        let write = |kind: FileKind, lines: &[Value]| -> Option<String> {
            if lines.is_empty() {
                return None;
            }
            let mut data = String::new();
            for line in lines {
                data.push_str(&line.to_string());
                data.push('\n');
            }
            Some(store_result(sim, kind, &self.id, data.into()))
        };
        let output_file = write(FileKind::Output(dialect), &output);
        let error_file = write(FileKind::Errors(dialect), &errors);
        self.settled = Some(Settled {
            stage,
            at: unix_now(),
            processed,
            output_file,
            error_file,
            input_tokens,
            output_tokens,
        });
    }

    pub fn record(&mut self, sim: &Sim, now: Instant) -> JobRecord {
        let view = self.advance(sim, now);
        JobRecord {
            id: self.id.clone(),
            dialect: self.spec.dialect,
            model: self.spec.model.clone(),
            endpoint: self.spec.endpoint.clone(),
            metadata: self.spec.metadata.clone(),
            status: view.stage.word(self.spec.dialect).to_owned(),
            custom_ids: self.lines.iter().map(|l| l.custom_id.clone()).collect(),
            input_file_ids: self.spec.input_file_ids.clone(),
            output_file_id: view.output_file,
            error_file_id: view.error_file,
            credential: self.spec.credential.clone(),
            inline: self.spec.inline,
        }
    }
}

fn injected_error(status: u16) -> ApiError {
    let status = axum::http::StatusCode::from_u16(status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    ApiError::injected(status, None)
}

fn line_id(job_id: &str, custom_id: &str) -> String {
    canonical_hash(&json!([job_id, custom_id]))[..24].to_owned()
}

fn success_line(dialect: Dialect, job_id: &str, custom_id: &str, body: Value) -> Value {
    match dialect {
        Dialect::Openai => {
            let h = line_id(job_id, custom_id);
            json!({
                "id": format!("batch_req_{h}"),
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": format!("req_{h}"), "body": body},
                "error": null,
            })
        }
        Dialect::Mistral => json!({
            "custom_id": custom_id,
            "response": {"status_code": 200, "body": body},
        }),
        Dialect::Anthropic => json!({
            "custom_id": custom_id,
            "result": {"type": "succeeded", "message": body},
        }),
    }
}

/// A line the endpoint refused: OpenAI keeps top-level `error` null; Mistral
/// also writes the message as a bare string in `error` (seen in the wild).
fn http_error_line(dialect: Dialect, job_id: &str, custom_id: &str, err: &ApiError) -> Value {
    match dialect {
        Dialect::Openai => {
            let h = line_id(job_id, custom_id);
            json!({
                "id": format!("batch_req_{h}"),
                "custom_id": custom_id,
                "response": {
                    "status_code": err.status.as_u16(),
                    "request_id": format!("req_{h}"),
                    "body": err.envelope(),
                },
                "error": null,
            })
        }
        Dialect::Mistral => json!({
            "custom_id": custom_id,
            "response": {"status_code": err.status.as_u16(), "body": err.envelope()},
            "error": err.message,
        }),
        Dialect::Anthropic => json!({
            "custom_id": custom_id,
            "result": {"type": "errored", "error": super::anthropic::envelope(err)},
        }),
    }
}

fn expired_line(dialect: Dialect, job_id: &str, custom_id: &str) -> Value {
    match dialect {
        Dialect::Openai => json!({
            "id": format!("batch_req_{}", line_id(job_id, custom_id)),
            "custom_id": custom_id,
            "response": null,
            "error": {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window expired.",
            },
        }),
        Dialect::Mistral => json!({
            "custom_id": custom_id,
            "response": null,
            "error": {
                "code": "TIMEOUT_EXCEEDED",
                "message": "This request was not processed before the job timed out.",
            },
        }),
        Dialect::Anthropic => json!({"custom_id": custom_id, "result": {"type": "expired"}}),
    }
}

impl InputError {
    /// A line refused with `code` by [`Fault::InvalidLine`](super::Fault),
    /// worded and with the `param` OpenAI's validation gives that code
    /// (reference section 0).
    pub fn injected(code: &str, line: usize) -> Self {
        let (param, message) = match code {
            "invalid_url" => (
                Some("url"),
                "The URL provided for this request does not match the batch endpoint.",
            ),
            "mismatched_model" => (
                Some("body.model"),
                "The model provided for this request does not match the other requests in the batch.",
            ),
            "streaming_unsupported" => (
                Some("body.stream"),
                "Streaming is not supported in batch requests.",
            ),
            "invalid_request" => (Some("body.model"), "The request is missing a model."),
            "model_not_found" => (
                Some("body.model"),
                "The model provided for this request does not exist or you do not have access to it.",
            ),
            "missing_required_parameter" => (Some("custom_id"), "Missing required parameter."),
            "duplicate_custom_id" => (
                Some("custom_id"),
                "The custom_id for this request is a duplicate of another request.",
            ),
            _ => (None, "This line of the input file is invalid."),
        };
        Self {
            code: code.to_owned(),
            line: Some(line),
            message: format!("Line {line}: {message}"),
            param: param.map(str::to_owned),
        }
    }
}

/// OpenAI's validation stops at the first bad line: only the earliest
/// error is reported (errors without a line, about the whole file, last).
pub fn first_error_only(errors: &mut Vec<InputError>) {
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    errors.truncate(1);
}

/// Checks shared by both dialects on a list of `(line number, custom_id,
/// body)`: unique custom ids, no `stream`, request-count cap.
pub fn check_common(
    items: &[(usize, String, Value)],
    max_requests: usize,
    errors: &mut Vec<InputError>,
) {
    let mut seen = HashSet::new();
    for (n, custom_id, body) in items {
        if !seen.insert(custom_id.as_str()) {
            errors.push(InputError::at(
                "duplicate_custom_id",
                *n,
                format!("The custom_id '{custom_id}' is used more than once in this batch."),
            ));
        }
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            let mut e = InputError::at(
                "streaming_unsupported",
                *n,
                "Streaming is not supported in batch requests (`body.stream` must not be true).",
            );
            e.param = Some("body.stream".to_owned());
            errors.push(e);
        }
    }
    if items.len() > max_requests {
        errors.push(InputError::job(
            "too_many_tasks",
            format!(
                "The batch has {} requests, more than the limit of {max_requests}.",
                items.len()
            ),
        ));
    }
    if items.is_empty() && errors.is_empty() {
        errors.push(InputError::job("empty_file", "The batch has no requests."));
    }
}

/// Split a JSONL file into `(line number, parsed object)`, reporting lines
/// that are not JSON objects.
pub fn parse_jsonl(data: &[u8], errors: &mut Vec<InputError>) -> Vec<(usize, Value)> {
    let mut out = Vec::new();
    for (i, raw) in data.split(|b| *b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(raw) {
            Ok(v) if v.is_object() => out.push((i + 1, v)),
            _ => errors.push(InputError::at(
                "invalid_json_line",
                i + 1,
                format!("Line {} is not a valid JSON object.", i + 1),
            )),
        }
    }
    out
}

/// The line failures in force, applied to new lines.
pub fn mark_failures(lines: &mut [Line], failures: &LineFailures) {
    for line in lines {
        line.injected = failures.status_for(&line.custom_id);
    }
}
