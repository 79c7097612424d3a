//! The validated config: typed values only. Everything downstream reads these.

use std::net::SocketAddr;
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use serde::{Serialize, Serializer};
use url::Url;

use super::Secret;
use crate::model::Dialect;

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Things that are allowed but worth an operator's attention, logged at start.
    #[serde(skip)]
    pub warnings: Vec<String>,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub clients: Vec<ClientConfig>,
    pub batching: BatchingConfig,
    pub rules: Vec<RuleConfig>,
    pub webhooks: WebhooksConfig,
    pub prices: PricesConfig,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    #[serde(serialize_with = "ser_size")]
    pub max_body: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<Secret>,
    /// Longest wait for an upstream's response headers before a 504.
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    /// Longest wait to open a connection to an upstream before a 502.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// How long in-flight calls may run on after a shutdown signal.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Path prefix that opts a call into `wait` mode, e.g. `/defer`.
    pub defer_prefix: String,
    /// Longest wait for a request head, from the moment the connection is
    /// ready for one: a half-sent head, or an idle keep-alive connection,
    /// is closed after it.
    #[serde(serialize_with = "ser_duration")]
    pub header_timeout: Duration,
    /// Most connections served at once; beyond it carpool stops accepting
    /// until one closes.
    pub max_connections: u64,
}

#[derive(Clone, Serialize)]
pub struct StoreConfig {
    #[serde(serialize_with = "ser_store_url")]
    pub url: String,
    pub backend: StoreBackend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// carpool's own upstream key; callers are checked against `[[clients]]`.
    Managed,
    /// the caller's `Authorization` goes upstream unchanged.
    Passthrough,
}

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamConfig {
    pub name: String,
    pub dialect: Dialect,
    /// Scheme, host and optional path prefix, without `/v1`; no trailing slash.
    #[serde(serialize_with = "ser_url")]
    pub base_url: Url,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    pub auth: AuthMode,
    pub models: ModelGlobs,
    /// Models this upstream sells a flex tier for (`flex = true`: `*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flex_models: Vec<Pattern>,
    /// Longest a flex call may take (cut to what a deadline leaves).
    #[serde(serialize_with = "ser_duration")]
    pub flex_timeout: Duration,
    /// The `completion_window` of its batches (openai dialect).
    pub completion_window: String,
}

impl UpstreamConfig {
    /// Whether a realtime call for `model` tries flex first.
    pub fn flex_for(&self, model: &str) -> bool {
        self.flex_models.iter().any(|p| p.matches(model))
    }

    /// The upstream URL for a caller's path (and query), e.g. `/v1/models`:
    /// the base URL's path, then the caller's. Built from the parsed base
    /// so only the path and query are parsed on each call, not the host.
    pub fn url_for(&self, path_and_query: &str) -> Url {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut url = self.base_url.clone();
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
        url.set_query(query);
        url
    }
}

/// A list of model globs, matched in order.
#[derive(Clone, Debug)]
pub struct ModelGlobs {
    patterns: Vec<(String, GlobMatcher)>,
}

