//! Raw → typed. Every problem is collected with its key path; nothing stops
//! at the first one, so `check-config` can list them all in one run.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;

use super::raw::*;
use super::types::*;
use super::{Problem, Secret};
use crate::model::Dialect;

/// Looks up an environment variable (injected so tests need not touch the
/// process environment).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub const DEFAULT_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
    Duration::from_secs(1800),
    Duration::from_secs(3600),
    Duration::from_secs(7200),
];

struct Check<'a> {
    problems: &'a mut Vec<Problem>,
    lookup: Lookup<'a>,
}

impl Check<'_> {
    fn fail(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(key, message));
    }

    fn duration(&mut self, key: &str, value: Option<&Scalar>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(Scalar::Int(n)) if *n >= 0 => Duration::from_secs(n.unsigned_abs()),
            Some(Scalar::Int(n)) => {
                self.fail(key, format!("invalid duration {n}: must not be negative"));
                default
            }
            Some(Scalar::Str(s)) => humantime::parse_duration(s.trim()).unwrap_or_else(|_| {
                self.fail(
                    key,
                    format!("invalid duration \"{s}\", expected e.g. \"90s\", \"5m\", \"7d\""),
                );
                default
            }),
        }
    }

    fn size(&mut self, key: &str, value: Option<&Scalar>, default: u64) -> u64 {
        let n = match value {
            None => return default,
            Some(Scalar::Int(n)) if *n > 0 => n.unsigned_abs(),
            Some(Scalar::Int(n)) => {
                self.fail(key, format!("invalid size {n}: must be positive"));
                return default;
            }
            Some(Scalar::Str(s)) => match s.trim().parse::<bytesize::ByteSize>() {
                Ok(b) if b.as_u64() > 0 => b.as_u64(),
                _ => {
                    self.fail(
                        key,
                        format!("invalid size \"{s}\", expected e.g. \"10MB\", \"512KiB\""),
                    );
                    return default;
                }
            },
        };
        n
    }

    fn count(&mut self, key: &str, value: Option<&Scalar>, default: u64, min: u64) -> u64 {
        match value {
            None => default,
            Some(Scalar::Int(n)) if *n >= 0 && n.unsigned_abs() >= min => n.unsigned_abs(),
            Some(Scalar::Str(s)) if s.trim().parse::<u64>().is_ok_and(|n| n >= min) => {
                s.trim().parse().unwrap_or(default)
            }
            Some(other) => {
                let shown = match other {
                    Scalar::Int(n) => n.to_string(),
                    Scalar::Str(s) => format!("\"{s}\""),
                };
                self.fail(
                    key,
                    format!("invalid count {shown}, expected an integer >= {min}"),
                );
                default
            }
        }
    }

    fn count_u32(&mut self, key: &str, value: Option<&Scalar>, default: u32, min: u32) -> u32 {
        let n = self.count(key, value, u64::from(default), u64::from(min));
        u32::try_from(n).unwrap_or_else(|_| {
            self.fail(key, format!("{n} is too large"));
            default
        })
    }

    fn choice<T: Copy>(
        &mut self,
        key: &str,
        what: &str,
        value: Option<&str>,
        options: &[(&str, T)],
    ) -> Option<T> {
        let value = value?;
        let found = options
            .iter()
            .find(|(name, _)| *name == value.trim().to_ascii_lowercase())
            .map(|(_, v)| *v);
        if found.is_none() {
            let expected: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            self.fail(
                key,
                format!(
                    "unknown {what} \"{value}\", expected {}",
                    expected.join("|")
                ),
            );
        }
        found
    }

    fn required<'v>(&mut self, key: &str, value: Option<&'v str>) -> Option<&'v str> {
        match value.map(str::trim) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.fail(key, "is required");
                None
            }
        }
    }

    fn env_var(&mut self, key: &str, var: &str) -> Option<String> {
        match (self.lookup)(var) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.fail(key, format!("environment variable {var} is not set"));
                None
            }
        }
    }

    fn pattern(&mut self, key: &str, text: &str) -> Option<Pattern> {
        Pattern::new(text)
            .map_err(|e| self.fail(key, format!("invalid glob \"{text}\": {}", e.kind())))
            .ok()
    }

    fn failure_policy(&mut self, key: &str, value: Option<&str>) -> Option<FailurePolicy> {
        self.choice(
            key,
            "policy",
            value,
            &[
                ("resubmit", FailurePolicy::Resubmit),
                ("realtime", FailurePolicy::Realtime),
                ("error", FailurePolicy::Error),
            ],
        )
    }
}

