//! Enqueued-token quotas (SPEC section 3), through the HTTP surface against
//! the simulator's per-key, per-model limit, in both dialects: carpool's own
//! `max_enqueued_tokens` keeps a sealed window waiting (shown by
//! `carpool_windows_waiting_for_quota`) until a batch in flight finishes,
//! and a batch the provider refuses for its limit goes back to waiting
//! instead of failing its callers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use carpool::sim::{self, SimHandle, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{create_route, metric, metrics, post_chat, request_object, TestApp, PATIENCE};

const DIALECTS: [&str; 2] = ["mistral", "openai"];
const ALICE: &str = "sk-alice";

/// The same length for every `i` < 10, so every window has one estimate.
fn chat(i: usize) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": format!("question number {i}")}]})
}

/// carpool's estimate of one window holding one `chat(_)` body: bytes / 4.
fn one_window_tokens() -> u64 {
    (serde_json::to_vec(&chat(0)).unwrap().len() as u64).div_ceil(4)
}

/// Room for one window, not for two.
fn just_above_one_window() -> u64 {
    one_window_tokens() * 3 / 2
}

/// A simulator whose jobs run for an hour unless the test finishes them
/// (`SimHandle::finish_jobs`), with an enqueued-token limit of `limit`.
async fn slow_sim(limit: Option<u64>) -> SimHandle {
    sim::spawn(SimOptions {
        job_duration: Duration::from_secs(3600),
        enqueued_token_limit: limit,
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

/// carpool in front of `sim`: one request per window (sealed at intake),
/// no resubmission and failures to the caller, so only waiting can pass.
async fn start(dialect: &str, sim: &SimHandle, batching: &str) -> TestApp {
    start_on(dialect, sim, batching, None).await
}

/// [`start`], with the store at `store_url` when given (else in memory).
async fn start_on(
    dialect: &str,
    sim: &SimHandle,
    batching: &str,
    store_url: Option<&str>,
) -> TestApp {
    let config = SimConfig::new(dialect, sim)
        .client("alice", ALICE)
        .batching(
            "max_requests = 1\nmax_wait = \"1m\"\non_batch_failure = \"error\"\nresubmit_limit = 0",
        )
        .batching(batching)
        // Named in the config, so /metrics gives the model its own label.
        .extra("\n[[batching.models]]\nmodel = \"m\"\n");
    let mut vars = vec![("UPSTREAM_KEY", "sk-upstream")];
    if let Some(url) = store_url {
        vars.push(("CARPOOL_STORE__URL", url));
    }
    TestApp::start(&config.toml(), &vars).await
}

/// Two async calls; their handle ids.
async fn two_async_calls(app: &TestApp) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..2 {
        let resp = post_chat(app, ALICE, &[("carpool-mode", "async")], &chat(i)).await;
        assert_eq!(resp.status(), 202);
        ids.push(
            resp.headers()["carpool-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids
}

fn creates(sim: &SimHandle, dialect: &str) -> Vec<u16> {
    let route = create_route(dialect);
    sim.calls()
        .into_iter()
        .filter(|c| format!("{} {}", c.method, c.route) == route)
        .map(|c| c.status)
        .collect()
}

/// Polls until `cond` holds on the `/metrics` text, or PATIENCE passes.
async fn until_metrics(app: &TestApp, cond: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = metrics(app).await;
        if cond(&text) || tokio::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finishes the simulator's jobs as they come until every handle is
/// final; returns the request objects. Fails past PATIENCE.
async fn finish_all(app: &TestApp, sim: &SimHandle, ids: &[String]) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        sim.finish_jobs();
        let mut objects = Vec::new();
        for id in ids {
            objects.push(request_object(app, ALICE, id).await);
        }
        let open = objects
            .iter()
            .any(|o| ["queued", "submitted"].contains(&o["status"].as_str().unwrap_or_default()));
        if !open {
            return objects;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still open: {objects:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const WAITING: &str = "carpool_windows_waiting_for_quota{model=\"m\",upstream=\"sim\"}";

#[tokio::test]
async fn a_window_past_max_enqueued_tokens_waits_for_the_batch_in_flight() {
    for dialect in DIALECTS {
        let limit = just_above_one_window();
        let sim = slow_sim(Some(limit)).await;
        let app = start(dialect, &sim, &format!("max_enqueued_tokens = {limit}")).await;
        let ids = two_async_calls(&app).await;

        // The first window is at the provider, the second waits, and the
        // gauge says so at the scrape.
        let text = until_metrics(&app, |t| {
            metric(t, WAITING) == 1.0 && creates(&sim, dialect).len() == 1
        })
        .await;
        assert_eq!(metric(&text, WAITING), 1.0, "{dialect}: {text}");
        assert_eq!(creates(&sim, dialect).len(), 1, "{dialect}");
        // The first handle becomes submitted once carpool records its job;
        // the second stays queued.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let statuses = loop {
            let mut statuses = Vec::new();
            for id in &ids {
                let object = request_object(&app, ALICE, id).await;
                statuses.push(object["status"].as_str().unwrap().to_owned());
            }
            if statuses.iter().any(|s| s == "submitted") || tokio::time::Instant::now() >= deadline
            {
                break statuses;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        statuses
            .iter()
            .find(|s| *s == "submitted")
            .expect("one submitted");
        assert!(
            statuses.iter().any(|s| s == "queued"),
            "{dialect}: {statuses:?}"
        );

        // Once the first job finishes, the second goes; both succeed.
        for object in finish_all(&app, &sim, &ids).await {
            assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
            assert_eq!(object["served_by"], "batch", "{dialect}");
        }
        assert_eq!(creates(&sim, dialect), vec![200, 200], "{dialect}");
        assert_eq!(
            sim.quota_refusals(),
            0,
            "{dialect}: a create went past the limit"
        );
        let text = until_metrics(&app, |t| metric(t, WAITING) == 0.0).await;
        assert_eq!(metric(&text, WAITING), 0.0, "{dialect}");
    }
}

#[tokio::test]
async fn a_batch_the_provider_refuses_for_its_token_limit_waits_and_then_succeeds() {
    for dialect in DIALECTS {
        refused_batch_waits_then_succeeds(dialect, None).await;
    }
}

/// The same on Postgres, whose store takes the refused window back to
/// sealed by its own SQL.
#[tokio::test]
async fn on_postgres_a_refused_batch_waits_and_then_succeeds() {
    if support::pg::skipped() {
        return;
    }
    for dialect in DIALECTS {
        let schema = support::pg::Schema::create().await;
        refused_batch_waits_then_succeeds(dialect, Some(&schema.url())).await;
    }
}

/// Two windows at once, no cap of carpool's own: the provider refuses one
/// for its limit; it waits, then succeeds.
async fn refused_batch_waits_then_succeeds(dialect: &str, store_url: Option<&str>) {
    let sim = slow_sim(Some(just_above_one_window())).await;
    // No cap of carpool's own: both windows go, the provider refuses one.
    let app = start_on(dialect, &sim, "", store_url).await;
    let ids = two_async_calls(&app).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sim.quota_refusals() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dialect}: no refusal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The refused window waits for quota rather than failing.
    let text = until_metrics(&app, |t| metric(t, WAITING) == 1.0).await;
    assert_eq!(metric(&text, WAITING), 1.0, "{dialect}: {text}");
    for id in &ids {
        let object = request_object(&app, ALICE, id).await;
        assert_ne!(object["status"], "failed", "{dialect}: {object}");
    }

    // resubmit_limit = 0 and on_batch_failure = "error": only waiting
    // lets both succeed.
    for object in finish_all(&app, &sim, &ids).await {
        assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        assert_eq!(object["served_by"], "batch", "{dialect}");
    }
    assert!(sim.quota_refusals() >= 1);
}