impl ModelGlobs {
    pub fn new(patterns: &[String]) -> Result<Self, (usize, globset::Error)> {
        let patterns = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Glob::new(p)
                    .map(|g| (p.clone(), g.compile_matcher()))
                    .map_err(|e| (i, e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    pub fn matches(&self, model: &str) -> bool {
        self.patterns.iter().any(|(_, g)| g.is_match(model))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

impl Serialize for ModelGlobs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.patterns.iter().map(|(p, _)| p))
    }
}

/// One glob pattern, printed as written.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub text: String,
    matcher: GlobMatcher,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Self, globset::Error> {
        let matcher = Glob::new(text)?.compile_matcher();
        Ok(Self {
            text: text.to_owned(),
            matcher,
        })
    }

    pub fn matches(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ClientConfig {
    pub name: String,
    /// SHA-256 of the client's bearer key, lower-case hex.
    pub key_sha256: String,
}

/// What happens to the unfinished requests of a batch job that failed,
/// expired, timed out or was cancelled. The policies form one chain:
/// `resubmit` (each request at most `resubmit_limit` times) → `realtime`
/// → `error`. A policy starts the chain at its own step; a realtime call
/// that cannot be made (upstream unreachable, 5xx after retries) falls to
/// `error`. `error` also forbids realtime calls for deadlines: a request
/// whose deadline arrives then expires (504).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    Resubmit,
    Realtime,
    Error,
}

impl FailurePolicy {
    /// Whether a request may be answered by a realtime call (after its
    /// batch failed, or when its deadline arrives).
    pub fn allows_realtime(self) -> bool {
        !matches!(self, Self::Error)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Wait,
    Async,
    Now,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "wait" => Some(Self::Wait),
            "async" => Some(Self::Async),
            "now" => Some(Self::Now),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wait => "wait",
            Self::Async => "async",
            Self::Now => "now",
        }
    }
}

/// The window policy for one model on one upstream, after overrides and caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WindowPolicy {
    pub max_requests: u64,
    #[serde(serialize_with = "ser_size")]
    pub max_bytes: u64,
    #[serde(serialize_with = "ser_duration")]
    pub max_wait: Duration,
    pub on_batch_failure: FailurePolicy,
    pub resubmit_limit: u32,
    #[serde(serialize_with = "ser_duration")]
    pub fallback_margin: Duration,
    /// Cap on the estimated input tokens in unfinished batches of one
    /// upstream, credential and model (`deferral::quota`); `None`: no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_enqueued_tokens: Option<u64>,
    /// The batch turnaround assumed until jobs of the model have been seen.
    #[serde(serialize_with = "ser_duration")]
    pub expected_turnaround: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchingConfig {
    #[serde(flatten)]
    pub defaults: WindowPolicy,
    #[serde(serialize_with = "ser_duration")]
    pub poll_interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub results_ttl: Duration,
    pub delete_files: bool,
    /// Longest wait for a files or batch call's answer (poll, list page,
    /// create, cancel, delete, a download's opening, an upload's answer
    /// after its last body chunk): past it the call counts as a timeout
    /// and is retried.
    #[serde(serialize_with = "ser_duration")]
    pub call_timeout: Duration,
    /// Longest pause between two chunks of a download's body before the
    /// download counts as stalled (and is tried again).
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Longest result line read from a provider's result file; a longer
    /// one fails its request (`result_too_large`) without being buffered.
    #[serde(serialize_with = "ser_size")]
    pub max_result_line: u64,
    /// Intake ceiling on pending (queued or submitted) deferred requests,
    /// all credentials together; past it, 429. `None`: no ceiling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u64>,
    /// The same ceiling for each credential on its own (by default
    /// [`DEFAULT_MAX_PENDING_PER_CLIENT`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_per_client: Option<u64>,
    /// Distinct windows (upstream, endpoint, model: each a provider job)
    /// one credential may have unfinished; past it, 429. Bounds the jobs a
    /// caller inventing model names makes on a shared upstream key.
    pub max_open_windows_per_client: u64,
    pub models: Vec<ModelBatching>,
}

/// `batching.max_pending_per_client` when unset: a bound on what one
/// credential can store, high enough for a large batch.
pub const DEFAULT_MAX_PENDING_PER_CLIENT: u64 = 100_000;

/// `batching.max_open_windows_per_client` when unset.
pub const DEFAULT_MAX_OPEN_WINDOWS_PER_CLIENT: u64 = 64;

/// `[[batching.models]]` after validation; `None` means "use the default".
#[derive(Clone, Debug, Serialize)]
pub struct ModelBatching {
    pub model: Pattern,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_size"
    )]
    pub max_bytes: Option<u64>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_duration"
    )]
    pub max_wait: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_batch_failure: Option<FailurePolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resubmit_limit: Option<u32>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_duration"
    )]
    pub fallback_margin: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_enqueued_tokens: Option<u64>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_duration"
    )]
    pub expected_turnaround: Option<Duration>,
}

impl BatchingConfig {
    /// The largest `fallback_margin` of any model: how far ahead the
    /// deadline worker must look.
    pub fn max_fallback_margin(&self) -> Duration {
        self.models
            .iter()
            .filter_map(|m| m.fallback_margin)
            .fold(self.defaults.fallback_margin, Duration::max)
    }

    /// The policy for `model` on an upstream of `dialect`: the first matching
    /// `[[batching.models]]` entry over the defaults, capped at the dialect's
    /// own per-job limits.
    pub fn policy_for(&self, model: &str, dialect: Dialect) -> WindowPolicy {
        let mut p = self.defaults;
        if let Some(o) = self.models.iter().find(|m| m.model.matches(model)) {
            p.max_requests = o.max_requests.unwrap_or(p.max_requests);
            p.max_bytes = o.max_bytes.unwrap_or(p.max_bytes);
            p.max_wait = o.max_wait.unwrap_or(p.max_wait);
            p.on_batch_failure = o.on_batch_failure.unwrap_or(p.on_batch_failure);
            p.resubmit_limit = o.resubmit_limit.unwrap_or(p.resubmit_limit);
            p.fallback_margin = o.fallback_margin.unwrap_or(p.fallback_margin);
            p.max_enqueued_tokens = o.max_enqueued_tokens.or(p.max_enqueued_tokens);
            p.expected_turnaround = o.expected_turnaround.unwrap_or(p.expected_turnaround);
        }
        let (max_requests, max_bytes) = dialect.limits();
        p.max_requests = p.max_requests.min(max_requests);
        p.max_bytes = p.max_bytes.min(max_bytes);
        p
    }
}

/// `[[rules]]`: every given condition must hold; the first matching rule wins.
#[derive(Clone, Debug, Serialize)]
pub struct RuleConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<Pattern>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<Pattern>,
    /// A `[[clients]]` name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    pub mode: Mode,
}