/// Validates `raw`. `broken` holds key paths that failed to parse already
/// (reported by the caller), whose entries are skipped here.
pub fn validate(
    raw: &RawConfig,
    broken: &HashSet<String>,
    lookup: Lookup<'_>,
    problems: &mut Vec<Problem>,
) -> Config {
    let mut c = Check { problems, lookup };
    let mut warnings = Vec::new();
    let server = server(&mut c, &raw.server);
    let store = store(&mut c, &raw.store);
    let upstreams = upstreams(&mut c, &raw.upstreams, broken, &mut warnings);
    let clients = clients(&mut c, &raw.clients, broken);
    let batching = batching(&mut c, &raw.batching, &upstreams, &mut warnings);
    let rules = rules(&mut c, &raw.rules, broken, &clients);
    let webhooks = webhooks(&mut c, &raw.webhooks);
    let names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
    let prices = prices(&mut c, &raw.prices, &names);
    if clients.is_empty() {
        let open: Vec<&str> = upstreams
            .iter()
            .filter(|u| u.auth == AuthMode::Managed)
            .map(|u| u.name.as_str())
            .collect();
        if !open.is_empty() {
            warnings.push(format!(
                "no [[clients]] listed: managed upstream(s) {} accept calls from anyone",
                open.join(", ")
            ));
        }
    }
    Config {
        warnings,
        server,
        store,
        upstreams,
        clients,
        batching,
        rules,
        webhooks,
        prices,
    }
}

fn server(c: &mut Check<'_>, raw: &RawServer) -> ServerConfig {
    let default_listen = SocketAddr::from(([127, 0, 0, 1], 8080));
    let listen = match raw.listen.as_deref() {
        None => default_listen,
        Some(s) => s.trim().parse().unwrap_or_else(|_| {
            c.fail(
                "server.listen",
                format!("invalid address \"{s}\", expected IP:PORT such as 127.0.0.1:8080"),
            );
            default_listen
        }),
    };
    let admin_token = match (&raw.admin_token, &raw.admin_token_env) {
        (Some(_), Some(_)) => {
            c.fail(
                "server.admin_token",
                "set either admin_token or admin_token_env, not both",
            );
            None
        }
        (Some(t), None) if t.is_empty() => {
            c.fail("server.admin_token", "must not be empty");
            None
        }
        (Some(t), None) => Some(Secret::new(t.clone())),
        (None, Some(var)) => c.env_var("server.admin_token_env", var).map(Secret::new),
        (None, None) => None,
    };
    let defer_prefix = raw
        .defer_prefix
        .clone()
        .unwrap_or_else(|| "/defer".to_owned());
    if !defer_prefix.is_empty()
        && (!defer_prefix.starts_with('/') || defer_prefix.ends_with('/') || defer_prefix == "/v1")
    {
        c.fail(
            "server.defer_prefix",
            format!(
                "invalid prefix \"{defer_prefix}\", expected a path such as \"/defer\" (or \"\" to disable)"
            ),
        );
    }
    let request_timeout = c.duration(
        "server.request_timeout",
        raw.request_timeout.as_ref(),
        Duration::from_secs(600),
    );
    if request_timeout.is_zero() {
        c.fail("server.request_timeout", "must be greater than zero");
    }
    ServerConfig {
        listen,
        max_body: c.size("server.max_body", raw.max_body.as_ref(), 10_000_000),
        admin_token,
        request_timeout,
        connect_timeout: c.duration(
            "server.connect_timeout",
            raw.connect_timeout.as_ref(),
            Duration::from_secs(10),
        ),
        shutdown_grace: c.duration(
            "server.shutdown_grace",
            raw.shutdown_grace.as_ref(),
            Duration::from_secs(30),
        ),
        defer_prefix,
        header_timeout: header_timeout(c, raw),
        max_connections: c.count(
            "server.max_connections",
            raw.max_connections.as_ref(),
            10_000,
            1,
        ),
    }
}

