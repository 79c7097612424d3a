//! Bounds and operator views (review 2026-12): what one client can make
//! carpool create (M4), the `/metrics` model labels (L6), stored work of an
//! upstream no longer configured (L11), and callback URLs in the admin API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::StatusCode;
use carpool::sim::{self, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, TestApp, CHAT, PATIENCE};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ADMIN: &str = "admin-token-for-bounds";

/// A receiver that answers every delivery 410 Gone (dead at once).
async fn gone_receiver() -> u16 {
    let app = axum::Router::new().fallback(|| async { StatusCode::GONE });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    client()
        .get(app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

// ---- callback URLs shown to an operator ------------------------------------

#[tokio::test]
async fn the_dead_letter_listing_masks_the_callback_query() {
    const TOKEN: &str = "XYZ-DEAD-LETTER-TOKEN-4242";
    let port = gone_receiver().await;
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let toml = SimConfig::new("openai", &sim)
        .server("admin_token_env = \"BOUNDS_ADMIN\"")
        .batching("max_wait = \"100ms\"")
        .extra(&format!(
            "[webhooks]\nsecrets = [\"{SECRET}\"]\nallow_hosts = [\"127.0.0.1\"]\n"
        ))
        .toml();
    let app = TestApp::start(&toml, &[("UPSTREAM_KEY", "sk-up"), ("BOUNDS_ADMIN", ADMIN)]).await;
    let callback = format!("http://127.0.0.1:{port}/hook?token={TOKEN}&v=1");
    let resp = client()
        .post(app.url(CHAT))
        .bearer_auth("sk-caller")
        .header("carpool-callback", &callback)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let mut list = Value::Null;
    let mut found = false;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !found && tokio::time::Instant::now() < deadline {
        list = admin_get(&app, "/admin/dead-letters").await;
        found = list["data"].as_array().is_some_and(|d| !d.is_empty());
        if !found {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert!(found, "no dead letter: {list}");
    let text = list.to_string();
    assert!(!text.contains(TOKEN), "{text}");
    let url = list["data"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("http://127.0.0.1:{port}/hook?token=")),
        "{url}"
    );
    app.stop().await.unwrap();
}

// ---- L6: /metrics shows only model names the config names -----------------

#[tokio::test]
async fn an_unconfigured_model_name_never_reaches_metrics() {
    const SECRET_MODEL: &str = "ft:gpt-4o-mini:acme-corp:secret-project-7:abc123";
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let toml = SimConfig::new("openai", &sim)
        .batching("max_wait = \"100ms\"")
        .extra("[[prices.models]]\nmodel = \"priced-*\"\ninput = 1.0\noutput = 2.0\n")
        .toml();
    let app = TestApp::start(&toml, &[("UPSTREAM_KEY", "sk-up")]).await;
    for model in [SECRET_MODEL, "priced-one"] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let resp = support::post_chat(&app, "sk-caller", &[("carpool-mode", "wait")], &body).await;
        assert_eq!(resp.status(), 200, "{model}");
    }
    let text = support::metrics(&app).await;
    // Both were counted; only the configured one by name.
    assert!(text.contains("model=\"priced-one\""), "{text}");
    assert!(text.contains("model=\"_other\""), "{text}");
    assert!(!text.contains("acme-corp"), "{text}");
    assert!(!text.contains("secret-project"), "{text}");
    app.stop().await.unwrap();
}

// ---- M4: what one client can make carpool create ----------------------------

#[tokio::test]
async fn one_client_inventing_model_names_is_refused_past_its_window_cap() {
    const ALICE: &str = "sk-alice";
    const BOB: &str = "sk-bob";
    const CAP: usize = 3;
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let toml = SimConfig::new("openai", &sim)
        .server("admin_token_env = \"BOUNDS_ADMIN\"")
        .client("alice", ALICE)
        .client("bob", BOB)
        .batching(&format!(
            "max_wait = \"1h\"\nmax_open_windows_per_client = {CAP}"
        ))
        .toml();
    let app = TestApp::start(&toml, &[("UPSTREAM_KEY", "sk-up"), ("BOUNDS_ADMIN", ADMIN)]).await;
    let call = |key: &'static str, model: String| {
        let app = &app;
        async move {
            let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
            support::post_chat(app, key, &[("carpool-mode", "async")], &body).await
        }
    };
    for i in 0..CAP {
        assert_eq!(call(ALICE, format!("made-up-{i}")).await.status(), 202);
    }
    let refused = call(ALICE, format!("made-up-{CAP}")).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().get("retry-after").is_some());
    let err: Value = refused.json().await.unwrap();
    assert_eq!(err["error"]["code"], "max_open_windows_per_client", "{err}");
    assert_eq!(err["error"]["type"], "rate_limit_error", "{err}");
    // A model she already has a window for still fits, and so do others' calls.
    assert_eq!(call(ALICE, "made-up-0".to_owned()).await.status(), 202);
    assert_eq!(call(BOB, "made-up-9".to_owned()).await.status(), 202);
    // Nothing was stored for the refused call: her windows are the cap.
    let windows = admin_get(&app, "/admin/windows").await;
    let data = windows["data"].as_array().unwrap();
    assert_eq!(data.len(), CAP + 1, "{windows}");
    assert!(data.iter().all(|w| w["model"] != format!("made-up-{CAP}")));
    // Flushed, they make one provider job each: bounded by the cap.
    let flushed = client()
        .post(app.url("/admin/flush"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(flushed.status().is_success());
    assert!(support::eventually(PATIENCE, || sim.jobs().len() == CAP + 1).await);
    assert_eq!(sim.jobs().len(), CAP + 1);
    app.stop().await.unwrap();
}

// ---- L11: stored work of an upstream no longer configured -------------------

#[tokio::test]
async fn work_of_a_renamed_upstream_fails_with_upstream_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/carpool.db", dir.path().display());
    // Nothing listens there: the window is never submitted before the rename.
    let dead = support::dead_address().await;
    let config = |name: &str| {
        support::one_upstream(
            &format!("http://{dead}"),
            "\n[batching]\nmax_wait = \"1h\"\npoll_interval = \"50ms\"\n",
        )
        .replace("name = \"primary\"", &format!("name = \"{name}\""))
    };
    let vars = [
        ("UPSTREAM_KEY", "sk-up"),
        ("CARPOOL_STORE__URL", store.as_str()),
    ];
    let app = TestApp::start(&config("a"), &vars).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = support::post_chat(&app, "sk-caller", &[("carpool-mode", "async")], &body).await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.stop().await.unwrap();

    let app = TestApp::start(&config("b"), &vars).await;
    let done = support::settled(&app, "sk-caller", &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "upstream_removed", "{done}");
    assert!(
        done["error"]["message"].as_str().unwrap().contains("`a`"),
        "{done}"
    );
    app.stop().await.unwrap();
}
