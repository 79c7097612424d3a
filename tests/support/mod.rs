//! Shared test helpers: the full app on port 0 ([`TestApp`]) and a small
//! scripted upstream ([`upstream::Upstream`]).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use carpool::app::{self, AppState};
use carpool::config;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
        let config = config::from_toml_str(config_toml, &vars)
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