fn header_timeout(c: &mut Check<'_>, raw: &RawServer) -> Duration {
    let timeout = c.duration(
        "server.header_timeout",
        raw.header_timeout.as_ref(),
        Duration::from_secs(30),
    );
    if timeout.is_zero() {
        c.fail("server.header_timeout", "must be greater than zero");
    }
    timeout
}

fn store(c: &mut Check<'_>, raw: &RawStore) -> StoreConfig {
    let url = raw
        .url
        .clone()
        .unwrap_or_else(|| "sqlite://data/carpool.db".to_owned());
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    let backend = match scheme {
        "sqlite" => StoreBackend::Sqlite,
        "postgres" | "postgresql" => StoreBackend::Postgres,
        _ => {
            c.fail(
                "store.url",
                format!(
                    "unsupported store \"{}\", expected sqlite://… or postgres://…",
                    redact_url(&url)
                ),
            );
            StoreBackend::Sqlite
        }
    };
    StoreConfig { url, backend }
}

fn upstreams(
    c: &mut Check<'_>,
    raw: &[RawUpstream],
    broken: &HashSet<String>,
    warnings: &mut Vec<String>,
) -> Vec<UpstreamConfig> {
    if raw.is_empty() {
        c.fail("upstreams", "at least one [[upstreams]] entry is required");
    }
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, u) in raw.iter().enumerate() {
        let k = format!("upstreams[{i}]");
        if broken.contains(&k) {
            continue;
        }
        let name = c.required(&format!("{k}.name"), u.name.as_deref());
        if let Some(n) = name {
            if !names.insert(n.to_owned()) {
                c.fail(
                    format!("{k}.name"),
                    format!("duplicate upstream name \"{n}\""),
                );
            }
        }
        let dialect_key = format!("{k}.dialect");
        let dialect = match u.dialect.as_deref() {
            None => {
                c.fail(&dialect_key, "is required (mistral|openai|anthropic)");
                None
            }
            Some(d) => c.choice(
                &dialect_key,
                "dialect",
                Some(d),
                &[
                    ("mistral", Dialect::Mistral),
                    ("openai", Dialect::Openai),
                    ("anthropic", Dialect::Anthropic),
                ],
            ),
        };
        let base_url = c
            .required(&format!("{k}.base_url"), u.base_url.as_deref())
            .and_then(|s| base_url(c, &format!("{k}.base_url"), s));
        let auth = c
            .choice(
                &format!("{k}.auth"),
                "auth mode",
                u.auth.as_deref(),
                &[
                    ("managed", AuthMode::Managed),
                    ("passthrough", AuthMode::Passthrough),
                ],
            )
            .unwrap_or(AuthMode::Managed);
        let api_key = u
            .api_key_env
            .as_deref()
            .and_then(|var| c.env_var(&format!("{k}.api_key_env"), var))
            .map(Secret::new);
        if auth == AuthMode::Managed && u.api_key_env.is_none() {
            warnings.push(format!(
                "{k}: auth = \"managed\" without api_key_env: calls go upstream without a key"
            ));
        }
        let patterns = u.models.clone().unwrap_or_else(|| vec!["*".to_owned()]);
        let models = match ModelGlobs::new(&patterns) {
            Ok(m) => Some(m),
            Err((j, e)) => {
                c.fail(
                    format!("{k}.models[{j}]"),
                    format!("invalid glob: {}", e.kind()),
                );
                None
            }
        };
        let flex_models = flex_models(c, &k, u, dialect);
        let flex_timeout = c.duration(
            &format!("{k}.flex_timeout"),
            u.flex_timeout.as_ref(),
            Duration::from_secs(15 * 60),
        );
        let completion_window = completion_window(c, &k, u, dialect);
        if let (Some(name), Some(dialect), Some(base_url), Some(models)) =
            (name, dialect, base_url, models)
        {
            out.push(UpstreamConfig {
                name: name.to_owned(),
                dialect,
                base_url,
                api_key_env: u.api_key_env.clone(),
                api_key,
                auth,
                models,
                flex_models,
                flex_timeout,
                completion_window,
            });
        }
    }
    out
}

