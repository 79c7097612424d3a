//! Shared test helpers: the full app on port 0 ([`TestApp`]), the real
//! binary ([`binary::Binary`]), a config builder ([`config::SimConfig`]), a
//! small scripted upstream ([`upstream::Upstream`]), and what tests ask of a
//! running carpool (handles, metrics) and of the simulator.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod binary;
pub mod config;
pub mod pg;
pub mod python;
pub mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use carpool::app::{self, AppState};
use carpool::deferral::engine::now_ms;
use carpool::model::RequestId;
use carpool::sim::SimHandle;
use carpool::store::{DeliveryMode, NewRequest, WindowLimits};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on every wait for something carpool or the simulator must do.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The route every deferred test calls.
pub const CHAT: &str = "/v1/chat/completions";

/// An async chat call as intake hands it to the store (anonymous caller,
/// upstream `sim`), for tests that fill windows without HTTP.
pub fn async_request(model: &str, body: String, limits: WindowLimits) -> NewRequest {
    NewRequest {
        id: RequestId::generate(),
        credential_hash: "anonymous".to_owned(),
        upstream: "sim".to_owned(),
        endpoint: CHAT.to_owned(),
        model: model.to_owned(),
        scope: carpool::model::Scope::default(),
        forward_headers: Vec::new(),
        body_hash: format!("hash-{body}"),
        body: body.into(),
        idempotency_key: None,
        sdk_retry: false,
        mode: DeliveryMode::Async,
        deadline: None,
        callback_url: None,
        upstream_key: None,
        limits,
        now: now_ms(),
    }
}

/// A running carpool: in this process ([`TestApp`]) or the binary.
pub trait Server {
    fn url(&self, path: &str) -> String;
}

/// carpool itself, serving on 127.0.0.1:0 in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub state: AppState,
    pub shutdown: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
    /// The temporary store's folder, removed when the app is dropped.
    _dir: tempfile::TempDir,
}

impl TestApp {
    /// Starts carpool with `config_toml`; `vars` is the whole environment it
    /// sees (overrides and secrets), so tests never touch the process env.
    pub async fn start(config_toml: &str, vars: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vars.entry("CARPOOL_STORE__URL".to_owned())
            .or_insert_with(|| format!("sqlite://{}/carpool.db", dir.path().display()));
        let config = carpool::config::from_toml_str(config_toml, &vars)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let state = AppState::new(config, shutdown.clone()).await.unwrap();
        let handle = tokio::spawn(app::run(listener, state.clone()));
        Self {
            addr,
            state,
            shutdown,
            handle,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Cancels and waits for the server to finish its drain.
    pub async fn stop(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.handle.await.unwrap()
    }
}

impl Server for TestApp {
    fn url(&self, path: &str) -> String {
        TestApp::url(self, path)
    }
}

/// A plain client that never pools across tests and never follows redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut cond: F) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A config with one upstream at `base_url`, plus `extra` TOML.
pub fn one_upstream(base_url: &str, extra: &str) -> String {
    format!(
        r#"
[server]
max_body = "64KB"
request_timeout = "5s"
shutdown_grace = "10s"

[[upstreams]]
name = "primary"
dialect = "mistral"
base_url = "{base_url}"
api_key_env = "UPSTREAM_KEY"
auth = "managed"
models = ["*"]
{extra}
"#
    )
}

/// An address nothing listens on (bound, then released).
pub async fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// POSTs `body` to the chat route as caller `key`, with `headers`.
pub async fn post_chat(
    server: &impl Server,
    key: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> reqwest::Response {
    let mut req = client().post(server.url(CHAT)).bearer_auth(key).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// The request object of handle `id`, as caller `key` sees it.
pub async fn request_object(server: &impl Server, key: &str, id: &str) -> Value {
    client()
        .get(server.url(&format!("/v1/carpool/requests/{id}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until handle `id` reports a final status; returns the object.
pub async fn settled(server: &impl Server, key: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let object = request_object(server, key, id).await;
        let status = object["status"].as_str().unwrap_or_default().to_owned();
        if !["queued", "submitted"].contains(&status.as_str()) {
            return object;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "request {id} still {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `/metrics` text.
pub async fn metrics(server: &impl Server) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first sample line starting with `prefix`; 0 if none.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Every custom id the simulator saw, with how many jobs each was in.
pub fn submissions(sim: &SimHandle) -> Vec<(String, usize)> {
    let mut counts = BTreeMap::<String, usize>::new();
    for job in sim.jobs() {
        for id in job.custom_ids {
            *counts.entry(id).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}

/// The simulator's route (method and path) that creates a batch job.
pub fn create_route(dialect: &str) -> &'static str {
    match dialect {
        "mistral" => "POST /v1/batch/jobs",
        "anthropic" => "POST /v1/messages/batches",
        _ => "POST /v1/batches",
    }
}
