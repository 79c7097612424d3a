//! The deadline rule through the HTTP surface: the realtime fallback comes
//! `fallback_margin` before the deadline but never more than half the wait
//! (an SDK's 60 s timeout still gets its batch), a request goes into a batch
//! only while its deadline leaves the expected turnaround (learned from the
//! jobs seen, else `expected_turnaround`), and a request whose line is in a
//! live batch is answered realtime only while someone waits for it, each
//! such answer counted as paid twice. The official SDK's side is in
//! `tests/sdk_deadlines.py`, driven from here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use carpool::deferral::engine::now_ms;
use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use carpool::store::WindowLimits;
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{metric, metrics, post_chat, settled, TestApp, CHAT, PATIENCE};

const DIALECTS: [&str; 2] = ["openai", "mistral"];
const KEY: &str = "sk-alice";

async fn start(dialect: &str, sim: &SimHandle, batching: &str) -> TestApp {
    let config = SimConfig::new(dialect, sim).batching(batching);
    TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await
}

fn chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

/// A wait-mode call with `Carpool-Deadline: seconds`: how it was served and
/// its request id.
async fn wait_call(app: &TestApp, seconds: &str, body: &Value) -> (u16, Option<String>, String) {
    let resp = post_chat(
        app,
        KEY,
        &[("carpool-mode", "wait"), ("carpool-deadline", seconds)],
        body,
    )
    .await;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let served_by = header("carpool-served-by");
    let id = header("carpool-request-id").unwrap_or_default();
    let status = resp.status().as_u16();
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(
        answer,
        sim::expected_response(CHAT, body),
        "{status}: {answer}"
    );
    (status, served_by, id)
}

fn in_a_job(sim: &SimHandle, id: &str) -> bool {
    sim.jobs()
        .iter()
        .any(|j| j.custom_ids.iter().any(|c| c == id))
}

fn realtime_calls(sim: &SimHandle) -> usize {
    sim.calls()
        .iter()
        .filter(|c| c.method == "POST" && c.route == CHAT)
        .count()
}