/// `flex` / `flex_models` of an upstream as the models that try flex.
/// Flex is OpenAI's `service_tier`: only an openai-dialect upstream sells it.
fn flex_models(
    c: &mut Check<'_>,
    k: &str,
    u: &RawUpstream,
    dialect: Option<Dialect>,
) -> Vec<Pattern> {
    let globs = match (u.flex, &u.flex_models) {
        (None | Some(false), None) => return Vec::new(),
        (Some(true), None) => vec!["*".to_owned()],
        (None, Some(globs)) => globs.clone(),
        (Some(flex), Some(_)) => {
            c.fail(
                format!("{k}.flex_models"),
                format!("contradicts flex = {flex}: set flex = true (every model) or flex_models, not both"),
            );
            return Vec::new();
        }
    };
    if dialect.is_some_and(|d| d != Dialect::Openai) {
        c.fail(
            format!("{k}.flex"),
            "flex is a service tier of the openai dialect; this upstream cannot sell it",
        );
        return Vec::new();
    }
    globs
        .iter()
        .enumerate()
        .filter_map(|(j, g)| c.pattern(&format!("{k}.flex_models[{j}]"), g))
        .collect()
}

/// An upstream's batch `completion_window`: OpenAI sells `24h`; compatible
/// providers take others (`1h`, `48h`, up to `7d`). Only the openai dialect
/// sends one.
fn completion_window(
    c: &mut Check<'_>,
    k: &str,
    u: &RawUpstream,
    dialect: Option<Dialect>,
) -> String {
    const DEFAULT: &str = "24h";
    let Some(window) = u.completion_window.as_deref().map(str::trim) else {
        return DEFAULT.to_owned();
    };
    let key = format!("{k}.completion_window");
    if dialect.is_some_and(|d| d != Dialect::Openai) {
        c.fail(
            &key,
            "only an openai-dialect upstream's batches take a completion_window",
        );
        return DEFAULT.to_owned();
    }
    match humantime::parse_duration(window) {
        Ok(d) if d >= Duration::from_secs(3600) && d <= Duration::from_secs(7 * 86_400) => {
            window.to_owned()
        }
        _ => {
            c.fail(
                &key,
                format!(
                    "invalid window \"{window}\", expected a duration from 1h to 7d, e.g. \"24h\""
                ),
            );
            DEFAULT.to_owned()
        }
    }
}

fn base_url(c: &mut Check<'_>, key: &str, s: &str) -> Option<url::Url> {
    let url = match url::Url::parse(s) {
        Ok(u) => u,
        Err(e) => {
            c.fail(key, format!("invalid URL \"{s}\": {e}"));
            return None;
        }
    };
    if !matches!(url.scheme(), "http" | "https") {
        c.fail(
            key,
            format!(
                "unsupported scheme \"{}\", expected http|https",
                url.scheme()
            ),
        );
        return None;
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        c.fail(key, "must not carry a query, fragment or credentials");
        return None;
    }
    let path = url.path().trim_end_matches('/');
    if path.ends_with("/v1") {
        c.fail(
            key,
            format!("\"{s}\" ends in /v1: give the server root, carpool appends the caller's /v1/… path"),
        );
        return None;
    }
    Some(url)
}

fn clients(c: &mut Check<'_>, raw: &[RawClient], broken: &HashSet<String>) -> Vec<ClientConfig> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, cl) in raw.iter().enumerate() {
        let k = format!("clients[{i}]");
        if broken.contains(&k) {
            continue;
        }
        let name = c.required(&format!("{k}.name"), cl.name.as_deref());
        if let Some(n) = name {
            if !names.insert(n.to_owned()) {
                c.fail(
                    format!("{k}.name"),
                    format!("duplicate client name \"{n}\""),
                );
            }
        }
        let hash = c
            .required(&format!("{k}.key_sha256"), cl.key_sha256.as_deref())
            .and_then(|h| {
                let ok = h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    c.fail(
                        format!("{k}.key_sha256"),
                        "expected 64 hex digits (sha256 of the client's key)",
                    );
                }
                ok.then(|| h.to_ascii_lowercase())
            });
        if let (Some(name), Some(key_sha256)) = (name, hash) {
            out.push(ClientConfig {
                name: name.to_owned(),
                key_sha256,
            });
        }
    }
    out
}

