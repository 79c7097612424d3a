//! Hardening of the operations side (review 2026-12): webhook fairness per
//! target host (M5), callback URLs kept out of errors and logs (L1), and
//! the SSRF guard's embedded-IPv4 spellings at intake (L7).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use carpool::sim::{self, SimHandle, SimOptions};
use serde_json::{json, Value};
use support::binary::Binary;
use support::config::SimConfig;
use support::{client, eventually, TestApp, CHAT, PATIENCE};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ADMIN: &str = "admin-token-for-hardening-ops";

/// Accepts connections and never answers; counts and holds them.
struct Tarpit {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Tarpit {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        Self { port, accepted }
    }

    fn seen(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A receiver that answers 204 and counts deliveries.
async fn fast_receiver() -> (u16, Arc<Mutex<usize>>) {
    let hits = Arc::new(Mutex::new(0usize));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            *h.lock().unwrap() += 1;
            StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

fn config(sim: &SimHandle, webhooks: &str) -> SimConfig {
    SimConfig::new("openai", sim)
        .server("admin_token_env = \"HARDENING_OPS_ADMIN\"")
        .batching("max_wait = \"100ms\"")
        .extra(&format!(
            "[webhooks]\nsecrets = [\"{SECRET}\"]\n{webhooks}\n"
        ))
}

async fn post_with_callback(base: &str, callback: &str, text: &str) -> reqwest::Response {
    client()
        .post(format!("{base}{CHAT}"))
        .bearer_auth("sk-caller")
        .header("carpool-callback", callback)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 8}))
        .send()
        .await
        .unwrap()
}

async fn dead_letters(base: &str) -> Value {
    client()
        .get(format!("{base}/admin/dead-letters"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

// ---- M5: one slow receiver does not delay the others ----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tarpit_receiver_holds_only_a_few_slots_and_a_fast_receiver_is_served_meanwhile() {
    let tarpit = Tarpit::start().await;
    let (fast_port, fast_hits) = fast_receiver().await;
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    // Attempts to the tarpit only end by this timeout: long enough that
    // none ends while the test runs its course.
    let toml = config(
        &sim,
        "allow_hosts = [\"127.0.0.1\"]\nschedule = [\"50ms\"]\ntimeout = \"20s\"",
    )
    .toml();
    let app = TestApp::start(
        &toml,
        &[("UPSTREAM_KEY", "sk-up"), ("HARDENING_OPS_ADMIN", ADMIN)],
    )
    .await;
    let tarpit_url = format!("http://127.0.0.1:{}/hook", tarpit.port);
    for i in 0..100 {
        let resp = post_with_callback(&app.url(""), &tarpit_url, &format!("slow {i}")).await;
        assert_eq!(resp.status(), 202);
    }
    // The tarpit's deliveries are due and being attempted first.
    assert!(eventually(PATIENCE, || tarpit.seen() >= 1).await);
    let fast_url = format!("http://127.0.0.1:{fast_port}/hook");
    let resp = post_with_callback(&app.url(""), &fast_url, "fast").await;
    assert_eq!(resp.status(), 202);
    assert!(
        eventually(PATIENCE, || *fast_hits.lock().unwrap() >= 1).await,
        "the fast receiver never got its delivery"
    );
    // It arrived while the tarpit still held its first attempts: it did not
    // wait for tarpit attempts to time out and free every slot (16).
    let seen = tarpit.seen();
    assert!(
        seen < 16,
        "the tarpit saw {seen} attempts before the fast delivery"
    );
    app.shutdown.cancel();
}

// ---- L1: the callback's query string never reaches logs or reasons --------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_callback_token_is_in_neither_the_logs_nor_the_dead_letter() {
    const TOKEN: &str = "XYZ-RECEIVER-TOKEN-31337";
    let tarpit = Tarpit::start().await;
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        &sim,
        "allow_hosts = [\"127.0.0.1\"]\nschedule = [\"50ms\"]\ntimeout = \"300ms\"\nmax_attempts = 2",
    )
    .binary(&dir.path().join("carpool.db"))
    .write(&dir.path().join("carpool.toml"));
    let carpool = Binary::start(
        &path,
        &[
            ("UPSTREAM_KEY", "sk-up"),
            ("HARDENING_OPS_ADMIN", ADMIN),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let callback = format!("http://127.0.0.1:{}/hook?token={TOKEN}", tarpit.port);
    let resp = post_with_callback(&carpool.url(""), &callback, "tarpit").await;
    assert_eq!(resp.status(), 202);
    carpool.until_log("webhook dead-lettered").await;
    assert!(tarpit.seen() >= 2);
    let list = dead_letters(&carpool.url("")).await;
    let reason = list["data"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("timed out"), "{reason}");
    assert!(!reason.contains(TOKEN), "{reason}");
    for line in carpool.logs() {
        assert!(!line.to_string().contains(TOKEN), "{line}");
    }
}

// ---- L7: IPv6 spellings that embed a private IPv4 address -----------------

#[tokio::test]
async fn callbacks_to_embedded_ipv4_spellings_are_refused_at_intake() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let app = TestApp::start(
        &config(&sim, "").toml(),
        &[("UPSTREAM_KEY", "sk-up"), ("HARDENING_OPS_ADMIN", ADMIN)],
    )
    .await;
    for callback in [
        "http://[::ffff:0:7f00:1]/hook",
        "http://[::ffff:0:a00:1]:8080/hook",
        "http://[64:ff9b:1::a00:1]/hook",
        "http://[64:ff9b:1:7f00:1::]/hook",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook",
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook",
        "http://[2606:4700::5efe:7f00:1]/hook",
        "http://[2001:2::1]/hook",
        "http://[::1:0:0:7f00:1]/hook",
    ] {
        let resp = post_with_callback(&app.url(""), callback, "refused").await;
        assert_eq!(resp.status(), 400, "{callback}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_callback", "{callback}");
    }
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
    app.stop().await.unwrap();
}
