//! Webhooks through the HTTP surface, against the simulated provider and a
//! small receiver on 127.0.0.1 that records every delivery: signed (checked
//! with the independent `standardwebhooks` crate), retried with one stable
//! `webhook-id`, stopped by 410, kept across a kill -9, refused for private
//! targets, and dead letters listed and replayed through the admin API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use carpool::model::{DeliveryId, RequestId};
use carpool::sim::{self, SimHandle, SimOptions};
use carpool::store::{DeliveryMode, DeliveryState, NewRequest, WindowLimits};
use serde_json::{json, Value};
use sqlx::Connection as _;
use support::binary::{self, Binary};
use support::config::SimConfig;
use support::{client, metrics, request_object, TestApp, CHAT, PATIENCE};
use tokio::time::Instant;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ROTATED: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Ita2V5LXJvdGF0aW9uISE=";
const ADMIN: &str = "admin-token-for-webhooks";

// ---- the receiver ---------------------------------------------------------

/// One POST the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
    answered: u16,
}

impl Hit {
    fn id(&self) -> String {
        self.headers["webhook-id"].to_str().unwrap().to_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Script {
    /// Statuses to answer, in order; then `otherwise`.
    next: Mutex<VecDeque<u16>>,
    /// Answer 503 to everything while false (after `next` is used up).
    accepting: AtomicBool,
    hits: Mutex<Vec<Hit>>,
}

struct Receiver {
    addr: SocketAddr,
    script: Arc<Script>,
}

impl Receiver {
    async fn start(answers: &[u16]) -> Self {
        let script = Arc::new(Script {
            next: Mutex::new(answers.iter().copied().collect()),
            accepting: AtomicBool::new(true),
            hits: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(record)
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, script }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.script.hits.lock().unwrap().clone()
    }

    fn accept(&self, yes: bool) {
        self.script.accepting.store(yes, Ordering::SeqCst);
    }

    async fn until_hits(&self, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} deliveries arrived",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn record(State(script): State<Arc<Script>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let scripted = script.next.lock().unwrap().pop_front();
    let status = scripted.unwrap_or(if script.accepting.load(Ordering::SeqCst) {
        204
    } else {
        503
    });
    script.hits.lock().unwrap().push(Hit {
        headers,
        body,
        answered: status,
    });
    StatusCode::from_u16(status).unwrap()
}

// ---- carpool in-process ---------------------------------------------------

fn config(sim: &SimHandle, webhooks: &str) -> String {
    SimConfig::new("openai", sim)
        .server("admin_token_env = \"WEBHOOK_TEST_ADMIN\"")
        .batching("max_wait = \"100ms\"")
        .extra(&format!(
            r#"[webhooks]
secrets = ["{SECRET}", "{ROTATED}"]
schedule = ["50ms"]
timeout = "2s"
{webhooks}
"#
        ))
        .toml()
}

async fn setup(webhooks: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let app = TestApp::start(
        &config(&sim, webhooks),
        &[("UPSTREAM_KEY", "sk-up"), ("WEBHOOK_TEST_ADMIN", ADMIN)],
    )
    .await;
    (app, sim)
}

fn chat(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 8})
}

async fn post_with_callback(base: &str, callback: &str, text: &str) -> reqwest::Response {
    client()
        .post(format!("{base}{CHAT}"))
        .bearer_auth("sk-caller")
        .header("carpool-callback", callback)
        .json(&chat(text))
        .send()
        .await
        .unwrap()
}

/// Sends a callback request; it must be accepted with 202; returns its id.
async fn accepted(app: &TestApp, callback: &str, text: &str) -> String {
    let resp = post_with_callback(&app.url(""), callback, text).await;
    assert_eq!(resp.status(), 202);
    let object: Value = resp.json().await.unwrap();
    assert_eq!(object["status"], "queued");
    object["id"].as_str().unwrap().to_owned()
}

fn delivery_of(request: &str) -> DeliveryId {
    DeliveryId::for_request(&RequestId::parse(request).unwrap())
}

/// Waits until the delivery of `request` is in `state`.
async fn until_state(app: &TestApp, request: &str, state: DeliveryState) -> u32 {
    let id = delivery_of(request);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(d) = app.state.webhooks.store.delivery(&id).await.unwrap() {
            if d.state == state {
                return d.attempts;
            }
        }
        assert!(
            Instant::now() < deadline,
            "delivery of {request} never became {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn admin(app: &TestApp, method: reqwest::Method, path: &str) -> (u16, Value) {
    let resp = client()
        .request(method, app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

// ---- tests ----------------------------------------------------------------

#[tokio::test]
async fn delivery_is_signed_by_every_secret_and_verifies_with_the_reference_library() {
    let receiver = Receiver::start(&[]).await;
    let (app, _sim) = setup("allow_hosts = [\"127.0.0.1\"]").await;
    let id = accepted(&app, &receiver.url(), "hello").await;
    let hits = receiver.until_hits(1).await;
    let hit = &hits[0];

    // Any one of the configured secrets verifies it, per the reference crate.
    for secret in [SECRET, ROTATED] {
        let wh = standardwebhooks::Webhook::new(secret).unwrap();
        wh.verify(&hit.body, &hit.headers).unwrap();
    }
    let other = standardwebhooks::Webhook::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
    assert!(
        other.verify(&hit.body, &hit.headers).is_err(),
        "a foreign key must not verify"
    );
    let mut tampered = hit.body.to_vec();
    tampered.push(b' ');
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    assert!(wh.verify(&tampered, &hit.headers).is_err());

    let signatures = hit.headers["webhook-signature"].to_str().unwrap();
    assert_eq!(signatures.split(' ').count(), 2);
    assert!(signatures.split(' ').all(|s| s.starts_with("v1,")));
    assert_eq!(hit.id(), delivery_of(&id).as_str());
    assert_eq!(hit.headers["content-type"], "application/json");

    let body = hit.json();
    assert_eq!(body["type"], "carpool.request.succeeded");
    assert!(humantime::parse_rfc3339(body["timestamp"].as_str().unwrap()).is_ok());
    assert_eq!(body["data"]["id"], id.as_str());
    assert_eq!(body["data"]["object"], "carpool.request");
    assert_eq!(body["data"]["status"], "succeeded");
    assert_eq!(body["data"]["response"]["status_code"], 200);
    assert_eq!(body["data"]["served_by"], "batch");
    // The same object the handle shows.
    let handle = request_object(&app, "sk-caller", &id).await;
    assert_eq!(handle, body["data"]);

    until_state(&app, &id, DeliveryState::Delivered).await;
    let text = metrics(&app).await;
    assert!(
        text.contains("carpool_webhook_deliveries_total{outcome=\"delivered\"} 1"),
        "{text}"
    );
    assert!(text.contains("carpool_webhook_attempts_total{result=\"success\"} 1"));
    assert!(text.contains("carpool_webhook_delivery_seconds_count 1"));
    assert!(text.contains("carpool_webhook_outbox_pending"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_receiver_failing_twice_gets_one_success_on_the_third_attempt_with_the_same_id() {
    let receiver = Receiver::start(&[500, 503]).await;
    let (app, _sim) = setup("allow_hosts = [\"127.0.0.1\"]").await;
    let id = accepted(&app, &receiver.url(), "third time lucky").await;
    let attempts = until_state(&app, &id, DeliveryState::Delivered).await;
    assert_eq!(attempts, 3);
    let hits = receiver.hits();
    let answered: Vec<u16> = hits.iter().map(|h| h.answered).collect();
    assert_eq!(
        answered,
        vec![500, 503, 204],
        "exactly one success, on the third attempt"
    );
    assert!(hits.iter().all(|h| h.id() == delivery_of(&id).as_str()));
    assert!(
        hits.iter().all(|h| h.body == hits[0].body),
        "the same bytes each time"
    );
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    for h in &hits {
        wh.verify(&h.body, &h.headers).unwrap();
    }
    let text = metrics(&app).await;
    assert!(
        text.contains("carpool_webhook_attempts_total{result=\"http_error\"} 2"),
        "{text}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_410_stops_retries_at_once_and_leaves_a_dead_letter() {
    let receiver = Receiver::start(&[410]).await;
    let (app, _sim) = setup("allow_hosts = [\"127.0.0.1\"]").await;
    let id = accepted(&app, &receiver.url(), "gone").await;
    let attempts = until_state(&app, &id, DeliveryState::Dead).await;
    assert_eq!(attempts, 1);
    assert_eq!(receiver.hits().len(), 1);
    let (status, list) = admin(&app, reqwest::Method::GET, "/admin/dead-letters").await;
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["request_id"], id.as_str());
    assert_eq!(list["data"][0]["last_status"], 410);
    assert!(metrics(&app)
        .await
        .contains("carpool_webhook_deliveries_total{outcome=\"gone\"} 1"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_one_or_all_through_the_admin_api() {
    let receiver = Receiver::start(&[500, 500, 500, 500]).await;
    let (app, _sim) = setup("allow_hosts = [\"127.0.0.1\"]\nmax_attempts = 2").await;
    let first = accepted(&app, &receiver.url(), "one").await;
    let second = accepted(&app, &receiver.url(), "two").await;
    until_state(&app, &first, DeliveryState::Dead).await;
    until_state(&app, &second, DeliveryState::Dead).await;
    assert_eq!(receiver.hits().len(), 4);

    let (status, list) = admin(&app, reqwest::Method::GET, "/admin/dead-letters").await;
    assert_eq!(status, 200);
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        assert_eq!(d["attempts"], 2);
        assert_eq!(d["last_status"], 500);
        assert!(d["reason"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 attempts"));
        assert_eq!(d["url"], receiver.url().as_str());
        assert_eq!(d["type"], "carpool.request.succeeded");
    }

    let one = delivery_of(&first);
    let (status, replayed) = admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/dead-letters/{one}/replay"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(replayed["replayed"], true);
    until_state(&app, &first, DeliveryState::Delivered).await;
    let (status, _) = admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/dead-letters/{one}/replay"),
    )
    .await;
    assert_eq!(status, 404, "no longer a dead letter");
    let (status, _) = admin(
        &app,
        reqwest::Method::POST,
        "/admin/dead-letters/msg_nope/replay",
    )
    .await;
    assert_eq!(status, 404);

    let (status, all) = admin(&app, reqwest::Method::POST, "/admin/dead-letters/replay").await;
    assert_eq!(status, 200);
    assert_eq!(all["replayed"], 1);
    until_state(&app, &second, DeliveryState::Delivered).await;

    let hits = receiver.hits();
    assert_eq!(hits.len(), 6);
    for request in [&first, &second] {
        let mine: Vec<&Hit> = hits
            .iter()
            .filter(|h| h.id() == delivery_of(request).as_str())
            .collect();
        assert_eq!(
            mine.len(),
            3,
            "the same webhook-id on every attempt and the replay"
        );
        assert_eq!(mine.iter().filter(|h| h.answered == 204).count(), 1);
    }
    let (_, list) = admin(&app, reqwest::Method::GET, "/admin/dead-letters").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn admin_dead_letter_routes_refuse_a_missing_or_wrong_token() {
    let (app, _sim) = setup("").await;
    let routes = [
        (reqwest::Method::GET, "/admin/dead-letters"),
        (reqwest::Method::POST, "/admin/dead-letters/replay"),
        (
            reqwest::Method::POST,
            "/admin/dead-letters/msg_00000000000000000000000000000000/replay",
        ),
    ];
    for (method, path) in routes {
        let none = client()
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(none.status(), 401, "{path}");
        let wrong = client()
            .request(method, app.url(path))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let body: Value = wrong.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_callback_to_a_private_address_or_another_scheme_is_refused_at_intake() {
    let receiver = Receiver::start(&[]).await;
    let (app, _sim) = setup("").await;
    let port = receiver.addr.port();
    for callback in [
        receiver.url(),
        format!("http://localhost:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.7/hook".to_owned(),
        "ftp://hooks.example.com/x".to_owned(),
        "not a url".to_owned(),
    ] {
        let resp = post_with_callback(&app.url(""), &callback, "refused").await;
        assert_eq!(resp.status(), 400, "{callback}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_callback", "{callback}");
        assert_eq!(body["error"]["param"], "Carpool-Callback");
    }
    // Nothing was stored for any of them.
    let list: Value = client()
        .get(app.url("/v1/carpool/requests"))
        .bearer_auth("sk-caller")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
    assert!(receiver.hits().is_empty());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_callback_is_refused_without_a_signing_secret() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let text = config(&sim, "").replace(&format!("secrets = [\"{SECRET}\", \"{ROTATED}\"]"), "");
    let app = TestApp::start(
        &text,
        &[("UPSTREAM_KEY", "sk-up"), ("WEBHOOK_TEST_ADMIN", ADMIN)],
    )
    .await;
    let resp = post_with_callback(&app.url(""), "https://hooks.example.com/x", "unsigned").await;
    assert_eq!(resp.status(), 422);
    app.stop().await.unwrap();
}

/// A name intake could not judge (it is not resolved then) that resolves to
/// loopback at delivery: as if its DNS changed between the two. The request
/// goes in through the store, since intake refuses `localhost` by name.
#[tokio::test]
async fn a_host_name_resolving_to_loopback_is_refused_at_delivery() {
    let receiver = Receiver::start(&[]).await;
    // The address is allow-listed, the name is not: the guard judges names.
    let (app, _sim) = setup("allow_hosts = [\"127.0.0.1\"]").await;
    let body = serde_json::to_vec(&chat("rebound")).unwrap();
    let id = RequestId::generate();
    app.state
        .deferral
        .store
        .accept(NewRequest {
            id: id.clone(),
            credential_hash: "c".into(),
            upstream: "sim".into(),
            endpoint: CHAT.into(),
            model: "m".into(),
            scope: carpool::model::Scope::default(),
            forward_headers: Vec::new(),
            body_hash: "h".into(),
            body: Bytes::from(body),
            idempotency_key: None,
            sdk_retry: false,
            mode: DeliveryMode::Callback,
            deadline: None,
            callback_url: Some(format!("http://localhost:{}/hook", receiver.addr.port())),
            upstream_key: None,
            limits: WindowLimits {
                max_requests: 100,
                max_bytes: 1_000_000,
            },
            now: carpool::deferral::engine::now_ms(),
        })
        .await
        .unwrap();
    app.state.deferral.flush_wake.notify_one();
    let attempts = until_state(&app, id.as_str(), DeliveryState::Dead).await;
    assert_eq!(attempts, 1, "a refusal is final, not retried");
    assert!(receiver.hits().is_empty());
    let (_, list) = admin(&app, reqwest::Method::GET, "/admin/dead-letters").await;
    let reason = list["data"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("loopback"), "{reason}");
    assert!(metrics(&app)
        .await
        .contains("carpool_webhook_deliveries_total{outcome=\"refused\"} 1"));
    app.stop().await.unwrap();
}

// ---- crash: the real binary -----------------------------------------------

/// The outbox as the store holds it: delivery id → (state, last status).
async fn outbox(db: &Path) -> BTreeMap<String, (String, Option<i64>)> {
    let mut conn = binary::read_only(db).await;
    let rows: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT id, state, last_status FROM webhook_deliveries")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    conn.close().await.unwrap();
    rows.into_iter().map(|(id, s, a)| (id, (s, a))).collect()
}

async fn until_outbox(
    db: &Path,
    what: &str,
    ok: impl Fn(&BTreeMap<String, (String, Option<i64>)>) -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if db.exists() {
            let rows = outbox(db).await;
            if ok(&rows) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outbox never got {what}: {rows:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_a_kill_9_and_each_is_delivered_once_after_restart() {
    const N: usize = 6;
    let receiver = Receiver::start(&[]).await;
    receiver.accept(false);
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("carpool.db");
    let config = SimConfig::new("openai", &sim)
        .binary(&db)
        .batching("max_wait = \"100ms\"")
        .extra(&format!(
            r#"[webhooks]
secret = "{SECRET}"
allow_hosts = ["127.0.0.1"]
schedule = ["100ms"]
timeout = "2s"
max_attempts = 1000
"#
        ))
        .write(&dir.path().join("carpool.toml"));
    let env = [("UPSTREAM_KEY", "sk-up")];

    let mut carpool = Binary::start(&config, &env).await;
    let mut ids = Vec::new();
    for i in 0..N {
        let resp =
            post_with_callback(&carpool.url(""), &receiver.url(), &format!("crash {i}")).await;
        assert_eq!(resp.status(), 202);
        let object: Value = resp.json().await.unwrap();
        ids.push(
            delivery_of(object["id"].as_str().unwrap())
                .as_str()
                .to_owned(),
        );
    }
    // Every delivery enqueued and refused at least once, none delivered.
    // (An attempt still in flight at the kill is retried once its lease
    // runs out; the store contract covers that.)
    until_outbox(&db, "every delivery tried", |rows| {
        rows.len() == N
            && rows
                .values()
                .all(|(state, last)| state == "pending" && *last == Some(503))
    })
    .await;
    carpool.kill();
    assert!(receiver.hits().iter().all(|h| h.answered == 503));

    receiver.accept(true);
    let _carpool = Binary::start(&config, &env).await;
    until_outbox(&db, "every delivery delivered", |rows| {
        rows.len() == N && rows.values().all(|(state, _)| state == "delivered")
    })
    .await;
    let hits = receiver.hits();
    for id in &ids {
        let ok = hits
            .iter()
            .filter(|h| &h.id() == id && h.answered == 204)
            .count();
        assert_eq!(ok, 1, "{id} delivered {ok} times");
    }
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    for h in hits.iter().filter(|h| h.answered == 204) {
        wh.verify(&h.body, &h.headers).unwrap();
    }
}
