//! Provider batch APIs (files and jobs) for each dialect, behind one client.
//! Anthropic's inline batches, which have no files, are in [`anthropic`]
//! (wire) and [`BatchClient::create_inline`].
//!
//! Owns: the wire formats ([`lines`], [`jobs`]), the HTTP calls, and their
//! retries ([`retry`]). Does not own: when to submit or poll (the deferral
//! and resolution workers decide), nor what is stored.

pub mod anthropic;
pub mod files;
pub mod jobs;
pub mod lines;
pub mod reader;
pub mod retry;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;

pub use files::{input_filename, window_of_input, FileView};
pub use jobs::{JobPage, JobPhase, JobView, NamedLine, WINDOW_METADATA_KEY};
pub use lines::{parse_result_line, write_input_line, LineError, LineFailure, LineOutcome};
pub use reader::{LineReader, RESULT_TOO_LARGE};
pub use retry::{RetryObserver, RetryPolicy};

use crate::model::{Dialect, Scope, WindowId};

/// How an upstream files or jobs call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{operation}: upstream answered {status}: {message}")]
    Status {
        operation: &'static str,
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{operation}: upstream unreachable: {detail}")]
    Transport {
        operation: &'static str,
        detail: String,
        timeout: bool,
    },
    #[error("{operation}: unexpected upstream answer: {detail}")]
    Decode {
        operation: &'static str,
        detail: String,
    },
}

impl ProviderError {
    /// 429, 5xx and transport failures may pass; anything else will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                (*status == 429 || *status >= 500)
                    && !self.is_permanent()
                    && !self.is_enqueued_token_limit()
            }
            Self::Transport { .. } => true,
            Self::Decode { .. } => false,
        }
    }

    /// Whether waiting cannot help: a client error other than 429 (400,
    /// 401, 403, 404, 422 …), a 429 for a quota or spend limit, or an answer
    /// that cannot be read.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Status {
                status, message, ..
            } => {
                (400..500).contains(status) && *status != 429 && *status != 408
                    || *status == 429 && is_spend_limit(message)
            }
            Self::Transport { .. } => false,
            Self::Decode { .. } => true,
        }
    }

    /// A refusal for the provider's enqueued-token limit
    /// (`token_limit_exceeded`): it clears when batches finish, not by
    /// retrying the call, so the deferral waits for quota instead.
    pub fn is_enqueued_token_limit(&self) -> bool {
        matches!(self, Self::Status { message, .. } if message.contains(ENQUEUED_LIMIT_CODE))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A bounded label for logs and metrics: the status, or the failure kind.
    pub fn cause_label(&self) -> String {
        match self {
            Self::Status { status, .. } => status.to_string(),
            Self::Transport { timeout: true, .. } => "timeout".to_owned(),
            Self::Transport { .. } => "connect".to_owned(),
            Self::Decode { .. } => "decode".to_owned(),
        }
    }

    fn transport(operation: &'static str, err: reqwest::Error) -> Self {
        // reqwest's Display names the URL but never headers, so no key leaks.
        Self::Transport {
            operation,
            timeout: err.is_timeout(),
            detail: err.without_url().to_string(),
        }
    }
}

/// Error codes (or types) saying a quota or spend limit was reached:
/// waiting will not clear them.
const SPEND_LIMIT_CODES: &[&str] = &[
    "insufficient_quota",
    "billing_hard_limit_reached",
    "billing_not_active",
    "spend_limit_reached",
    "usage_limit_reached",
];

/// Whether an error message (prefixed with the body's code) names a spend limit.
fn is_spend_limit(message: &str) -> bool {
    SPEND_LIMIT_CODES.iter().any(|c| message.contains(c))
}

/// The code of a refusal for the provider's enqueued-token limit.
const ENQUEUED_LIMIT_CODE: &str = "token_limit_exceeded";

