//! Scoping headers (SPEC section 2, review M1), through the HTTP surface
//! against the simulator: callers sharing a key but not a project
//! (`OpenAI-Project`, `OpenAI-Organization`) get a window and a job each,
//! every files and batch call of a window carries its scope, and a
//! realtime fallback carries the caller's end-to-end headers as a
//! pass-through would. Mistral has no scoping headers: there they are only
//! passed along on realtime calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use carpool::sim::{self, CallRecord, Fault, JobOutcome, JobRecord, SimHandle, SimOptions};
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{post_chat, settled, TestApp, CHAT};

const ALICE: &str = "sk-alice";

/// carpool in front of a fresh simulator, with `batching` as extra keys
/// (max_wait 200ms, poll_interval 50ms).
async fn setup(dialect: &str, batching: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new(dialect, &sim)
        .client("alice", ALICE)
        .batching("max_wait = \"200ms\"")
        .batching(batching);
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

fn chat(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 32})
}

/// An async call as ALICE with `headers`; returns its request id.
async fn defer(app: &TestApp, headers: &[(&str, &str)], body: &Value) -> String {
    let mut all = vec![("carpool-mode", "async")];
    all.extend_from_slice(headers);
    let resp = post_chat(app, ALICE, &all, body).await;
    assert_eq!(resp.status(), 202);
    let handle: Value = resp.json().await.unwrap();
    handle["id"].as_str().unwrap().to_owned()
}

/// The job that holds request `id`.
fn job_of(sim: &SimHandle, id: &str) -> JobRecord {
    sim.jobs()
        .into_iter()
        .find(|j| j.custom_ids.iter().any(|c| c == id))
        .unwrap_or_else(|| panic!("no job holds {id}"))
}

/// The calls the simulator logged for `job`: the upload of its input file,
/// its creation, its polls and the download of its output.
fn calls_of(sim: &SimHandle, job: &JobRecord) -> Vec<(&'static str, CallRecord)> {
    let input = job.input_file_ids.first().cloned();
    sim.calls()
        .into_iter()
        .filter_map(|c| {
            let what = match (c.method.as_str(), c.route.as_str()) {
                ("POST", "/v1/files") if c.file_id == input => "upload",
                ("POST", "/v1/batches" | "/v1/batch/jobs")
                    if c.job_id.as_ref() == Some(&job.id) =>
                {
                    "create"
                }
                ("GET", "/v1/batches/{batch_id}" | "/v1/batch/jobs/{job_id}")
                    if c.job_id.as_ref() == Some(&job.id) =>
                {
                    "poll"
                }
                ("GET", "/v1/files/{file_id}/content") if c.file_id == job.output_file_id => {
                    "download"
                }
                _ => return None,
            };
            Some((what, c))
        })
        .collect()
}

/// Asserts that the upload, create, poll and download calls of `job` were
/// all made, each with `header` set to `expected` (`None`: not sent).
fn assert_every_call(sim: &SimHandle, job: &JobRecord, header: &str, expected: Option<&str>) {
    let calls = calls_of(sim, job);
    for what in ["upload", "create", "poll", "download"] {
        assert!(
            calls.iter().any(|(w, _)| *w == what),
            "job {}: no {what} call in {calls:?}",
            job.id
        );
    }
    for (what, call) in &calls {
        assert_eq!(
            call.header(header),
            expected,
            "job {}: the {what} call's {header}",
            job.id
        );
    }
}

