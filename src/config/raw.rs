//! The config file as written: serde structs that mirror the TOML one to one.
//!
//! Every field is optional or a plain string here; defaults, units, enums and
//! cross-checks belong to validation (`super::validate`), which reports every
//! problem at once with its key path. `deny_unknown_fields` everywhere, so a
//! misspelt key is an error rather than a silently ignored setting.

use serde::Deserialize;

/// A scalar that may be written as a string (`"90s"`, `"10MB"`) or a bare
/// integer (seconds, bytes). Environment overrides produce either.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Str(String),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub clients: Vec<RawClient>,
    #[serde(default)]
    pub batching: RawBatching,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub webhooks: RawWebhooks,
    #[serde(default)]
    pub prices: RawPrices,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub max_body: Option<Scalar>,
    pub admin_token: Option<String>,
    pub admin_token_env: Option<String>,
    pub request_timeout: Option<Scalar>,
    pub connect_timeout: Option<Scalar>,
    pub shutdown_grace: Option<Scalar>,
    pub defer_prefix: Option<String>,
    pub header_timeout: Option<Scalar>,
    pub max_connections: Option<Scalar>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub url: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Option<String>,
    pub dialect: Option<String>,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub auth: Option<String>,
    pub models: Option<Vec<String>>,
    pub flex: Option<bool>,
    pub flex_models: Option<Vec<String>>,
    pub flex_timeout: Option<Scalar>,
    pub completion_window: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub name: Option<String>,
    pub key_sha256: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatching {
    pub max_requests: Option<Scalar>,
    pub max_bytes: Option<Scalar>,
    pub max_wait: Option<Scalar>,
    pub poll_interval: Option<Scalar>,
    pub on_batch_failure: Option<String>,
    pub resubmit_limit: Option<Scalar>,
    pub fallback_margin: Option<Scalar>,
    pub expected_turnaround: Option<Scalar>,
    pub results_ttl: Option<Scalar>,
    pub delete_files: Option<bool>,
    pub call_timeout: Option<Scalar>,
    pub idle_timeout: Option<Scalar>,
    pub max_result_line: Option<Scalar>,
    pub max_pending: Option<Scalar>,
    pub max_pending_per_client: Option<Scalar>,
    pub max_enqueued_tokens: Option<Scalar>,
    pub max_open_windows_per_client: Option<Scalar>,
    #[serde(default)]
    pub models: Vec<RawModelBatching>,
}

/// `[[batching.models]]`: overrides for models matching `model` (a glob).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelBatching {
    pub model: Option<String>,
    pub max_requests: Option<Scalar>,
    pub max_bytes: Option<Scalar>,
    pub max_wait: Option<Scalar>,
    pub on_batch_failure: Option<String>,
    pub resubmit_limit: Option<Scalar>,
    pub fallback_margin: Option<Scalar>,
    pub max_enqueued_tokens: Option<Scalar>,
    pub expected_turnaround: Option<Scalar>,
}

/// `[[rules]]`: a default mode for calls matching every given condition.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub path: Option<String>,
    pub model: Option<String>,
    pub client: Option<String>,
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    pub max_attempts: Option<Scalar>,
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    pub timeout: Option<Scalar>,
    pub schedule: Option<Vec<Scalar>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrices {
    pub batch_discount: Option<f64>,
    pub flex_discount: Option<f64>,
    #[serde(default)]
    pub models: Vec<RawModelPrice>,
}

/// `[[prices.models]]`: USD per million tokens for models matching `model`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelPrice {
    pub model: Option<String>,
    /// Only for calls routed to this `[[upstreams]]` entry.
    pub upstream: Option<String>,
    pub input: Option<f64>,
    pub output: Option<f64>,
    pub batch_discount: Option<f64>,
    pub flex_discount: Option<f64>,
}
