//! The HTTP edge under hostile or odd input, through the real surface:
//! slow and half-sent heads, bodies from callers nobody accepts, connection
//! caps, malformed credentials, handles behind a passthrough upstream,
//! header values that overflow, and query strings that do not parse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use carpool::sim::{self, SimHandle, SimOptions};
use serde_json::{json, Value};
use support::config::{key_sha256, SimConfig};
use support::{client, post_chat, settled, TestApp, CHAT, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALICE: &str = "sk-alice";

fn chat(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 8})
}

async fn managed(server: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new("openai", &sim)
        .server(server)
        .client("alice", ALICE)
        .batching("max_wait = \"100ms\"");
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

/// Upstream 0 managed (alice only, `mistral-*`), upstream 1 passthrough
/// (`gpt-*`): the layout under which handle calls used to be judged by
/// upstream 0 alone.
async fn managed_then_passthrough() -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let base = sim.base_url();
    let toml = format!(
        r#"
[[upstreams]]
name = "mgd"
dialect = "mistral"
base_url = "{base}"
api_key_env = "UPSTREAM_KEY"
auth = "managed"
models = ["mistral-*"]

[[upstreams]]
name = "pt"
dialect = "openai"
base_url = "{base}"
auth = "passthrough"
models = ["gpt-*"]

[[clients]]
name = "alice"
key_sha256 = "{alice}"

[batching]
poll_interval = "50ms"
max_wait = "100ms"
"#,
        alice = key_sha256(ALICE)
    );
    let app = TestApp::start(&toml, &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

/// Reads until the peer closes; `None` if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok().map(|()| seen)
}

/// The status code of the first response on `stream`, read as it arrives.
async fn first_status(stream: &mut TcpStream, within: Duration) -> Option<u16> {
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while !seen.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    let line = String::from_utf8_lossy(&seen).to_string();
    line.split(' ').nth(1)?.parse().ok()
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_timeout() {
    let (app, _sim) = managed("header_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Without a timer hyper never enforces the head's timeout: the
    // connection stayed open and silent for as long as anyone waited.
    assert!(
        closed_within(&mut stream, PATIENCE).await.is_some(),
        "a connection that never finished its head is still open"
    );
}

#[tokio::test]
async fn a_caller_nobody_accepts_gets_401_before_its_body_is_read() {
    let (app, _sim) = managed("max_body = \"10MB\"").await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let length = 9 * 1024 * 1024;
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b' '; 64 * 1024]).await.unwrap();
    // The rest of the 9 MB is never sent: the answer must not wait for it.
    assert_eq!(first_status(&mut stream, PATIENCE).await, Some(401));
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_one_to_close() {
    let (app, _sim) = managed("max_connections = 1").await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = TcpStream::connect(app.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    assert_eq!(first_status(&mut first, PATIENCE).await, Some(200));
    // `first` stays open (keep-alive), holding the only slot.
    let mut second = TcpStream::connect(app.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    assert_eq!(
        first_status(&mut second, Duration::from_millis(500)).await,
        None,
        "a second connection was served while the cap was reached"
    );
    drop(first);
    assert_eq!(first_status(&mut second, PATIENCE).await, Some(200));
}

#[tokio::test]
async fn passthrough_callers_behind_a_managed_first_upstream_read_their_own_handles() {
    let (app, _sim) = managed_then_passthrough().await;
    let owner = "sk-user-own-openai-key";
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_chat(&app, owner, &[("carpool-mode", "async")], &body).await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Used to be 401 on every handle call: judged by upstream 0 alone.
    let object = settled(&app, owner, &id).await;
    assert_eq!(object["status"], "succeeded", "{object}");
    let result = client()
        .get(app.url(&format!("/v1/carpool/requests/{id}/result")))
        .bearer_auth(owner)
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    for other in ["sk-someone-else", ALICE] {
        let resp = client()
            .get(app.url(&format!("/v1/carpool/requests/{id}")))
            .bearer_auth(other)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{other} read another's handle");
    }
}

async fn raw_post(app: &TestApp, authorization: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = client()
        .post(app.url(CHAT))
        .header("carpool-mode", "async")
        .json(body);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

async fn listed(app: &TestApp, authorization: &str) -> Vec<String> {
    let page: Value = client()
        .get(app.url("/v1/carpool/requests"))
        .header("authorization", authorization)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_deferral_without_a_well_formed_key_is_refused_under_passthrough() {
    let (app, _sim) = managed_then_passthrough().await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]});
    for authorization in [
        None,
        Some("Basic dXNlcjpwYXNz"),
        Some("Token sk-x"),
        Some("Bearer"),
    ] {
        let resp = raw_post(&app, authorization, &body).await;
        assert_eq!(resp.status(), 401, "{authorization:?}");
        let error: Value = resp.json().await.unwrap();
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    // Nothing was stored for any of them.
    assert!(listed(&app, "Basic dXNlcjpwYXNz").await.is_empty());

    // A tab between scheme and key is the same key.
    let resp = raw_post(&app, Some("Bearer\tsk-victim-key"), &body).await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(listed(&app, "Bearer sk-victim-key").await, vec![id]);
    assert!(listed(&app, "Bearer\tsk-attacker-key").await.is_empty());
    assert!(listed(&app, "Basic sk-victim-key").await.is_empty());
}

#[tokio::test]
async fn overflowing_header_values_are_answered_not_panicked() {
    let (app, _sim) = managed("").await;
    // A Prefer wait too long to add to the clock: clamped, the caller still
    // gets its answer (the request was stored before the wait began).
    let resp = post_chat(
        &app,
        ALICE,
        &[("prefer", "respond-async, wait=18446744073709551615")],
        &chat("prefer"),
    )
    .await;
    assert!(
        [200, 202].contains(&resp.status().as_u16()),
        "{}",
        resp.status()
    );
    // Declared read timeouts too large to be a deadline: the call is held
    // and served by its batch like one without a declared timeout.
    for timeout in ["1e16", "1e19", "1e20", "1e400"] {
        let resp = post_chat(
            &app,
            ALICE,
            &[
                ("carpool-mode", "wait"),
                ("x-stainless-read-timeout", timeout),
            ],
            &chat(timeout),
        )
        .await;
        assert_eq!(resp.status(), 200, "{timeout}");
        assert_eq!(
            resp.headers()["carpool-served-by"],
            "batch",
            "{timeout} made a deadline that already passed"
        );
    }
}

#[tokio::test]
async fn a_deadline_in_the_past_is_refused_and_nothing_is_stored() {
    let (app, _sim) = managed("").await;
    for deadline in ["1970-01-01T00:00:01Z", "2001-09-09T01:46:40Z"] {
        let resp = post_chat(
            &app,
            ALICE,
            &[("carpool-mode", "async"), ("carpool-deadline", deadline)],
            &chat(deadline),
        )
        .await;
        assert_eq!(resp.status(), 400, "{deadline}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["param"], "Carpool-Deadline", "{error}");
    }
    assert!(listed(&app, &format!("Bearer {ALICE}")).await.is_empty());
}

#[tokio::test]
async fn query_strings_that_do_not_parse_get_openai_style_errors() {
    let (app, _sim) = managed("admin_token = \"tok\"").await;
    let cases = [
        ("/v1/carpool/requests?limit=abc", ALICE),
        ("/admin/dead-letters?limit=-1", "tok"),
    ];
    for (path, key) in cases {
        let resp = client()
            .get(app.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let error: Value = resp.json().await.expect("a JSON error body");
        assert!(error["error"]["message"].is_string(), "{path}: {error}");
        assert_eq!(error["error"]["param"], "limit", "{path}: {error}");
    }
}

#[tokio::test]
async fn an_sdk_retry_after_a_failure_is_a_new_request_and_while_queued_reattaches() {
    let (app, sim) = managed("").await;
    let body = chat("retry me");
    sim.add_fault(carpool::sim::Fault::FailLines {
        custom_ids: Vec::new(),
        fraction: 1.0,
        status: 500,
    });
    let retry_count =
        |count: &'static str| [("carpool-mode", "wait"), ("x-stainless-retry-count", count)];
    let first = post_chat(&app, ALICE, &retry_count("0"), &body).await;
    assert_eq!(first.status(), 500);
    let first_id = first.headers()["carpool-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    sim.clear_faults();
    // The SDK retries the 500 byte for byte: it used to get the stored 500
    // back at once, the same id, and never a second try.
    let retry = post_chat(&app, ALICE, &retry_count("1"), &body).await;
    assert_eq!(retry.status(), 200);
    let retry_id = retry.headers()["carpool-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        retry_id, first_id,
        "the retry re-attached to the failed request"
    );

    // A retry of a request still queued re-attaches to it.
    let queued = post_chat(&app, ALICE, &[("carpool-mode", "async")], &chat("queued")).await;
    let queued_id = queued.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let again = post_chat(
        &app,
        ALICE,
        &[("carpool-mode", "async"), ("x-stainless-retry-count", "1")],
        &chat("queued"),
    )
    .await;
    assert_eq!(
        again.json::<Value>().await.unwrap()["id"],
        queued_id.as_str()
    );
}

#[tokio::test]
async fn the_sqlite_store_creates_its_missing_folder() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("nested").join("carpool.db");
    let url = format!("sqlite://{}", db.display());
    let config = SimConfig::new("openai", &sim).batching("max_wait = \"100ms\"");
    let app = TestApp::start(
        &config.toml(),
        &[
            ("UPSTREAM_KEY", "sk-upstream"),
            ("CARPOOL_STORE__URL", &url),
        ],
    )
    .await;
    let resp = post_chat(&app, "k", &[("carpool-mode", "wait")], &chat("dir")).await;
    assert_eq!(resp.status(), 200);
    assert!(db.exists(), "no database at {}", db.display());
}

#[tokio::test]
async fn window_gauges_are_exact_at_the_scrape() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new("openai", &sim)
        .batching("max_wait = \"1h\"")
        .extra("[[batching.models]]\nmodel = \"m\"\n");
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    // Let the flusher make its first pass over an empty store.
    let _ = support::metrics(&app).await;
    for n in 1..=3 {
        let resp = post_chat(
            &app,
            "k",
            &[("carpool-mode", "async")],
            &chat(&format!("g{n}")),
        )
        .await;
        assert_eq!(resp.status(), 202);
        // The scrape right after intake counts the request: the flusher's
        // pass (every few seconds when idle) used to be the only refresh.
        let text = support::metrics(&app).await;
        assert_eq!(
            support::metric(&text, "carpool_window_requests{model=\"m\"}"),
            f64::from(n),
            "{text}"
        );
    }
}
