//! When things go wrong, through the HTTP surface against the simulator's
//! faults, in both dialects: upstream retries, jobs that fail, expire or
//! get stuck, the failure chain (resubmit, realtime, error), deadlines and
//! intake ceilings. Every caller is answered, once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use carpool::store::WindowState;
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::config::{key_sha256, SimConfig};
use support::{create_route, metric, metrics, post_chat, request_object, settled, TestApp, CHAT};

const DIALECTS: [&str; 2] = ["mistral", "openai"];
const ALICE: &str = "sk-alice";
const BOB: &str = "sk-bob";

/// carpool in front of a fresh simulator; `batching` is extra `[batching]`
/// keys (poll_interval is 50ms, max_wait 200ms unless given).
async fn setup(dialect: &str, batching: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new(dialect, &sim)
        .server("max_body = \"64KB\"\nshutdown_grace = \"5s\"")
        .client("alice", ALICE)
        .client("bob", BOB)
        .batching("max_wait = \"200ms\"")
        .batching(batching);
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

fn chat(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 32})
}

/// A held (wait mode) call's status, headers of interest and JSON body.
struct Held {
    status: u16,
    served_by: Option<String>,
    batch_id: Option<String>,
    id: String,
    body: Value,
}

async fn wait_call(app: &TestApp, key: &str, extra: &[(&str, &str)], body: &Value) -> Held {
    let mut headers = vec![("carpool-mode", "wait")];
    headers.extend_from_slice(extra);
    let resp = post_chat(app, key, &headers, body).await;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (served_by, batch_id, id) = (
        header("carpool-served-by"),
        header("carpool-batch-id"),
        header("carpool-request-id").unwrap_or_default(),
    );
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap();
    Held {
        status,
        served_by,
        batch_id,
        id,
        body,
    }
}

/// `n` wait-mode calls at once, each with its own body.
async fn wait_calls(app: &TestApp, n: usize, extra: &[(&str, &str)]) -> Vec<(Value, Held)> {
    join_all((0..n).map(|i| async move {
        let body = chat(&format!("question number {i}"));
        let held = wait_call(app, ALICE, extra, &body).await;
        (body, held)
    }))
    .await
}

/// Calls the simulator logged with this method and route, by status.
fn calls(sim: &SimHandle, method: &str, route: &str) -> Vec<u16> {
    sim.calls()
        .iter()
        .filter(|c| c.method == method && c.route == route)
        .map(|c| c.status)
        .collect()
}

/// Every caller got the answer the synchronous call gives for its body.
fn assert_answered(dialect: &str, results: &[(Value, Held)], served_by: &str) {
    for (body, held) in results {
        assert_eq!(held.status, 200, "{dialect}: {}", held.body);
        assert_eq!(
            held.body,
            sim::expected_response(CHAT, body),
            "{dialect}: a caller got another's answer"
        );
        assert_eq!(held.served_by.as_deref(), Some(served_by), "{dialect}");
    }
}

