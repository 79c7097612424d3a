//! Flex, the cheap rung of every realtime call carpool makes for a deferred
//! request, and the per-upstream batch terms, through the HTTP surface: a
//! held batch and a near deadline are answered by flex; flex refused or
//! too slow falls to the standard tier before the deadline; a failed batch
//! under the `realtime` policy tries flex first; an upstream's own
//! `completion_window` reaches its batches; an upstream whose batch gives
//! no discount saves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, metric, metrics, post_chat, settled, TestApp, CHAT};

const KEY: &str = "sk-alice";
const UPSTREAM_KEY: &str = "sk-upstream";

async fn start(sim: &SimHandle, upstream: &str, batching: &str, extra: &str) -> TestApp {
    let config = SimConfig::new("openai", sim)
        .upstream(upstream)
        .batching(batching)
        .extra(extra);
    TestApp::start(&config.toml(), &[("UPSTREAM_KEY", UPSTREAM_KEY)]).await
}

fn chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

/// A sim whose next job stays in progress: a batch that will not answer.
async fn held_batch() -> SimHandle {
    sim::spawn(SimOptions {
        faults: vec![Fault::NextJob {
            outcome: JobOutcome::Stuck,
            count: 1,
        }],
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

/// A wait call with a deadline: status, `Carpool-Served-By`, the request
/// id, the answer, and how long it took.
async fn wait_call(
    app: &TestApp,
    deadline: &str,
    body: &Value,
) -> (u16, String, String, Value, Duration) {
    let started = Instant::now();
    let resp = post_chat(
        app,
        KEY,
        &[("carpool-mode", "wait"), ("carpool-deadline", deadline)],
        body,
    )
    .await;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let served_by = header("carpool-served-by");
    let id = header("carpool-request-id");
    let status = resp.status().as_u16();
    let answer: Value = resp.json().await.unwrap();
    (status, served_by, id, answer, started.elapsed())
}

/// The answer without the tier it names: what the sim answers any tier.
fn untiered(mut answer: Value) -> Value {
    answer.as_object_mut().unwrap().remove("service_tier");
    answer
}

#[tokio::test]
async fn a_held_batch_and_a_near_deadline_are_answered_by_flex() {
    let sim = held_batch().await;
    let app = start(&sim, "flex = true", "max_wait = \"100ms\"", "").await;
    let body = chat("flex, please");
    // Fallback at 3 s (half of 6 s); flex gets half of the 3 s left.
    let (status, served_by, id, answer, _) = wait_call(&app, "6", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(served_by, "flex");
    assert_eq!(answer["service_tier"], "flex");
    assert_eq!(untiered(answer), sim::expected_response(CHAT, &body));
    let object = settled(&app, KEY, &id).await;
    assert_eq!(object["served_by"], "flex", "{object}");
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "carpool_flex_calls_total{outcome=\"served\"}"),
        1.0
    );
    // Its line is in the held batch too: paid twice, and counted.
    assert_eq!(metric(&text, "carpool_double_paid_total{"), 1.0);
    assert!(
        metric(
            &text,
            "carpool_tokens_total{kind=\"input\",model=\"_other\",served_by=\"flex\"}"
        ) > 0.0,
        "{text}"
    );
    app.stop().await.unwrap();
}

/// Flex refused with `status` (no capacity, or no flex for the model):
/// the standard tier answers at once, well before the deadline.
async fn refused(status: u16) {
    let sim = held_batch().await;
    sim.add_fault(Fault::RefuseFlex { status, count: 1 });
    let app = start(&sim, "flex = true", "max_wait = \"100ms\"", "").await;
    let body = chat(&format!("refused with {status}"));
    let (code, served_by, _, answer, took) = wait_call(&app, "8", &body).await;
    assert_eq!(code, 200, "{status}: {answer}");
    assert_eq!(served_by, "realtime", "{status}");
    assert_eq!(answer, sim::expected_response(CHAT, &body), "{status}");
    assert!(
        took < Duration::from_secs(8),
        "{status}: answered after its deadline ({took:?})"
    );
    assert!(sim.faults().is_empty(), "{status}: flex was never tried");
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "carpool_flex_calls_total{outcome=\"refused\"}"),
        1.0,
        "{status}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn flex_refused_falls_to_the_standard_tier_before_the_deadline() {
    join_all([429, 503, 400].map(refused)).await;
}

#[tokio::test]
async fn flex_too_slow_falls_to_the_standard_tier_before_the_deadline() {
    let sim = held_batch().await;
    sim.add_fault(Fault::SlowFlex { ms: 30_000 });
    let app = start(&sim, "flex = true", "max_wait = \"100ms\"", "").await;
    let body = chat("flex is slow today");
    let (status, served_by, _, answer, took) = wait_call(&app, "8", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(served_by, "realtime");
    assert_eq!(answer, sim::expected_response(CHAT, &body));
    assert!(
        took < Duration::from_secs(8),
        "answered after its deadline ({took:?})"
    );
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "carpool_flex_calls_total{outcome=\"timeout\"}"),
        1.0
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_batch_under_the_realtime_policy_tries_flex_first() {
    let sim = sim::spawn(SimOptions {
        faults: vec![Fault::NextJob {
            outcome: JobOutcome::Failed,
            count: 2,
        }],
        ..SimOptions::default()
    })
    .await
    .unwrap();
    // Flex only for the models it names: the other model goes standard.
    let app = start(
        &sim,
        "flex_models = [\"gpt-4o*\"]",
        "max_wait = \"100ms\"\non_batch_failure = \"realtime\"\nmax_requests = 2",
        "",
    )
    .await;
    let flexed = chat("the batch will fail");
    let standard = json!({"model": "o3-mini", "messages": [{"role": "user", "content": "me too"}]});
    let mut ids = Vec::new();
    for body in [&flexed, &standard] {
        let resp = post_chat(&app, KEY, &[("carpool-mode", "async")], body).await;
        assert_eq!(resp.status(), 202);
        ids.push(
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let first = settled(&app, KEY, &ids[0]).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(first["served_by"], "flex", "{first}");
    assert_eq!(first["response"]["body"]["service_tier"], "flex");
    assert_eq!(
        untiered(first["response"]["body"].clone()),
        sim::expected_response(CHAT, &flexed)
    );
    let second = settled(&app, KEY, &ids[1]).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(second["served_by"], "realtime", "{second}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_upstreams_completion_window_reaches_its_batches_and_a_batch_without_discount_saves_nothing(
) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let prices = r#"
[prices]
[[prices.models]]
model = "gpt-4o-mini"
upstream = "sim"
input = 1000.0
output = 4000.0
batch_discount = 0.0
"#;
    let app = start(
        &sim,
        "completion_window = \"48h\"",
        "max_wait = \"100ms\"",
        &format!("[server]\nadmin_token = \"admin-t\"\n{prices}"),
    )
    .await;
    let resp = post_chat(
        &app,
        KEY,
        &[("carpool-mode", "async")],
        &chat("two days is fine"),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let object = settled(&app, KEY, &id).await;
    assert_eq!(object["served_by"], "batch", "{object}");
    let batch_id = object["batch_id"].as_str().unwrap();
    let job: Value = client()
        .get(format!("{}/v1/batches/{batch_id}", sim.base_url()))
        .bearer_auth(UPSTREAM_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["completion_window"], "48h", "{job}");
    let savings: Value = client()
        .get(app.url("/admin/savings"))
        .bearer_auth("admin-t")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let total = &savings["total"];
    assert_eq!(total["requests"], 1, "{savings}");
    assert!(total["realtime_usd"].as_f64().unwrap() > 0.0, "{savings}");
    assert_eq!(total["served_usd"], total["realtime_usd"], "{savings}");
    assert_eq!(total["saved_usd"], 0.0, "{savings}");
    let text = metrics(&app).await;
    assert_eq!(metric(&text, "carpool_estimated_savings_usd_total{"), 0.0);
    app.stop().await.unwrap();
}