async fn async_call(app: &TestApp, headers: &[(&str, &str)], body: &Value) -> String {
    let mut all = vec![("carpool-mode", "async")];
    all.extend_from_slice(headers);
    let resp = post_chat(app, KEY, &all, body).await;
    assert_eq!(resp.status(), 202);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// One dialect: jobs take 2 s. Once one has been seen, a call whose
/// fallback is nearer than that is answered realtime at once and is never
/// put in a batch; one with room is served by its batch, paid once.
async fn learned_turnaround(dialect: &'static str) {
    let sim = sim::spawn(SimOptions {
        job_duration: Duration::from_secs(2),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let app = start(dialect, &sim, "max_wait = \"100ms\"").await;

    // Teach it: one job, about 2 s.
    let first = async_call(&app, &[], &chat("how long do your batches take?")).await;
    assert_eq!(settled(&app, KEY, &first).await["status"], "succeeded");

    // Fallback at 1.5 s (half of 3 s), under the 2 s a batch takes.
    let (status, served_by, short) = wait_call(&app, "3", &chat("in three seconds")).await;
    assert_eq!(status, 200, "{dialect}");
    assert_eq!(served_by.as_deref(), Some("realtime"), "{dialect}");
    assert!(
        !in_a_job(&sim, &short),
        "{dialect}: a hopeless request went into a batch"
    );

    // Fallback at 10 s: room for a 2 s batch.
    let (status, served_by, long) = wait_call(&app, "15", &chat("in fifteen seconds")).await;
    assert_eq!(status, 200, "{dialect}");
    assert_eq!(served_by.as_deref(), Some("batch"), "{dialect}");
    assert!(in_a_job(&sim, &long), "{dialect}");

    assert_eq!(realtime_calls(&sim), 1, "{dialect}: one realtime call");
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "carpool_double_paid_total{"),
        0.0,
        "{dialect}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_deadline_shorter_than_the_learned_turnaround_never_enters_a_batch() {
    join_all(DIALECTS.map(learned_turnaround)).await;
}

#[tokio::test]
async fn expected_turnaround_keeps_even_a_full_window_from_submitting_a_hopeless_request() {
    for dialect in DIALECTS {
        let sim = sim::spawn(SimOptions::default()).await.unwrap();
        // One request fills its window (sealed at intake), but an hour's
        // turnaround leaves a 60 s deadline no chance.
        let app = start(
            dialect,
            &sim,
            "max_requests = 1\nexpected_turnaround = \"1h\"",
        )
        .await;
        let (status, served_by, id) = wait_call(&app, "60", &chat("now or never")).await;
        assert_eq!(status, 200, "{dialect}");
        assert_eq!(served_by.as_deref(), Some("realtime"), "{dialect}");
        assert!(!in_a_job(&sim, &id), "{dialect}");
        assert!(
            !sim.calls()
                .iter()
                .any(|c| c.method == "POST" && c.route == "/v1/files"),
            "{dialect}: nothing uploaded"
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_wait_caller_that_went_away_leaves_its_request_to_the_batch() {
    for dialect in DIALECTS {
        let sim = sim::spawn(SimOptions::default()).await.unwrap();
        sim.add_fault(Fault::next_job(JobOutcome::Stuck));
        let app = start(dialect, &sim, "max_wait = \"100ms\"").await;
        let body = chat("I will not wait");
        // The caller hangs up after 300 ms; its fallback would be at 1 s.
        let gave_up = support::client()
            .post(app.url(CHAT))
            .bearer_auth(KEY)
            .header("carpool-mode", "wait")
            .header("carpool-deadline", "2")
            .timeout(Duration::from_millis(300))
            .json(&body)
            .send()
            .await;
        assert!(gave_up.is_err(), "{dialect}: the call was answered");
        let accepted = Instant::now();
        assert!(
            support::eventually(PATIENCE, || !sim.jobs().is_empty()).await,
            "{dialect}: never submitted"
        );
        let id = sim.jobs()[0].custom_ids[0].clone();
        // Past its fallback time (1 s) and its deadline (2 s), with nobody
        // waiting: no realtime call is made.
        tokio::time::sleep_until((accepted + Duration::from_millis(2500)).into()).await;
        assert_eq!(realtime_calls(&sim), 0, "{dialect}: paid twice for nobody");
        sim.clear_faults();
        sim.finish_jobs();
        let obj = settled(&app, KEY, &id).await;
        assert_eq!(obj["status"], "succeeded", "{dialect}: {obj}");
        assert_eq!(obj["served_by"], "batch", "{dialect}");
        assert_eq!(obj["response"]["body"], sim::expected_response(CHAT, &body));
        assert_eq!(realtime_calls(&sim), 0, "{dialect}");
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn requests_the_deadline_worker_cannot_serve_do_not_hide_the_ones_behind_them() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    sim.add_fault(Fault::NextJob {
        outcome: JobOutcome::Stuck,
        count: 0,
    });
    let app = start(
        "openai",
        &sim,
        "max_wait = \"100ms\"\nfallback_margin = \"1s\"",
    )
    .await;
    // More than a page of due requests of an upstream no longer configured,
    // all due before ours.
    let store = &app.state.deferral.store;
    let limits = WindowLimits {
        max_requests: 50_000,
        max_bytes: 100_000_000,
    };
    let soon = now_ms() + 500;
    for i in 0..300 {
        let mut stranded = support::async_request("m", format!("{{\"n\":{i}}}"), limits);
        stranded.upstream = "renamed-away".to_owned();
        stranded.deadline = Some(soon);
        store.accept(stranded).await.unwrap();
    }
    let body = chat("do not forget me");
    let id = async_call(&app, &[("carpool-deadline", "3")], &body).await;
    let obj = settled(&app, KEY, &id).await;
    assert_eq!(obj["status"], "succeeded", "{obj}");
    assert_eq!(obj["served_by"], "realtime");
    // Its line was in the stuck job, and its caller named a deadline: it
    // was answered anyway, and counted as paid twice.
    assert!(in_a_job(&sim, &id));
    let text = metrics(&app).await;
    assert_eq!(metric(&text, "carpool_double_paid_total{"), 1.0);
    app.stop().await.unwrap();
}

/// The SDK's view: one call with `timeout` seconds; the parsed JSON line.
async fn sdk_call(app: &TestApp, timeout: u32) -> Value {
    let (ok, text) = support::python::run(
        "sdk_deadlines.py",
        vec![app.url(""), timeout.to_string()],
        vec![],
    )
    .await;
    assert!(ok, "SDK call failed:\n{text}");
    let line = text.lines().find(|l| l.starts_with('{')).unwrap_or("{}");
    serde_json::from_str(line).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sdk_with_a_60s_timeout_is_served_by_batch_under_the_default_margin() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    // Default fallback_margin (5 min): the old rule sent this call realtime
    // at once, its deadline minus the margin being long past.
    let app = start("openai", &sim, "max_wait = \"500ms\"").await;
    let answer = sdk_call(&app, 60).await;
    assert_eq!(answer["served_by"], "batch", "{answer}");
    assert!(in_a_job(&sim, answer["request_id"].as_str().unwrap()));
    assert_eq!(realtime_calls(&sim), 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sdk_with_a_20s_timeout_against_a_held_job_is_answered_realtime_before_it_gives_up() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    sim.add_fault(Fault::next_job(JobOutcome::Stuck));
    let app = start("openai", &sim, "max_wait = \"500ms\"").await;
    let answer = sdk_call(&app, 20).await;
    assert_eq!(answer["error"], Value::Null, "{answer}");
    assert_eq!(answer["served_by"], "realtime", "{answer}");
    // It waited for its batch (fallback at half its 20 s), not realtime at
    // once, and was answered before its SDK gave up.
    let elapsed = answer["elapsed"].as_f64().unwrap();
    assert!((9.0..20.0).contains(&elapsed), "answered after {elapsed} s");
    assert!(in_a_job(&sim, answer["request_id"].as_str().unwrap()));
    let text = metrics(&app).await;
    assert_eq!(metric(&text, "carpool_double_paid_total{"), 1.0);
    app.stop().await.unwrap();
}