#[tokio::test]
async fn upload_refused_429_three_times_then_accepted_answers_every_caller() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 3").await;
        sim.add_fault(Fault::rate_limited("POST /v1/files", 3, 1));
        let started = Instant::now();
        let results = wait_calls(&app, 3, &[]).await;
        assert_answered(dialect, &results, "batch");
        assert_eq!(
            calls(&sim, "POST", "/v1/files"),
            vec![429, 429, 429, 200],
            "{dialect}"
        );
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{dialect}: Retry-After: 1 honoured on each retry"
        );
        assert_eq!(sim.jobs().len(), 1, "{dialect}");
        let text = metrics(&app).await;
        assert_eq!(
            metric(
                &text,
                "carpool_upstream_retries_total{cause=\"429\",operation=\"upload\"}"
            ),
            3.0,
            "{dialect}"
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn create_refused_500_then_accepted_makes_one_job() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 3").await;
        sim.add_fault(Fault::status(create_route(dialect), 500, 1));
        let results = wait_calls(&app, 3, &[]).await;
        assert_answered(dialect, &results, "batch");
        let (_, route) = create_route(dialect).split_once(' ').unwrap();
        assert_eq!(calls(&sim, "POST", route), vec![500, 200], "{dialect}");
        let jobs = sim.jobs();
        assert_eq!(jobs.len(), 1, "{dialect}: one job for the window");
        assert_eq!(jobs[0].custom_ids.len(), 3);
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn failed_job_under_resubmit_is_answered_from_the_second_job() {
    for dialect in DIALECTS {
        let (app, sim) = setup(
            dialect,
            "max_requests = 3\non_batch_failure = \"resubmit\"\nresubmit_limit = 1",
        )
        .await;
        sim.add_fault(Fault::next_job(JobOutcome::Failed));
        let results = wait_calls(&app, 3, &[]).await;
        assert_answered(dialect, &results, "batch");
        let jobs = sim.jobs();
        assert_eq!(
            jobs.len(),
            2,
            "{dialect}: the failed job and its resubmission"
        );
        let (first, second) = (&jobs[0], &jobs[1]);
        let mut a = first.custom_ids.clone();
        let mut b = second.custom_ids.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{dialect}: every request resubmitted");
        for (_, held) in &results {
            assert_eq!(held.batch_id.as_deref(), Some(second.id.as_str()));
        }
        let text = metrics(&app).await;
        assert_eq!(
            metric(&text, "carpool_resubmissions_total{reason=\"failed\"}"),
            3.0
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn expired_job_delivers_its_finished_half_and_resubmits_only_the_rest() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 4").await;
        sim.add_fault(Fault::next_job(JobOutcome::Expired));
        let results = wait_calls(&app, 4, &[]).await;
        assert_answered(dialect, &results, "batch");
        let jobs = sim.jobs();
        assert_eq!(jobs.len(), 2, "{dialect}");
        let (first, second) = (&jobs[0], &jobs[1]);
        assert_eq!(first.custom_ids.len(), 4);
        // The simulator finishes the first half of an expired job's lines.
        let done = &first.custom_ids[..2];
        let rest = &first.custom_ids[2..];
        let mut resubmitted = second.custom_ids.clone();
        resubmitted.sort();
        let mut expected = rest.to_vec();
        expected.sort();
        assert_eq!(
            resubmitted, expected,
            "{dialect}: only the unfinished lines"
        );
        for (_, held) in &results {
            let want = if done.contains(&held.id) {
                &first.id
            } else {
                &second.id
            };
            assert_eq!(held.batch_id.as_deref(), Some(want.as_str()), "{dialect}");
        }
        let text = metrics(&app).await;
        assert_eq!(
            metric(&text, "carpool_resubmissions_total{reason=\"expired\"}"),
            2.0
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn realtime_policy_answers_every_caller_through_the_synchronous_endpoint() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 3\non_batch_failure = \"realtime\"").await;
        sim.add_fault(Fault::next_job(JobOutcome::Failed));
        let results = wait_calls(&app, 3, &[]).await;
        assert_answered(dialect, &results, "realtime");
        assert_eq!(calls(&sim, "POST", CHAT), vec![200, 200, 200], "{dialect}");
        assert_eq!(sim.jobs().len(), 1, "{dialect}: nothing resubmitted");
        for (_, held) in &results {
            let obj = request_object(&app, ALICE, &held.id).await;
            assert_eq!(obj["status"], "succeeded");
            assert_eq!(obj["served_by"], "realtime");
        }
        let text = metrics(&app).await;
        assert_eq!(
            metric(&text, "carpool_fallbacks_total{reason=\"failed\"}"),
            3.0
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn resubmit_policy_past_its_limit_falls_back_to_realtime() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 2\nresubmit_limit = 1").await;
        sim.add_fault(Fault::NextJob {
            outcome: JobOutcome::Failed,
            count: 2,
        });
        let results = wait_calls(&app, 2, &[]).await;
        assert_answered(dialect, &results, "realtime");
        assert_eq!(
            sim.jobs().len(),
            2,
            "{dialect}: one resubmission, then realtime"
        );
        assert_eq!(calls(&sim, "POST", CHAT).len(), 2, "{dialect}");
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn error_policy_gives_each_caller_502_with_the_providers_reason() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 2\non_batch_failure = \"error\"").await;
        sim.add_fault(Fault::next_job(JobOutcome::Failed));
        let results = wait_calls(&app, 2, &[]).await;
        for (_, held) in &results {
            assert_eq!(held.status, 502, "{dialect}: {}", held.body);
            let message = held.body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("failed (simulated)"),
                "{dialect}: the provider's reason is in {message:?}"
            );
            let obj = request_object(&app, ALICE, &held.id).await;
            assert_eq!(obj["status"], "failed");
            assert_eq!(obj["error"]["code"], "batch_failed");
        }
        assert!(
            calls(&sim, "POST", CHAT).is_empty(),
            "{dialect}: no realtime call"
        );
        assert_eq!(sim.jobs().len(), 1);
        app.stop().await.unwrap();
    }
}

/// One dialect of the stuck-job deadline scene.
async fn stuck_job_with_deadline(dialect: &'static str) {
    let (app, sim) = setup(dialect, "fallback_margin = \"3s\"").await;
    sim.add_fault(Fault::next_job(JobOutcome::Stuck));
    let body = chat("answer me within ten seconds");
    let started = Instant::now();
    let held = wait_call(&app, ALICE, &[("carpool-deadline", "10")], &body).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{dialect}: answered after {took:?}"
    );
    assert_eq!(held.status, 200, "{dialect}: {}", held.body);
    assert_eq!(held.served_by.as_deref(), Some("realtime"), "{dialect}");
    assert_eq!(held.body, sim::expected_response(CHAT, &body));
    let jobs = sim.jobs();
    assert_eq!(jobs.len(), 1, "{dialect}: the request was in a (stuck) job");
    assert!(jobs[0].custom_ids.contains(&held.id));
    let before = request_object(&app, ALICE, &held.id).await;

    // The stuck job finishes after all: its late result must be dropped.
    sim.clear_faults();
    sim.finish_jobs();
    let store = app.state.deferral.store.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let finished = store
            .windows_in(&[WindowState::Completed])
            .await
            .unwrap()
            .len();
        if finished == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dialect}: the late job was never reconciled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = request_object(&app, ALICE, &held.id).await;
    assert_eq!(
        after, before,
        "{dialect}: the late batch result changed the answer"
    );
    assert_eq!(after["served_by"], "realtime");
    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "carpool_fallbacks_total{reason=\"deadline\"}"),
        1.0
    );
    // Its caller was still held when the fallback came: answered realtime
    // while its line was in the job, and counted as paid twice.
    assert_eq!(metric(&text, "carpool_double_paid_total{"), 1.0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn stuck_job_with_a_10s_deadline_is_answered_realtime_before_it_and_only_once() {
    // Both dialects at once: each scene takes about seven seconds.
    join_all(DIALECTS.map(stuck_job_with_deadline)).await;
}

#[tokio::test]
async fn deadline_without_realtime_fails_with_504_and_expired() {
    for dialect in DIALECTS {
        let (app, sim) = setup(
            dialect,
            "fallback_margin = \"1s\"\non_batch_failure = \"error\"",
        )
        .await;
        sim.add_fault(Fault::next_job(JobOutcome::Stuck));
        let started = Instant::now();
        let held = wait_call(&app, ALICE, &[("carpool-deadline", "2")], &chat("late")).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{dialect}");
        assert_eq!(held.status, 504, "{dialect}: {}", held.body);
        assert_eq!(held.body["error"]["code"], "deadline_exceeded");
        let obj = request_object(&app, ALICE, &held.id).await;
        assert_eq!(obj["status"], "expired");
        assert_eq!(obj["served_by"], Value::Null);
        assert!(
            calls(&sim, "POST", CHAT).is_empty(),
            "{dialect}: no realtime call"
        );
        let text = metrics(&app).await;
        assert_eq!(
            metric(&text, "carpool_requests_expired_total{reason=\"deadline\"}"),
            1.0
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn window_under_deadline_pressure_flushes_before_max_wait() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_wait = \"1m\"\nfallback_margin = \"1s\"").await;
        let body = chat("soon please");
        let started = Instant::now();
        let held = wait_call(&app, ALICE, &[("carpool-deadline", "3")], &body).await;
        assert!(started.elapsed() < Duration::from_secs(3), "{dialect}");
        assert_eq!(held.status, 200, "{dialect}: {}", held.body);
        assert_eq!(held.body, sim::expected_response(CHAT, &body));
        // The window went out long before max_wait, early enough for its
        // batch to answer before the fallback (at 2 s): paid once, by batch.
        assert_eq!(held.served_by.as_deref(), Some("batch"), "{dialect}");
        assert!(
            calls(&sim, "POST", CHAT).is_empty(),
            "{dialect}: no realtime call"
        );
        assert_eq!(sim.jobs().len(), 1, "{dialect}: one job for the window");
        let text = metrics(&app).await;
        assert_eq!(
            metric(&text, "carpool_flushes_total{reason=\"deadline\"}"),
            1.0,
            "{dialect}"
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn intake_over_the_ceiling_gets_429_and_stores_nothing() {
    for dialect in DIALECTS {
        let (app, _sim) = setup(
            dialect,
            "max_wait = \"1m\"\nmax_pending = 3\nmax_pending_per_client = 2",
        )
        .await;
        let async_call = |key: &'static str, i: usize| {
            let app = &app;
            async move {
                post_chat(
                    app,
                    key,
                    &[("carpool-mode", "async")],
                    &chat(&format!("{key} {i}")),
                )
                .await
            }
        };
        for i in 0..2 {
            assert_eq!(async_call(ALICE, i).await.status(), 202);
        }
        // Alice is at her own ceiling.
        let refused = async_call(ALICE, 2).await;
        assert_eq!(refused.status(), 429, "{dialect}");
        assert!(refused.headers().get("retry-after").is_some());
        let err: Value = refused.json().await.unwrap();
        assert_eq!(err["error"]["code"], "max_pending_per_client");
        // Bob fits under the global ceiling once, then not.
        assert_eq!(async_call(BOB, 0).await.status(), 202);
        assert_eq!(async_call(BOB, 1).await.status(), 429, "{dialect}");
        let store = &app.state.deferral.store;
        assert_eq!(
            store
                .list(&key_sha256(ALICE), None, 100, None)
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            store
                .list(&key_sha256(BOB), None, 100, None)
                .await
                .unwrap()
                .len(),
            1
        );
        let text = metrics(&app).await;
        assert_eq!(
            metric(&text, "carpool_intake_refused_total{scope=\"client\"}"),
            1.0
        );
        assert_eq!(
            metric(&text, "carpool_intake_refused_total{scope=\"global\"}"),
            1.0
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn answered_requests_free_their_place_under_the_ceiling() {
    let (app, _sim) = setup("openai", "max_requests = 2\nmax_pending_per_client = 2").await;
    let async_call = |i: usize| {
        let app = &app;
        async move {
            post_chat(
                app,
                ALICE,
                &[("carpool-mode", "async")],
                &chat(&format!("q{i}")),
            )
            .await
        }
    };
    let mut ids = Vec::new();
    for i in 0..2 {
        let resp = async_call(i).await;
        assert_eq!(resp.status(), 202);
        ids.push(
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(async_call(2).await.status(), 429);
    for id in &ids {
        assert_eq!(
            settled(&app, ALICE, id).await["status"],
            "succeeded",
            "{id}"
        );
    }
    // Both are answered: once the snapshot is refreshed there is room again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = async_call(3).await;
        if resp.status() == 202 {
            break;
        }
        assert_eq!(resp.status(), 429);
        assert!(Instant::now() < deadline, "the ceiling never freed up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_deadline_that_passes_while_carpool_is_down_is_met_by_realtime_after_restart() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    sim.add_fault(Fault::NextJob {
        outcome: JobOutcome::Stuck,
        count: 0,
    });
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/carpool.db", dir.path().display());
    let config = SimConfig::new("openai", &sim)
        .batching("max_wait = \"1m\"\nfallback_margin = \"1s\"")
        .toml();
    let vars = [
        ("UPSTREAM_KEY", "sk-upstream"),
        ("CARPOOL_STORE__URL", url.as_str()),
    ];
    let first = TestApp::start(&config, &vars).await;
    let body = chat("survive a restart");
    let resp = post_chat(
        &first,
        ALICE,
        &[("carpool-mode", "async"), ("carpool-deadline", "2")],
        &body,
    )
    .await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // SIGTERM: the open window is sealed and submitted (its job sticks).
    first.stop().await.unwrap();
    assert_eq!(sim.jobs().len(), 1);

    let second = TestApp::start(&config, &vars).await;
    let obj = settled(&second, ALICE, &id).await;
    assert_eq!(obj["status"], "succeeded", "{obj}");
    assert_eq!(obj["served_by"], "realtime");
    assert_eq!(obj["response"]["body"], sim::expected_response(CHAT, &body));
    second.stop().await.unwrap();
}
