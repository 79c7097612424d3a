//! The Anthropic dialect front to back (SPEC sections 1-3, issue 22):
//! `/v1/messages` passed through and deferred into Message Batches, with
//! the official `anthropic` Python SDK where a caller's SDK is involved
//! (`tests/sdk_anthropic.py`, the virtualenv of `tests/run.sh`), and the
//! simulator's Anthropic side checked on its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use carpool::sim::{self, Fault, SimHandle, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, settled, TestApp};

const ALICE: &str = "sk-ant-alice";
const BOB: &str = "sk-ant-bob";
const MESSAGES: &str = "/v1/messages";
const VERSION: &str = "2023-06-01";

fn message(model: &str, text: &str) -> Value {
    json!({"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": text}]})
}

/// carpool (passthrough auth, so each caller's key is its credential)
/// before a fresh simulator, with extra `[batching]` keys.
async fn setup(batching: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new("anthropic", &sim)
        .batching("max_wait = \"30s\"")
        .batching(batching)
        .toml()
        .replace("auth = \"managed\"", "auth = \"passthrough\"");
    let app = TestApp::start(&config, &[("UPSTREAM_KEY", "sk-unused")]).await;
    (app, sim)
}

async fn sdk(app_or_sim: String, check: &str) {
    let (ok, text) = support::python::run(
        "sdk_anthropic.py",
        vec![app_or_sim, check.to_owned()],
        vec![("CARPOOL_SDK_KEY".to_owned(), ALICE.to_owned())],
    )
    .await;
    assert!(
        ok && text.contains(" 0 failed"),
        "SDK check failed:\n{text}"
    );
}

/// POSTs a Messages body as `key`, with Anthropic's headers and `extra`.
async fn post(app: &TestApp, key: &str, extra: &[(&str, &str)], body: &Value) -> reqwest::Response {
    let mut req = client()
        .post(app.url(MESSAGES))
        .header("x-api-key", key)
        .header("anthropic-version", VERSION)
        .json(body);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn async_call(app: &TestApp, key: &str, extra: &[(&str, &str)], body: &Value) -> String {
    let mut headers = vec![("carpool-mode", "async")];
    headers.extend_from_slice(extra);
    let resp = post(app, key, &headers, body).await;
    assert_eq!(resp.status(), 202);
    let object: Value = resp.json().await.unwrap();
    object["id"].as_str().unwrap().to_owned()
}

/// `GET path` as `key` (in `x-api-key`): status and JSON.
async fn get(app: &TestApp, key: &str, path: &str) -> (u16, Value) {
    let resp = client()
        .get(app.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn anthropic_jobs(sim: &SimHandle) -> Vec<sim::JobRecord> {
    sim.jobs()
        .into_iter()
        .filter(|j| j.dialect == carpool::model::Dialect::Anthropic)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_passes_through_plain_and_streamed() {
    let (app, sim) = setup("").await;
    sdk(app.url(""), "passthrough").await;
    // Straight through: no batch, and the caller's own key and version went up.
    assert!(anthropic_jobs(&sim).is_empty());
    let calls = sim.calls();
    assert!(calls.iter().all(|c| c.route == MESSAGES), "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.credential.as_deref() == Some(ALICE)
                && c.header("anthropic-version").is_some())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deferred_wait_calls_over_two_models_share_one_batch_and_a_bad_body_is_refused() {
    let (app, sim) = setup("max_requests = 4\nmax_wait = \"1h\"").await;
    sdk(app.url(""), "wait").await;
    let jobs = anthropic_jobs(&sim);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].custom_ids.len(), 4);
    assert!(jobs[0].custom_ids.iter().all(|id| id.starts_with("cpr_")));
    // The batch calls went with the caller's key and a version.
    let creates: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.route == "/v1/messages/batches")
        .collect();
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0].credential.as_deref(), Some(ALICE));
    assert!(creates[0].header("anthropic-version").is_some());
    // The refused body stored nothing: the four are all there is.
    let (status, list) = get(&app, ALICE, "/v1/carpool/requests?limit=100").await;
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 4, "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_wait_call_is_read_by_the_sdk_stream() {
    let (app, sim) = setup("max_wait = \"200ms\"").await;
    sdk(app.url(""), "stream").await;
    assert_eq!(anthropic_jobs(&sim).len(), 1);
}