#[tokio::test]
async fn two_projects_of_one_key_get_a_job_each_and_every_batch_call_carries_its_project() {
    // Long enough that both calls are in before any window is due.
    let (app, sim) = setup("openai", "max_wait = \"1s\"").await;
    let org = ("openai-organization", "org_1");
    let (head_a, head_b) = (
        [org, ("openai-project", "proj_A")],
        [org, ("OpenAI-Project", "proj_B")],
    );
    let (body_a, body_b) = (chat("for project A"), chat("for project B"));
    let (a, b) = tokio::join!(defer(&app, &head_a, &body_a), defer(&app, &head_b, &body_b));
    for id in [&a, &b] {
        assert_eq!(settled(&app, ALICE, id).await["status"], "succeeded");
    }
    let jobs = sim.jobs();
    assert_eq!(jobs.len(), 2, "one job per project: {jobs:?}");
    let (job_a, job_b) = (job_of(&sim, &a), job_of(&sim, &b));
    assert_eq!(job_a.custom_ids, vec![a.clone()]);
    assert_eq!(job_b.custom_ids, vec![b.clone()]);
    assert_every_call(&sim, &job_a, "OpenAI-Project", Some("proj_A"));
    assert_every_call(&sim, &job_b, "OpenAI-Project", Some("proj_B"));
    assert_every_call(&sim, &job_a, "OpenAI-Organization", Some("org_1"));
    assert_every_call(&sim, &job_b, "OpenAI-Organization", Some("org_1"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_idempotency_key_reused_under_another_project_is_a_conflict() {
    let (app, _sim) = setup("openai", "").await;
    let body = chat("same body");
    let key = ("idempotency-key", "idem-1");
    let first = defer(&app, &[key, ("openai-project", "proj_A")], &body).await;
    assert_eq!(
        defer(&app, &[key, ("openai-project", "proj_A")], &body).await,
        first,
        "a repeat in the same project re-attaches"
    );
    let resp = post_chat(
        &app,
        ALICE,
        &[("carpool-mode", "async"), key, ("openai-project", "proj_B")],
        &body,
    )
    .await;
    assert_eq!(resp.status(), 422);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "idempotency_key_reused");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn mistral_windows_ignore_openai_project_headers() {
    // The window is sent when both calls are in it, not before.
    let (app, sim) = setup("mistral", "max_requests = 2\nmax_wait = \"10s\"").await;
    let (head_a, head_b) = (
        [("openai-project", "proj_A")],
        [("openai-project", "proj_B")],
    );
    let (body_a, body_b) = (chat("one"), chat("two"));
    let (a, b) = tokio::join!(defer(&app, &head_a, &body_a), defer(&app, &head_b, &body_b));
    for id in [&a, &b] {
        assert_eq!(settled(&app, ALICE, id).await["status"], "succeeded");
    }
    let jobs = sim.jobs();
    assert_eq!(jobs.len(), 1, "Mistral has no scoping headers: {jobs:?}");
    assert_eq!(jobs[0].custom_ids.len(), 2);
    assert_every_call(&sim, &jobs[0], "OpenAI-Project", None);
    app.stop().await.unwrap();
}

/// One dialect of the fallback scene: a held call whose job is stuck is
/// answered realtime at its deadline, and that call carries what a
/// pass-through would have sent.
async fn fallback_carries_end_to_end_headers(dialect: &'static str) {
    let (app, sim) = setup(dialect, "fallback_margin = \"2s\"").await;
    sim.add_fault(Fault::next_job(JobOutcome::Stuck));
    let body = chat("answer me soon");
    let resp = post_chat(
        &app,
        ALICE,
        &[
            ("carpool-mode", "wait"),
            ("carpool-deadline", "3"),
            ("openai-project", "proj_A"),
            ("x-request-id", "req-123"),
        ],
        &body,
    )
    .await;
    assert_eq!(resp.status(), 200, "{dialect}");
    assert_eq!(resp.headers()["carpool-served-by"], "realtime", "{dialect}");
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer, sim::expected_response(CHAT, &body), "{dialect}");
    let realtime: Vec<CallRecord> = sim
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.route == CHAT)
        .collect();
    assert_eq!(realtime.len(), 1, "{dialect}: {realtime:?}");
    let call = &realtime[0];
    assert_eq!(call.header("OpenAI-Project"), Some("proj_A"), "{dialect}");
    assert_eq!(call.header("X-Request-ID"), Some("req-123"), "{dialect}");
    assert_eq!(call.credential.as_deref(), Some("sk-upstream"), "{dialect}");
    assert!(
        call.headers.iter().all(|(n, _)| !n.starts_with("carpool-")),
        "{dialect}: carpool's own headers went upstream: {:?}",
        call.headers
    );
    sim.clear_faults();
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_realtime_fallback_carries_the_callers_end_to_end_headers() {
    join_all(["openai", "mistral"].map(fallback_carries_end_to_end_headers)).await;
}

#[tokio::test]
async fn a_scoping_header_that_is_not_text_is_refused_and_nothing_is_stored() {
    let (app, sim) = setup("openai", "").await;
    let resp = support::client()
        .post(app.url(CHAT))
        .bearer_auth(ALICE)
        .header("carpool-mode", "async")
        .header(
            "openai-project",
            reqwest::header::HeaderValue::from_bytes(b"proj_\xff").unwrap(),
        )
        .json(&chat("bad project"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_header");
    assert_eq!(error["error"]["param"], "openai-project");
    let windows = app.state.deferral.store.open_windows().await.unwrap();
    assert!(windows.is_empty(), "{windows:?}");
    // Nothing reached the provider but the janitor's start-up listing of
    // its files (GET /v1/files), which is carpool's own.
    let calls: Vec<String> = sim
        .calls()
        .iter()
        .filter(|c| !(c.method == "GET" && c.route == "/v1/files"))
        .map(|c| format!("{} {}", c.method, c.route))
        .collect();
    assert!(calls.is_empty(), "{calls:?}");
    app.stop().await.unwrap();
}