fn batching(
    c: &mut Check<'_>,
    raw: &RawBatching,
    upstreams: &[UpstreamConfig],
    warnings: &mut Vec<String>,
) -> BatchingConfig {
    let defaults = WindowPolicy {
        max_requests: c.count("batching.max_requests", raw.max_requests.as_ref(), 1000, 1),
        max_bytes: c.size("batching.max_bytes", raw.max_bytes.as_ref(), 100_000_000),
        max_wait: c.duration(
            "batching.max_wait",
            raw.max_wait.as_ref(),
            Duration::from_secs(300),
        ),
        on_batch_failure: c
            .failure_policy("batching.on_batch_failure", raw.on_batch_failure.as_deref())
            .unwrap_or(FailurePolicy::Resubmit),
        resubmit_limit: c.count_u32("batching.resubmit_limit", raw.resubmit_limit.as_ref(), 2, 0),
        fallback_margin: c.duration(
            "batching.fallback_margin",
            raw.fallback_margin.as_ref(),
            Duration::from_secs(300),
        ),
        max_enqueued_tokens: raw
            .max_enqueued_tokens
            .as_ref()
            .map(|v| c.count("batching.max_enqueued_tokens", Some(v), 1, 1)),
        expected_turnaround: c.duration(
            "batching.expected_turnaround",
            raw.expected_turnaround.as_ref(),
            Duration::ZERO,
        ),
    };
    let poll_interval = c.duration(
        "batching.poll_interval",
        raw.poll_interval.as_ref(),
        Duration::from_secs(30),
    );
    if poll_interval.is_zero() {
        c.fail("batching.poll_interval", "must be greater than zero");
    }
    let mut models = Vec::new();
    for (i, m) in raw.models.iter().enumerate() {
        let k = format!("batching.models[{i}]");
        let pattern = c
            .required(&format!("{k}.model"), m.model.as_deref())
            .and_then(|p| c.pattern(&format!("{k}.model"), p));
        let entry = ModelBatching {
            model: match pattern {
                Some(p) => p,
                None => continue,
            },
            max_requests: m
                .max_requests
                .as_ref()
                .map(|v| c.count(&format!("{k}.max_requests"), Some(v), 1, 1)),
            max_bytes: m
                .max_bytes
                .as_ref()
                .map(|v| c.size(&format!("{k}.max_bytes"), Some(v), 1)),
            max_wait: m
                .max_wait
                .as_ref()
                .map(|v| c.duration(&format!("{k}.max_wait"), Some(v), Duration::ZERO)),
            on_batch_failure: c.failure_policy(
                &format!("{k}.on_batch_failure"),
                m.on_batch_failure.as_deref(),
            ),
            resubmit_limit: m
                .resubmit_limit
                .as_ref()
                .map(|v| c.count_u32(&format!("{k}.resubmit_limit"), Some(v), 0, 0)),
            fallback_margin: m
                .fallback_margin
                .as_ref()
                .map(|v| c.duration(&format!("{k}.fallback_margin"), Some(v), Duration::ZERO)),
            max_enqueued_tokens: m
                .max_enqueued_tokens
                .as_ref()
                .map(|v| c.count(&format!("{k}.max_enqueued_tokens"), Some(v), 1, 1)),
            expected_turnaround: m
                .expected_turnaround
                .as_ref()
                .map(|v| c.duration(&format!("{k}.expected_turnaround"), Some(v), Duration::ZERO)),
        };
        models.push(entry);
    }
    let mut dialects: Vec<Dialect> = upstreams.iter().map(|u| u.dialect).collect();
    dialects.dedup();
    for d in dialects {
        let (max_requests, max_bytes) = d.limits();
        if defaults.max_requests > max_requests || defaults.max_bytes > max_bytes {
            warnings.push(format!(
                "batching limits exceed what {} accepts per job; capped at {} requests and {} for its upstreams",
                d.as_str(),
                max_requests,
                bytesize::ByteSize::b(max_bytes).to_string_as(false)
            ));
        }
    }
    BatchingConfig {
        defaults,
        poll_interval,
        results_ttl: c.duration(
            "batching.results_ttl",
            raw.results_ttl.as_ref(),
            Duration::from_secs(7 * 24 * 3600),
        ),
        delete_files: raw.delete_files.unwrap_or(true),
        call_timeout: positive(c, "batching.call_timeout", raw.call_timeout.as_ref()),
        idle_timeout: positive(c, "batching.idle_timeout", raw.idle_timeout.as_ref()),
        max_result_line: c.size(
            "batching.max_result_line",
            raw.max_result_line.as_ref(),
            64 * 1024 * 1024,
        ),
        max_pending: raw
            .max_pending
            .as_ref()
            .map(|v| c.count("batching.max_pending", Some(v), 1, 1)),
        max_pending_per_client: Some(c.count(
            "batching.max_pending_per_client",
            raw.max_pending_per_client.as_ref(),
            DEFAULT_MAX_PENDING_PER_CLIENT,
            1,
        )),
        max_open_windows_per_client: c.count(
            "batching.max_open_windows_per_client",
            raw.max_open_windows_per_client.as_ref(),
            DEFAULT_MAX_OPEN_WINDOWS_PER_CLIENT,
            1,
        ),
        models,
    }
}