#[tokio::test]
async fn a_streamed_wait_call_pings_while_it_waits() {
    let (app, _sim) = setup("max_wait = \"200ms\"").await;
    let mut body = message("claude-sim-a", "ping me");
    body["stream"] = json!(true);
    let resp = post(&app, ALICE, &[("carpool-mode", "wait")], &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("event: ping\n"), "{text}");
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .filter(|n| *n != "ping")
        .collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert!(names.contains(&"content_block_delta"));
}

#[tokio::test]
async fn async_handles_take_x_api_key_and_are_bound_to_it() {
    let (app, _sim) = setup("max_wait = \"100ms\"").await;
    let body = message("claude-sim-a", "handle me");
    let id = async_call(&app, ALICE, &[], &body).await;
    let object = settled(&app, ALICE, &id).await;
    assert_eq!(object["status"], "succeeded", "{object}");
    let (status, mine) = get(&app, ALICE, &format!("/v1/carpool/requests/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(mine["served_by"], "batch");
    assert!(mine["batch_id"].as_str().unwrap().starts_with("msgbatch_"));
    let (status, result) = get(&app, ALICE, &format!("/v1/carpool/requests/{id}/result")).await;
    assert_eq!(status, 200);
    assert_eq!(result["type"], "message");
    assert_eq!(result["model"], "claude-sim-a");
    // Another key: 404, in Anthropic's shape since it came with x-api-key.
    let (status, theirs) = get(&app, BOB, &format!("/v1/carpool/requests/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(theirs["type"], "error", "{theirs}");
    assert_eq!(theirs["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn an_errored_line_reaches_only_its_caller() {
    let (app, sim) = setup("max_requests = 3").await;
    let bodies: Vec<Value> = (0..3)
        .map(|i| message("claude-sim-a", &format!("line {i}")))
        .collect();
    let first = async_call(&app, ALICE, &[], &bodies[0]).await;
    let second = async_call(&app, ALICE, &[], &bodies[1]).await;
    sim.add_fault(Fault::fail_custom_ids([second.clone()], 404));
    let third = async_call(&app, ALICE, &[], &bodies[2]).await;
    for id in [&first, &third] {
        assert_eq!(settled(&app, ALICE, id).await["status"], "succeeded");
    }
    let failed = settled(&app, ALICE, &second).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let (status, body) = get(
        &app,
        ALICE,
        &format!("/v1/carpool/requests/{second}/result"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(anthropic_jobs(&sim).len(), 1);
}

#[tokio::test]
async fn two_anthropic_beta_values_make_two_batches_each_sent_with_its_own() {
    let (app, sim) = setup("max_wait = \"100ms\"").await;
    let a = async_call(
        &app,
        ALICE,
        &[("anthropic-beta", "beta-one")],
        &message("claude-sim-a", "a"),
    )
    .await;
    let b = async_call(
        &app,
        ALICE,
        &[("anthropic-beta", "beta-two")],
        &message("claude-sim-a", "b"),
    )
    .await;
    for id in [&a, &b] {
        assert_eq!(settled(&app, ALICE, id).await["status"], "succeeded");
    }
    let jobs = anthropic_jobs(&sim);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let creates: Vec<Option<String>> = sim
        .calls()
        .into_iter()
        .filter(|c| c.method == "POST" && c.route == "/v1/messages/batches")
        .map(|c| c.header("anthropic-beta").map(str::to_owned))
        .collect();
    let mut betas = creates.clone();
    betas.sort();
    assert_eq!(
        betas,
        vec![Some("beta-one".to_owned()), Some("beta-two".to_owned())]
    );
}

#[tokio::test]
async fn bad_bodies_are_refused_at_intake_in_anthropic_shape() {
    let (app, sim) = setup("max_wait = \"100ms\"").await;
    for (body, param) in [
        (
            json!({"model": "claude-sim-a", "max_tokens": 0, "messages": []}),
            "max_tokens",
        ),
        (json!({"max_tokens": 5, "messages": []}), "model"),
    ] {
        let resp = post(&app, ALICE, &[("carpool-mode", "wait")], &body).await;
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(param),
            "{err}"
        );
    }
    // Unauthenticated (passthrough needs a key): 401 in the same shape.
    let resp = client()
        .post(app.url(MESSAGES))
        .header("carpool-mode", "async")
        .json(&message("claude-sim-a", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "authentication_error", "{err}");
    let (_, list) = get(&app, ALICE, "/v1/carpool/requests").await;
    assert!(list["data"].as_array().unwrap().is_empty(), "{list}");
    assert!(sim.calls().is_empty());
}

#[tokio::test]
async fn a_create_refused_for_a_named_request_fails_only_that_caller() {
    let (app, sim) = setup("max_requests = 3\nresubmit_limit = 0").await;
    sim.add_fault(Fault::invalid_line(2, "invalid_request"));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            async_call(
                &app,
                ALICE,
                &[],
                &message("claude-sim-a", &format!("q {i}")),
            )
            .await,
        );
    }
    let objects =
        futures_util::future::join_all(ids.iter().map(|id| settled(&app, ALICE, id))).await;
    let failed: Vec<&Value> = objects.iter().filter(|o| o["status"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{objects:?}");
    assert_eq!(failed[0]["response"]["status_code"], 400);
    assert_eq!(failed[0]["response"]["body"]["type"], "error");
    assert!(
        objects
            .iter()
            .filter(|o| o["status"] == "succeeded")
            .count()
            == 2
    );
    // The refused create made nothing; the two others went again, once.
    let jobs = anthropic_jobs(&sim);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].custom_ids.len(), 2);
}

#[tokio::test]
async fn the_simulator_speaks_message_batches() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let http = client();
    let url = |p: &str| format!("{}{p}", sim.base_url());
    let send = |req: reqwest::RequestBuilder| {
        req.header("x-api-key", "sk-sim")
            .header("anthropic-version", VERSION)
            .send()
    };
    // No version: refused in Anthropic's shape.
    let resp = http
        .post(url(MESSAGES))
        .header("x-api-key", "sk-sim")
        .json(&message("m", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["type"], "error");
    // A bad request names requests.N.
    let bad = json!({"requests": [
        {"custom_id": "a", "params": message("m", "one")},
        {"custom_id": "b", "params": {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}},
    ]});
    let resp = send(http.post(url("/v1/messages/batches")).json(&bad))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("requests.1."),
        "{err}"
    );
    // A good one runs to `ended` with results by custom_id.
    let good = json!({"requests": [
        {"custom_id": "a", "params": message("m-one", "one")},
        {"custom_id": "b", "params": message("m-two", "two")},
    ]});
    let batch: Value = send(http.post(url("/v1/messages/batches")).json(&good))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(batch["type"], "message_batch");
    assert_eq!(batch["processing_status"], "in_progress");
    assert!(batch["created_at"].as_str().unwrap().ends_with('Z'));
    let id = batch["id"].as_str().unwrap().to_owned();
    let mut ended = Value::Null;
    sim.finish_jobs();
    for _ in 0..100 {
        ended = send(http.get(url(&format!("/v1/messages/batches/{id}"))))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ended["processing_status"] == "ended" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ended["processing_status"], "ended", "{ended}");
    assert_eq!(ended["request_counts"]["succeeded"], 2);
    let results = send(http.get(ended["results_url"].as_str().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(line["result"]["type"], "succeeded");
        let custom = line["custom_id"].as_str().unwrap();
        let expected = sim::expected_response(
            MESSAGES,
            &good["requests"][if custom == "a" { 0 } else { 1 }]["params"],
        );
        assert_eq!(line["result"]["message"], expected);
    }
    // Listed for its key only, newest first.
    let list: Value = send(http.get(url("/v1/messages/batches?limit=1")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], id.as_str());
    let other: Value = http
        .get(url("/v1/messages/batches"))
        .header("x-api-key", "sk-other")
        .header("anthropic-version", VERSION)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(other["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_managed_upstream_gets_carpools_key_in_x_api_key_and_the_callers_version() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new("anthropic", &sim)
        .client("alice", ALICE)
        .batching("max_wait = \"100ms\"")
        .toml();
    let app = TestApp::start(&config, &[("UPSTREAM_KEY", "sk-ant-upstream")]).await;
    let resp = post(&app, ALICE, &[], &message("claude-sim-a", "managed")).await;
    assert_eq!(resp.status(), 200);
    let id = async_call(&app, ALICE, &[], &message("claude-sim-a", "managed batch")).await;
    assert_eq!(settled(&app, ALICE, &id).await["status"], "succeeded");
    let calls = sim.calls();
    assert!(!calls.is_empty());
    for call in &calls {
        assert_eq!(
            call.credential.as_deref(),
            Some("sk-ant-upstream"),
            "{call:?}"
        );
        assert!(call.header("authorization").is_none());
    }
    let plain = calls.iter().find(|c| c.route == MESSAGES).unwrap();
    assert_eq!(plain.header("anthropic-version"), Some(VERSION));
    // A key not listed in [[clients]]: 401 in Anthropic's shape.
    let resp = post(&app, BOB, &[], &message("claude-sim-a", "x")).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<Value>().await.unwrap()["type"], "error");
}

/// A callback receiver on 127.0.0.1 that keeps every body it gets.
async fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let got: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let sink = sink.clone();
        async move {
            sink.lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test]
async fn admin_jobs_metrics_and_webhooks_cover_anthropic_batches() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    sim.add_fault(Fault::NextJob {
        outcome: sim::JobOutcome::Stuck,
        count: 1,
    });
    let config = SimConfig::new("anthropic", &sim)
        .server("admin_token = \"admin-secret\"")
        .batching("max_wait = \"100ms\"")
        .extra("[webhooks]\nsecret = \"whsec_YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=\"\nschedule = [\"50ms\"]\nallow_hosts = [\"127.0.0.1\"]\n")
        .extra("[[prices.models]]\nmodel = \"claude-sim-*\"\ninput = 1.0\noutput = 5.0\n")
        .toml();
    let app = TestApp::start(&config, &[("UPSTREAM_KEY", "sk-ant-upstream")]).await;
    let (hook, got) = receiver().await;
    let id = async_call(
        &app,
        ALICE,
        &[("carpool-callback", hook.as_str())],
        &message("claude-sim-b", "call me back"),
    )
    .await;
    // Running at the provider: listed by the admin API with its batch.
    let jobs = loop {
        let jobs: Value = client()
            .get(app.url("/admin/jobs"))
            .bearer_auth("admin-secret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if jobs["data"][0]["provider_status"] == "in_progress" {
            break jobs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let job = &jobs["data"][0];
    assert!(
        job["job_id"].as_str().unwrap().starts_with("msgbatch_"),
        "{jobs}"
    );
    assert_eq!(job["endpoint"], MESSAGES);
    sim.clear_faults();
    assert_eq!(settled(&app, ALICE, &id).await["status"], "succeeded");
    let event = loop {
        if let Some(event) = got.lock().unwrap().first().cloned() {
            break event;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(event["type"], "carpool.request.succeeded");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["response"]["body"]["type"], "message");
    let text = support::metrics(&app).await;
    assert!(
        text.lines().any(
            |l| l.starts_with("carpool_requests_total") && l.contains("route=\"/v1/messages\"")
        ),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("carpool_tokens_total") && l.contains("claude-sim-b")),
        "tokens under the answering model, not the window's `*`"
    );
}

#[tokio::test]
async fn expired_lines_go_down_the_failure_chain_and_the_answered_ones_are_kept() {
    // The four fill a window at once; the resubmitted ones flush by age.
    let (app, sim) = setup("max_requests = 4\nmax_wait = \"500ms\"").await;
    sim.add_fault(Fault::NextJob {
        outcome: sim::JobOutcome::Expired,
        count: 1,
    });
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            async_call(
                &app,
                ALICE,
                &[],
                &message("claude-sim-a", &format!("e {i}")),
            )
            .await,
        );
    }
    for id in &ids {
        assert_eq!(settled(&app, ALICE, id).await["status"], "succeeded");
    }
    // The first batch ended with half its lines expired; only those went
    // again (on_batch_failure = resubmit), in a second batch.
    let jobs = anthropic_jobs(&sim);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(jobs[0].custom_ids.len(), 4);
    assert_eq!(jobs[1].custom_ids.len(), 2);
    assert!(jobs[1]
        .custom_ids
        .iter()
        .all(|id| jobs[0].custom_ids.contains(id)));
}