/// The body's error code or type when it is one of `codes`.
fn known_code(body: &[u8], codes: &[&'static str]) -> Option<&'static str> {
    let v = serde_json::from_slice::<Value>(body).ok()?;
    let error = v.get("error").unwrap_or(&v);
    ["code", "type"].iter().find_map(|field| {
        let given = error.get(*field)?.as_str()?;
        codes.iter().copied().find(|c| *c == given)
    })
}

/// Longest `Retry-After` honoured on files and batch calls.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Parses `Retry-After` given in seconds (the form providers use).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// The provider's error message from an error body, bounded.
fn error_message(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.get("error")
            .and_then(|e| e.get("message").or(Some(e)))
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .map(|m| {
                m.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| m.to_string())
            })
    });
    let mut message = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    if message.len() > 500 {
        let mut cut = 500;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

async fn check(
    operation: &'static str,
    resp: reqwest::Response,
) -> Result<reqwest::Response, ProviderError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(resp.headers());
    let body = resp.bytes().await.unwrap_or_default();
    let mut message = error_message(&body);
    // Codes that decide what to do next are kept in front of the message.
    if let Some(code) =
        known_code(&body, SPEND_LIMIT_CODES).or_else(|| known_code(&body, &[ENQUEUED_LIMIT_CODE]))
    {
        message = format!("{code}: {message}");
    }
    Err(ProviderError::Status {
        operation,
        status: status.as_u16(),
        message,
        retry_after,
    })
}

async fn json_of(operation: &'static str, resp: reqwest::Response) -> Result<Value, ProviderError> {
    let resp = check(operation, resp).await?;
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ProviderError::transport(operation, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ProviderError::Decode {
        operation,
        detail: e.to_string(),
    })
}

/// How long files and batch calls may take, so a stalled provider answer
/// fails (and is retried) instead of wedging its window.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// Longest wait for an answer: a whole JSON call, the opening of a
    /// download, an upload's answer after its last body chunk.
    pub call: Duration,
    /// Longest pause between two chunks of a download's body.
    pub idle: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            call: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

fn timed_out(operation: &'static str, limit: Duration) -> ProviderError {
    ProviderError::Transport {
        operation,
        detail: format!("no progress within {limit:?}"),
        timeout: true,
    }
}

/// `call`, failed as a timeout when it has not finished within `limit`.
async fn bounded<T>(
    operation: &'static str,
    limit: Duration,
    call: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(timed_out(operation, limit)))
}