/// A files and batch call timeout (default 60 s), which must not be zero.
fn positive(c: &mut Check<'_>, key: &str, raw: Option<&Scalar>) -> Duration {
    let timeout = c.duration(key, raw, Duration::from_secs(60));
    if timeout.is_zero() {
        c.fail(key, "must be greater than zero");
    }
    timeout
}

fn rules(
    c: &mut Check<'_>,
    raw: &[RawRule],
    broken: &HashSet<String>,
    clients: &[ClientConfig],
) -> Vec<RuleConfig> {
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let k = format!("rules[{i}]");
        if broken.contains(&k) {
            continue;
        }
        let mode_key = format!("{k}.mode");
        let mode = match r.mode.as_deref() {
            None => {
                c.fail(&mode_key, "is required (wait|async|now)");
                None
            }
            Some(m) => c.choice(
                &mode_key,
                "mode",
                Some(m),
                &[
                    ("wait", Mode::Wait),
                    ("async", Mode::Async),
                    ("now", Mode::Now),
                ],
            ),
        };
        let path = r
            .path
            .as_deref()
            .map(|p| c.pattern(&format!("{k}.path"), p));
        let model = r
            .model
            .as_deref()
            .map(|p| c.pattern(&format!("{k}.model"), p));
        if let Some(name) = r.client.as_deref() {
            if !clients.iter().any(|cl| cl.name == name) {
                c.fail(
                    format!("{k}.client"),
                    format!("no [[clients]] entry is named \"{name}\""),
                );
            }
        }
        if let (Some(mode), Some(path), Some(model)) =
            (mode, path.transpose_ok(), model.transpose_ok())
        {
            out.push(RuleConfig {
                path,
                model,
                client: r.client.clone(),
                mode,
            });
        }
    }
    out
}

/// `Some(Some(p))`/`None` → present and valid or absent; `Some(None)` → invalid.
trait TransposeOk<T> {
    fn transpose_ok(self) -> Option<Option<T>>;
}

impl<T> TransposeOk<T> for Option<Option<T>> {
    fn transpose_ok(self) -> Option<Option<T>> {
        match self {
            None => Some(None),
            Some(Some(v)) => Some(Some(v)),
            Some(None) => None,
        }
    }
}