impl RuleConfig {
    pub fn matches(&self, path: &str, model: Option<&str>, client: Option<&str>) -> bool {
        self.path.as_ref().map_or(true, |p| p.matches(path))
            && self
                .model
                .as_ref()
                .map_or(true, |p| model.is_some_and(|m| p.matches(m)))
            && self
                .client
                .as_deref()
                .map_or(true, |c| client.is_some_and(|name| name == c))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct WebhooksConfig {
    /// Signing secrets, raw bytes (decoded from `whsec_<base64>`). The first
    /// signs; all are sent as signatures so a receiver can rotate. Empty means
    /// webhooks are not configured.
    pub secrets: Vec<WebhookSecret>,
    pub max_attempts: u32,
    pub allow_hosts: Vec<String>,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Delay before attempt 2, 3, …; the last repeats.
    #[serde(serialize_with = "ser_durations")]
    pub schedule: Vec<Duration>,
}

/// A webhook signing key: the decoded bytes of a `whsec_…` secret.
#[derive(Clone)]
pub struct WebhookSecret(pub(super) Vec<u8>);

impl WebhookSecret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookSecret({})", Secret::MASK)
    }
}

impl Serialize for WebhookSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(Secret::MASK)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PricesConfig {
    /// Fraction taken off the realtime price for batch-served tokens.
    pub batch_discount: f64,
    /// Fraction taken off the realtime price for flex-served tokens.
    pub flex_discount: f64,
    pub models: Vec<ModelPrice>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelPrice {
    pub model: Pattern,
    /// Only calls routed to this upstream; `None`: any upstream.
    pub upstream: Option<String>,
    /// USD per million input tokens, realtime.
    pub input: f64,
    /// USD per million output tokens, realtime.
    pub output: f64,
    pub batch_discount: f64,
    pub flex_discount: f64,
}

impl PricesConfig {
    /// The first entry for `model` that names no upstream.
    pub fn for_model(&self, model: &str) -> Option<&ModelPrice> {
        self.models
            .iter()
            .find(|p| p.upstream.is_none() && p.model.matches(model))
    }

    /// The first entry for `model` on `upstream`: one that names the
    /// upstream, or names none.
    pub fn for_call(&self, upstream: &str, model: &str) -> Option<&ModelPrice> {
        self.models.iter().find(|p| {
            p.upstream.as_deref().map_or(true, |u| u == upstream) && p.model.matches(model)
        })
    }
}

impl Config {
    /// The model patterns the operator named (`[[batching.models]]` and
    /// `[[prices.models]]`): the only model names `/metrics` may show.
    pub fn named_models(&self) -> Vec<Pattern> {
        let batching = self.batching.models.iter().map(|m| m.model.clone());
        let priced = self.prices.models.iter().map(|p| p.model.clone());
        batching.chain(priced).collect()
    }

    /// The upstream for a call: the first whose `models` globs match the
    /// body's model, else the first upstream. Validation guarantees one exists.
    pub fn route(&self, model: Option<&str>) -> &UpstreamConfig {
        let hit = model.and_then(|m| self.upstreams.iter().find(|u| u.models.matches(m)));
        // Validation rejects a config without upstreams, so index 0 exists.
        #[allow(clippy::indexing_slicing)]
        hit.unwrap_or(&self.upstreams[0])
    }

    /// The mode of the first `[[rules]]` entry matching the call, if any.
    pub fn rule_mode(&self, path: &str, model: Option<&str>, client: Option<&str>) -> Option<Mode> {
        self.rules
            .iter()
            .find(|r| r.matches(path, model, client))
            .map(|r| r.mode)
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

fn ser_durations<S: Serializer>(d: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(d.iter().map(|d| humantime::format_duration(*d).to_string()))
}

fn ser_size<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&bytesize::ByteSize::b(*n).to_string_as(false))
}

fn ser_opt_size<S: Serializer>(n: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => ser_size(n, s),
        None => s.serialize_none(),
    }
}

fn ser_url<S: Serializer>(u: &Url, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(u.as_str())
}

/// Prints a store URL with any password masked.
fn ser_store_url<S: Serializer>(u: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(u))
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .field("backend", &self.backend)
            .finish()
    }
}

/// The store URL with its secrets masked: a password in the userinfo, and
/// the value of every query parameter (drivers take `password`,
/// `sslpassword`, `sslkey` and more there; none is worth showing).
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = Url::parse(raw) else {
        // Not a URL we can take apart: show only its scheme.
        return match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://{}", Secret::MASK),
            None => Secret::MASK.to_owned(),
        };
    };
    if url.password().is_some() {
        let _ = url.set_password(Some(Secret::MASK));
    }
    if url.query().is_some() {
        let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
        url.query_pairs_mut()
            .clear()
            .extend_pairs(names.iter().map(|k| (k.as_str(), Secret::MASK)));
    }
    url.to_string()
}