/// Milliseconds since `since`, for [`Progress`].
fn millis_since(since: tokio::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// When a transfer last moved, shared between its body and a watchdog.
#[derive(Clone)]
struct Progress {
    since: tokio::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Progress {
    fn new() -> Self {
        Self {
            since: tokio::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn moved(&self) {
        self.last_ms
            .store(millis_since(self.since), Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`.
    async fn stalled(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = self.since + last + limit;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A download body failed as a timeout when it pauses longer than `idle`.
fn idle_bounded<S>(
    operation: &'static str,
    idle: Duration,
    body: S,
) -> impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, ProviderError>> + Send + 'static,
{
    futures_util::stream::unfold(Some(Box::pin(body)), move |body| async move {
        let mut body = body?;
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(item)) => Some((item, Some(body))),
            Ok(None) => None,
            // A stalled body ends with the timeout.
            Err(_) => Some((Err(timed_out(operation, idle)), None)),
        }
    })
}

/// How many pages of the files listing [`BatchClient::list_input_files`]
/// reads at most (100 files each).
pub const MAX_FILE_PAGES: usize = 50;

/// One upstream's files and batch jobs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BatchClient {
    http: reqwest::Client,
    base_url: String,
    dialect: Dialect,
    retry: RetryPolicy,
    /// The window's scoping headers, sent on every call ([`Self::scoped`]).
    scope: Scope,
    limits: CallLimits,
    /// How long the provider is given per job (openai dialect).
    completion_window: String,
}

/// Adds a window's scoping headers (SPEC section 2) to one of its calls,
/// so the batch is billed where the synchronous calls would have been.
fn with_scope(request: reqwest::RequestBuilder, scope: &Scope) -> reqwest::RequestBuilder {
    scope
        .pairs()
        .iter()
        .fold(request, |r, (name, value)| r.header(name, value))
}

impl BatchClient {
    /// `base_url` is the provider root without `/v1` (carpool appends paths).
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        dialect: Dialect,
        retry: RetryPolicy,
        limits: CallLimits,
    ) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            dialect,
            retry,
            scope: Scope::default(),
            limits,
            completion_window: "24h".to_owned(),
        }
    }

    /// This client with the upstream's own batch `completion_window`.
    pub fn with_completion_window(mut self, window: &str) -> Self {
        window.clone_into(&mut self.completion_window);
        self
    }

    /// This client for one window's calls: every call carries its scope.
    pub fn scoped(&self, scope: &Scope) -> Self {
        Self {
            scope: scope.clone(),
            ..self.clone()
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// `request` with the key as this dialect sends it (Anthropic:
    /// `x-api-key` and `anthropic-version`; else a bearer token) and the
    /// window's scope.
    fn authed(&self, request: reqwest::RequestBuilder, key: &str) -> reqwest::RequestBuilder {
        let request = match self.dialect {
            Dialect::Anthropic => request
                .header("x-api-key", key)
                .header("anthropic-version", anthropic::API_VERSION),
            Dialect::Mistral | Dialect::Openai => request.bearer_auth(key),
        };
        with_scope(request, &self.scope)
    }

    /// Creates an Anthropic batch from inline requests: `lines` are the
    /// `{custom_id, params}` objects, streamed into the body between its
    /// head and tail, so the window is never built in memory.
    ///
    /// Tried once, like [`Self::create_job`]: a create that failed may
    /// still have made the batch, which recovery looks for
    /// ([`Self::batches_since`]) before trying again. Times out when
    /// neither a body chunk was taken nor an answer came for the call limit.
    pub async fn create_inline<S>(&self, key: &str, lines: S) -> Result<JobView, ProviderError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        const OP: &str = "create";
        let progress = Progress::new();
        let moved = progress.clone();
        let framed = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(Bytes::from_static(anthropic::CREATE_HEAD))
        })
        .chain(lines.enumerate().map(|(i, line)| {
            let line = line?;
            if i == 0 {
                return Ok(line);
            }
            let mut with_comma = Vec::with_capacity(line.len() + 1);
            with_comma.push(b',');
            with_comma.extend_from_slice(&line);
            Ok(Bytes::from(with_comma))
        }))
        .chain(futures_util::stream::once(async {
            Ok(Bytes::from_static(anthropic::CREATE_TAIL))
        }))
        .inspect(move |_| moved.moved());
        let url = self.url(anthropic::BATCHES_PATH);
        let request = self
            .authed(self.http.post(&url), key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(reqwest::Body::wrap_stream(framed));
        let limit = self.limits.call;
        let call = async move {
            let resp = request
                .send()
                .await
                .map_err(|e| ProviderError::transport(OP, e))?;
            json_of(OP, resp).await
        };
        let value = tokio::select! {
            answer = call => answer?,
            () = progress.stalled(limit) => return Err(timed_out(OP, limit)),
        };
        self.job_from(OP, &value)
    }

    /// The key's jobs created at or after `not_before` (unix seconds),
    /// newest first: where recovery looks for a batch that carries no
    /// metadata (Anthropic's). Bounded to a few thousand.
    pub async fn batches_since(
        &self,
        key: &str,
        not_before: i64,
    ) -> Result<Vec<JobView>, ProviderError> {
        const OP: &str = "list";
        let mut cursor: Option<String> = None;
        let mut found = Vec::new();
        for _ in 0..50 {
            let url = self.url(&format!(
                "{}{}",
                jobs::jobs_path(self.dialect),
                jobs::list_query(self.dialect, cursor.as_deref())
            ));
            let value = self.get_json(OP, key, &url).await?;
            let page = jobs::parse_list(self.dialect, &value, cursor.as_deref());
            let mut older = false;
            for job in page.jobs {
                if job.created_at != 0 && job.created_at < not_before {
                    older = true;
                } else {
                    found.push(job);
                }
            }
            match page.next {
                Some(next) if !older => cursor = Some(next),
                _ => break,
            }
        }
        Ok(found)
    }

    /// Uploads a JSONL batch input file, streamed: `body` is called again
    /// for each attempt, so nothing is buffered to make a retry possible.
    /// An attempt times out when neither a body chunk was taken nor an
    /// answer came for the call limit (a provider that stops reading or
    /// never answers).
    pub async fn upload<F, S>(
        &self,
        key: &str,
        filename: &str,
        body: F,
    ) -> Result<String, ProviderError>
    where
        F: Fn() -> S,
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        const OP: &str = "upload";
        let value = self
            .retry
            .run(OP, || {
                let progress = Progress::new();
                let moved = progress.clone();
                let chunks = body().inspect(move |_| moved.moved());
                let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(chunks))
                    .file_name(filename.to_owned())
                    .mime_str("application/jsonl");
                let http = self.http.clone();
                let scope = self.scope.clone();
                let url = self.url("/v1/files");
                let limit = self.limits.call;
                let call = async move {
                    let part = part.map_err(|e| ProviderError::Decode {
                        operation: OP,
                        detail: e.to_string(),
                    })?;
                    let form = reqwest::multipart::Form::new()
                        .text("purpose", "batch")
                        .part("file", part);
                    let resp = with_scope(http.post(url).bearer_auth(key), &scope)
                        .multipart(form)
                        .send()
                        .await
                        .map_err(|e| ProviderError::transport(OP, e))?;
                    json_of(OP, resp).await
                };
                async move {
                    tokio::select! {
                        answer = call => answer,
                        () = progress.stalled(limit) => Err(timed_out(OP, limit)),
                    }
                }
            })
            .await?;
        value
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::Decode {
                operation: OP,
                detail: "file object without id".to_owned(),
            })
    }

    /// Creates the job for a window; the window id rides in its metadata.
    ///
    /// Tried once: a create that failed may still have made the job (a
    /// timeout, a dropped connection, even a 5xx), so the caller looks the
    /// window up with [`Self::find_job_for_window`] before trying again.
    pub async fn create_job(
        &self,
        key: &str,
        file_id: &str,
        model: &str,
        endpoint: &str,
        window: &WindowId,
    ) -> Result<JobView, ProviderError> {
        const OP: &str = "create";
        let terms = jobs::JobTerms {
            model,
            endpoint,
            completion_window: &self.completion_window,
        };
        let body = jobs::create_body(self.dialect, file_id, &terms, window);
        let url = self.url(jobs::jobs_path(self.dialect));
        let value = bounded(OP, self.limits.call, async {
            let resp = self
                .authed(self.http.post(&url), key)
                .json(&body)
                .send()
                .await
                .map_err(|e| ProviderError::transport(OP, e))?;
            json_of(OP, resp).await
        })
        .await?;
        self.job_from(OP, &value)
    }

    pub async fn get_job(&self, key: &str, job_id: &str) -> Result<JobView, ProviderError> {
        const OP: &str = "poll";
        let url = self.url(&format!("{}/{}", jobs::jobs_path(self.dialect), job_id));
        let value = self.get_json(OP, key, &url).await?;
        self.job_from(OP, &value)
    }

    pub async fn cancel_job(&self, key: &str, job_id: &str) -> Result<JobView, ProviderError> {
        const OP: &str = "cancel";
        let url = self.url(&format!(
            "{}/{}/cancel",
            jobs::jobs_path(self.dialect),
            job_id
        ));
        let value = self
            .retry
            .run(OP, || {
                bounded(OP, self.limits.call, async {
                    let resp = self
                        .authed(self.http.post(&url), key)
                        .send()
                        .await
                        .map_err(|e| ProviderError::transport(OP, e))?;
                    json_of(OP, resp).await
                })
            })
            .await?;
        self.job_from(OP, &value)
    }

    /// Finds the job created for `window`, if the provider has one: how a
    /// crash between the create call and recording its id is healed.
    /// Listing stops at jobs created before `not_before` (unix seconds).
    pub async fn find_job_for_window(
        &self,
        key: &str,
        window: &WindowId,
        not_before: i64,
    ) -> Result<Option<JobView>, ProviderError> {
        const OP: &str = "list";
        let mut cursor: Option<String> = None;
        for _ in 0..50 {
            let url = self.url(&format!(
                "{}{}",
                jobs::jobs_path(self.dialect),
                jobs::list_query(self.dialect, cursor.as_deref())
            ));
            let value = self.get_json(OP, key, &url).await?;
            let page = jobs::parse_list(self.dialect, &value, cursor.as_deref());
            if let Some(job) = page
                .jobs
                .iter()
                .find(|j| j.window.as_deref() == Some(window.as_str()))
            {
                return Ok(Some(job.clone()));
            }
            let older = page
                .jobs
                .iter()
                .all(|j| j.created_at != 0 && j.created_at < not_before);
            match page.next {
                Some(next) if !older => cursor = Some(next),
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The batch files at the provider that carpool named as window inputs
    /// ([`files::input_filename`]), newest first where the dialect orders
    /// them. OpenAI's listing (newest first) stops at files created before
    /// `not_before` (unix seconds); Mistral's, whose order is not
    /// documented, goes through at most [`MAX_FILE_PAGES`] pages.
    pub async fn list_input_files(
        &self,
        key: &str,
        not_before: i64,
    ) -> Result<Vec<FileView>, ProviderError> {
        const OP: &str = "list files";
        // Message Batches take their requests inline: no input files.
        if self.dialect == Dialect::Anthropic {
            return Ok(Vec::new());
        }
        let mut cursor: Option<String> = None;
        let mut found = Vec::new();
        for _ in 0..MAX_FILE_PAGES {
            let url = self.url(&format!(
                "/v1/files{}",
                files::list_query(self.dialect, cursor.as_deref())
            ));
            let value = self.get_json(OP, key, &url).await?;
            let page = files::parse_list(self.dialect, &value, cursor.as_deref());
            let older = self.dialect == Dialect::Openai
                && page
                    .files
                    .iter()
                    .all(|f| f.created_at != 0 && f.created_at < not_before);
            found.extend(
                page.files
                    .into_iter()
                    .filter(|f| window_of_input(&f.filename).is_some()),
            );
            match page.next {
                Some(next) if !older => cursor = Some(next),
                _ => break,
            }
        }
        Ok(found)
    }

    /// Downloads a file's content as a stream of chunks. Only the opening
    /// request is retried; a broken stream, or one that pauses longer than
    /// the idle limit, is the caller's to retry whole.
    pub async fn download(
        &self,
        key: &str,
        file_id: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static, ProviderError>
    {
        const OP: &str = "download";
        // An Anthropic batch's results stand where a file's content would.
        let url = match self.dialect {
            Dialect::Anthropic => {
                self.url(&format!("{}/{file_id}/results", anthropic::BATCHES_PATH))
            }
            Dialect::Mistral | Dialect::Openai => self.url(&format!("/v1/files/{file_id}/content")),
        };
        let resp = self
            .retry
            .run(OP, || {
                bounded(OP, self.limits.call, async {
                    let resp = self
                        .authed(self.http.get(&url), key)
                        .send()
                        .await
                        .map_err(|e| ProviderError::transport(OP, e))?;
                    check(OP, resp).await
                })
            })
            .await?;
        let body = resp
            .bytes_stream()
            .map_err(|e| ProviderError::transport(OP, e));
        Ok(idle_bounded(OP, self.limits.idle, body))
    }

    pub async fn delete_file(&self, key: &str, file_id: &str) -> Result<(), ProviderError> {
        const OP: &str = "delete";
        if self.dialect == Dialect::Anthropic {
            // Inline batches have no files; results go when the batch is archived.
            return Ok(());
        }
        let url = self.url(&format!("/v1/files/{file_id}"));
        self.retry
            .run(OP, || {
                bounded(OP, self.limits.call, async {
                    let resp = self
                        .authed(self.http.delete(&url), key)
                        .send()
                        .await
                        .map_err(|e| ProviderError::transport(OP, e))?;
                    match check(OP, resp).await {
                        Ok(_) => Ok(()),
                        // Already gone is what we wanted.
                        Err(ProviderError::Status { status: 404, .. }) => Ok(()),
                        Err(err) => Err(err),
                    }
                })
            })
            .await
    }

    async fn get_json(
        &self,
        operation: &'static str,
        key: &str,
        url: &str,
    ) -> Result<Value, ProviderError> {
        self.retry
            .run(operation, || {
                bounded(operation, self.limits.call, async {
                    let resp = self
                        .authed(self.http.get(url), key)
                        .send()
                        .await
                        .map_err(|e| ProviderError::transport(operation, e))?;
                    json_of(operation, resp).await
                })
            })
            .await
    }

    fn job_from(&self, operation: &'static str, value: &Value) -> Result<JobView, ProviderError> {
        jobs::parse_job(self.dialect, value).ok_or_else(|| ProviderError::Decode {
            operation,
            detail: "job object without id".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_prefers_the_openai_error_object() {
        assert_eq!(error_message(br#"{"error":{"message":"nope"}}"#), "nope");
        assert_eq!(error_message(br#"{"detail":"bad"}"#), "bad");
        assert_eq!(error_message(b"plain"), "plain");
    }
}