fn webhooks(c: &mut Check<'_>, raw: &RawWebhooks) -> WebhooksConfig {
    let mut sources: Vec<(String, String)> = Vec::new();
    if let Some(s) = &raw.secret {
        sources.push(("webhooks.secret".into(), s.clone()));
    }
    if let Some(var) = &raw.secret_env {
        if let Some(s) = c.env_var("webhooks.secret_env", var) {
            sources.push(("webhooks.secret_env".into(), s));
        }
    }
    for (i, s) in raw.secrets.iter().enumerate() {
        sources.push((format!("webhooks.secrets[{i}]"), s.clone()));
    }
    let mut secrets = Vec::new();
    for (key, value) in sources {
        let decoded = value.strip_prefix("whsec_").and_then(|b64| {
            let engine = base64::engine::general_purpose::STANDARD;
            engine
                .decode(b64)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
                .ok()
        });
        match decoded {
            Some(bytes) if bytes.len() >= 24 && bytes.len() <= 64 => {
                secrets.push(WebhookSecret(bytes));
            }
            // Never echo the value: it is a secret even when malformed.
            _ => c.fail(
                key,
                "expected \"whsec_\" followed by base64 of 24 to 64 random bytes",
            ),
        }
    }
    let schedule = match &raw.schedule {
        None => DEFAULT_SCHEDULE.to_vec(),
        Some(items) if items.is_empty() => {
            c.fail("webhooks.schedule", "must list at least one delay");
            DEFAULT_SCHEDULE.to_vec()
        }
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, d)| c.duration(&format!("webhooks.schedule[{i}]"), Some(d), Duration::ZERO))
            .collect(),
    };
    for (i, h) in raw.allow_hosts.iter().enumerate() {
        if h.trim().is_empty() || h.contains('/') {
            c.fail(
                format!("webhooks.allow_hosts[{i}]"),
                format!("invalid host \"{h}\", expected a host name or IP address"),
            );
        }
    }
    WebhooksConfig {
        secrets,
        max_attempts: c.count_u32("webhooks.max_attempts", raw.max_attempts.as_ref(), 8, 1),
        allow_hosts: raw
            .allow_hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect(),
        timeout: c.duration(
            "webhooks.timeout",
            raw.timeout.as_ref(),
            Duration::from_secs(15),
        ),
        schedule,
    }
}

fn fraction(c: &mut Check<'_>, key: &str, v: Option<f64>, default: f64) -> f64 {
    match v {
        None => default,
        Some(f) if (0.0..=1.0).contains(&f) => f,
        Some(f) => {
            c.fail(
                key,
                format!("invalid discount {f}, expected a fraction from 0 to 1"),
            );
            default
        }
    }
}

fn prices(c: &mut Check<'_>, raw: &RawPrices, upstreams: &[&str]) -> PricesConfig {
    let batch_discount = fraction(c, "prices.batch_discount", raw.batch_discount, 0.5);
    let flex_discount = fraction(c, "prices.flex_discount", raw.flex_discount, 0.5);
    let mut models = Vec::new();
    for (i, p) in raw.models.iter().enumerate() {
        let k = format!("prices.models[{i}]");
        let pattern = c
            .required(&format!("{k}.model"), p.model.as_deref())
            .and_then(|m| c.pattern(&format!("{k}.model"), m));
        let mut price = |field: &str, v: Option<f64>| match v {
            Some(f) if f >= 0.0 && f.is_finite() => Some(f),
            Some(f) => {
                c.fail(
                    format!("{k}.{field}"),
                    format!("invalid price {f}, expected USD per 1M tokens >= 0"),
                );
                None
            }
            None => {
                c.fail(format!("{k}.{field}"), "is required (USD per 1M tokens)");
                None
            }
        };
        let input = price("input", p.input);
        let output = price("output", p.output);
        let discount = fraction(
            c,
            &format!("{k}.batch_discount"),
            p.batch_discount,
            batch_discount,
        );
        let flex = fraction(
            c,
            &format!("{k}.flex_discount"),
            p.flex_discount,
            flex_discount,
        );
        if let Some(name) = &p.upstream {
            if !upstreams.contains(&name.as_str()) {
                c.fail(
                    format!("{k}.upstream"),
                    format!("names no [[upstreams]] entry: {name:?}"),
                );
            }
        }
        if let (Some(model), Some(input), Some(output)) = (pattern, input, output) {
            models.push(ModelPrice {
                model,
                upstream: p.upstream.clone(),
                input,
                output,
                batch_discount: discount,
                flex_discount: flex,
            });
        }
    }
    PricesConfig {
        batch_discount,
        flex_discount,
        models,
    }
}
