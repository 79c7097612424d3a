//! Provider errors that will not clear fail the window at once, through
//! the HTTP surface against the simulator, in both dialects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{create_route, eventually, post_chat, settled, TestApp, PATIENCE};

const DIALECTS: [&str; 2] = ["mistral", "openai"];
const ALICE: &str = "sk-alice";

async fn setup(dialect: &str, batching: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new(dialect, &sim)
        .client("alice", ALICE)
        .batching("max_wait = \"100ms\"\non_batch_failure = \"error\"")
        .batching(batching);
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

fn chat(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 32})
}

/// An async call's handle id.
async fn async_call(app: &TestApp, text: &str) -> String {
    let resp = post_chat(app, ALICE, &[("carpool-mode", "async")], &chat(text)).await;
    assert_eq!(resp.status().as_u16(), 202);
    let body: Value = resp.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

async fn fails_with(dialect: &str, fault: Fault, needle: &str) {
    let (app, sim) = setup(dialect, "").await;
    sim.add_fault(fault);
    let id = async_call(&app, "hello").await;
    let object = settled(&app, ALICE, &id).await;
    assert_eq!(object["status"], "failed", "{dialect}: {object}");
    let message = object["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{dialect}: {object}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn create_refused_400_forever_fails_the_window_with_the_message() {
    for dialect in DIALECTS {
        fails_with(
            dialect,
            Fault::status(create_route(dialect), 400, 0),
            "simulated 400",
        )
        .await;
    }
}

#[tokio::test]
async fn upload_refused_401_forever_fails_the_window_with_the_message() {
    for dialect in DIALECTS {
        fails_with(
            dialect,
            Fault::status("POST /v1/files", 401, 0),
            "simulated 401",
        )
        .await;
    }
}

#[tokio::test]
async fn insufficient_quota_429_is_not_retried() {
    for dialect in DIALECTS {
        fails_with(
            dialect,
            Fault::status_with_code("POST /v1/files", 429, 0, "insufficient_quota"),
            "insufficient_quota",
        )
        .await;
    }
}

#[tokio::test]
async fn create_refused_500_twice_still_succeeds() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "").await;
        sim.add_fault(Fault::status(create_route(dialect), 500, 2));
        let id = async_call(&app, "hello").await;
        let object = settled(&app, ALICE, &id).await;
        assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn huge_retry_after_is_parsed_without_a_panic() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "").await;
        sim.add_fault(Fault::rate_limited_raw("POST /v1/files", 0, "1e30"));
        let _id = async_call(&app, "hello").await;
        // A panic in the submission task never counts the failure.
        let counted = support::eventually(std::time::Duration::from_secs(60), || {
            sim.calls()
                .iter()
                .any(|c| c.route == "/v1/files" && c.status == 429)
        })
        .await;
        assert!(counted, "{dialect}");
        let mut seen = false;
        for _ in 0..600 {
            let text = support::metrics(&app).await;
            if support::metric(&text, "carpool_submit_failures_total") >= 1.0 {
                seen = true;
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            seen,
            "{dialect}: the failed upload was counted, not a panic"
        );
        app.stop().await.unwrap();
    }
}

/// The route a dialect polls one job on.
fn poll_route(dialect: &str) -> &'static str {
    match dialect {
        "openai" => "GET /v1/batches/{id}",
        _ => "GET /v1/batch/jobs/{id}",
    }
}

#[tokio::test]
async fn a_held_poll_and_a_download_stalled_mid_file_time_out_and_are_retried() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "call_timeout = \"1s\"\nidle_timeout = \"1s\"").await;
        sim.add_fault(Fault::hold_response(poll_route(dialect), 1));
        sim.add_fault(Fault::hold_body_after_lines(
            "GET /v1/files/{id}/content",
            1,
            1,
        ));
        let first = async_call(&app, "one").await;
        let second = async_call(&app, "two").await;
        for id in [first, second] {
            let object = settled(&app, ALICE, &id).await;
            assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        }
        // Both faults fired: the held calls are still held, not released.
        assert!(sim.faults().is_empty(), "{dialect}: {:?}", sim.faults());
        app.stop().await.unwrap();
    }
}

/// A held (wait mode) call and an async one against a provider that keeps
/// refusing `fault`: both fail with the provider's message, the held
/// caller with 502.
async fn poll_half_fails_with(dialect: &str, fault: Fault, needle: &str) {
    let (app, sim) = setup(dialect, "").await;
    sim.add_fault(fault);
    let id = async_call(&app, "hello").await;
    let body = chat("held");
    let held = post_chat(&app, ALICE, &[("carpool-mode", "wait")], &body);
    let held = tokio::time::timeout(support::PATIENCE, held)
        .await
        .unwrap_or_else(|_| panic!("{dialect}: the held caller was never answered"));
    assert_eq!(held.status().as_u16(), 502, "{dialect}");
    let body: Value = held.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{dialect}: {body}");
    let object = settled(&app, ALICE, &id).await;
    assert_eq!(object["status"], "failed", "{dialect}: {object}");
    let message = object["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{dialect}: {object}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn poll_refused_404_forever_fails_the_window_with_the_message() {
    for dialect in DIALECTS {
        poll_half_fails_with(
            dialect,
            Fault::status(poll_route(dialect), 404, 0),
            "simulated 404",
        )
        .await;
    }
}

#[tokio::test]
async fn result_download_refused_403_forever_fails_the_window_with_the_message() {
    for dialect in DIALECTS {
        poll_half_fails_with(
            dialect,
            Fault::status("GET /v1/files/{id}/content", 403, 0),
            "simulated 403",
        )
        .await;
    }
}

#[tokio::test]
async fn an_over_long_result_line_fails_only_its_request() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_result_line = \"64KB\"").await;
        // Three requests, one window: line 2 of the output file is 2 MB.
        sim.add_fault(Fault::pad_line(
            "GET /v1/files/{id}/content",
            2,
            2_000_000,
            0,
        ));
        let mut ids = Vec::new();
        for text in ["one", "two", "three"] {
            ids.push(async_call(&app, text).await);
        }
        let mut statuses = Vec::new();
        for id in &ids {
            let object = settled(&app, ALICE, id).await;
            statuses.push((object["status"].clone(), object["error"]["code"].clone()));
        }
        let too_large = statuses
            .iter()
            .filter(|(s, c)| s == "failed" && c == "result_too_large")
            .count();
        let succeeded = statuses.iter().filter(|(s, _)| s == "succeeded").count();
        assert_eq!((too_large, succeeded), (1, 2), "{dialect}: {statuses:?}");
        app.stop().await.unwrap();
    }
}

/// The ids of the batch input files the simulator holds.
async fn input_files(sim: &SimHandle) -> Vec<String> {
    let list: Value = reqwest::Client::new()
        .get(format!("{}/v1/files?purpose=batch", sim.base_url()))
        .bearer_auth("sk-upstream")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["id"].as_str().map(str::to_owned))
        .collect()
}

/// Whether the simulator ends up holding no batch input file.
async fn input_files_go(sim: &SimHandle) -> bool {
    for _ in 0..600 {
        if input_files(sim).await.is_empty() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn input_files_are_deleted_once_their_batch_is_finished() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "").await;
        let id = async_call(&app, "hello").await;
        let object = settled(&app, ALICE, &id).await;
        assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        assert!(
            input_files_go(&sim).await,
            "{dialect}: {:?}",
            input_files(&sim).await
        );
        let deleted = sim
            .calls()
            .iter()
            .any(|c| c.method == "DELETE" && c.route == "/v1/files/{file_id}" && c.status == 200);
        assert!(deleted, "{dialect}: the sim saw the DELETE");
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn the_input_file_of_a_window_refused_at_create_is_deleted() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "").await;
        sim.add_fault(Fault::status(create_route(dialect), 400, 0));
        let id = async_call(&app, "hello").await;
        let object = settled(&app, ALICE, &id).await;
        assert_eq!(object["status"], "failed", "{dialect}: {object}");
        let uploaded = sim
            .calls()
            .iter()
            .any(|c| c.method == "POST" && c.route == "/v1/files" && c.status == 200);
        assert!(
            uploaded,
            "{dialect}: the input was uploaded before the refusal"
        );
        assert!(
            input_files_go(&sim).await,
            "{dialect}: {:?}",
            input_files(&sim).await
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn the_input_file_of_a_window_failed_at_polling_is_deleted() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "").await;
        sim.add_fault(Fault::status(poll_route(dialect), 404, 0));
        let id = async_call(&app, "hello").await;
        let object = settled(&app, ALICE, &id).await;
        assert_eq!(object["status"], "failed", "{dialect}: {object}");
        assert!(
            input_files_go(&sim).await,
            "{dialect}: {:?}",
            input_files(&sim).await
        );
        app.stop().await.unwrap();
    }
}

/// The (id, filename) of the files the simulator holds named as carpool
/// window inputs.
async fn window_inputs(sim: &SimHandle) -> Vec<(String, String)> {
    let list: Value = reqwest::Client::new()
        .get(format!("{}/v1/files?purpose=batch", sim.base_url()))
        .bearer_auth("sk-upstream")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| Some((f["id"].as_str()?, f["filename"].as_str()?)))
        .filter(|(_, name)| name.starts_with("cpw_"))
        .map(|(id, name)| (id.to_owned(), name.to_owned()))
        .collect()
}

#[tokio::test]
async fn an_upload_answered_after_call_timeout_leaves_one_input_file_then_none() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "call_timeout = \"1s\"").await;
        // The first upload is stored but its answer held past call_timeout:
        // carpool uploads again. The job then runs until let go.
        sim.add_fault(Fault::hold_response("POST /v1/files", 1));
        sim.add_fault(Fault::NextJob {
            outcome: JobOutcome::Stuck,
            count: 1,
        });
        let id = async_call(&app, "hello").await;
        assert!(
            eventually(PATIENCE, || sim.jobs().len() == 1).await,
            "{dialect}: the job was created"
        );
        let uploads = sim
            .calls()
            .iter()
            .filter(|c| c.method == "POST" && c.route == "/v1/files")
            .count();
        assert_eq!(uploads, 2, "{dialect}: the held upload was tried again");
        let inputs = window_inputs(&sim).await;
        assert_eq!(
            inputs.len(),
            1,
            "{dialect}: one copy while the job runs: {inputs:?}"
        );
        let job_input = sim.jobs()[0].input_file_ids.clone();
        assert_eq!(
            job_input,
            vec![inputs[0].0.clone()],
            "{dialect}: the job's own file kept"
        );

        sim.clear_faults();
        sim.finish_jobs();
        let object = settled(&app, ALICE, &id).await;
        assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        let mut left = window_inputs(&sim).await;
        for _ in 0..600 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            left = window_inputs(&sim).await;
        }
        assert!(left.is_empty(), "{dialect}: none once finished: {left:?}");
        app.stop().await.unwrap();
    }
}

/// Uploads `name` to the simulator as carpool's upstream key would.
async fn upload_named(sim: &SimHandle, name: &str) -> String {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{}\n".to_vec()).file_name(name.to_owned()),
        );
    let body: Value = reqwest::Client::new()
        .post(format!("{}/v1/files", sim.base_url()))
        .bearer_auth("sk-upstream")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_janitor_deletes_inputs_of_finished_windows_and_nothing_it_did_not_name() {
    for dialect in DIALECTS {
        // results_ttl 20 s: the janitor passes every 2 s.
        let (app, sim) = setup(dialect, "results_ttl = \"20s\"").await;
        let id = async_call(&app, "hello").await;
        let object = settled(&app, ALICE, &id).await;
        assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        let window = sim.jobs()[0].metadata.as_ref().unwrap()["carpool_window"]
            .as_str()
            .unwrap()
            .to_owned();
        // A copy of the finished window's input the submission never
        // learned of, and two files carpool did not name as its own.
        let orphan = upload_named(&sim, &format!("{window}.jsonl")).await;
        let unknown = format!("{}.jsonl", carpool::model::WindowId::generate());
        let foreign = [
            upload_named(&sim, "nightly-export.jsonl").await,
            upload_named(&sim, &unknown).await,
            upload_named(&sim, &format!("{window}.jsonl.bak")).await,
        ];
        let mut ids: Vec<String> = Vec::new();
        for _ in 0..600 {
            ids = input_files(&sim).await;
            if !ids.contains(&orphan) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!ids.contains(&orphan), "{dialect}: the orphan was deleted");
        for file in &foreign {
            assert!(ids.contains(file), "{dialect}: {file} left alone: {ids:?}");
        }
        app.stop().await.unwrap();
    }
}

/// A passthrough window's key is its caller's, and the store forgets it
/// when the window finishes: the janitor can never list that account
/// again. So a copy of the window's input the submission never recorded
/// (an upload that timed out after it went through) is deleted when the
/// window finishes, with the caller's key.
#[tokio::test]
async fn a_passthrough_windows_unrecorded_input_copies_are_deleted_when_it_finishes() {
    const CALLER: &str = "sk-caller";
    for dialect in DIALECTS {
        let sim = sim::spawn(SimOptions::default()).await.unwrap();
        sim.add_fault(Fault::next_job(JobOutcome::Stuck));
        let toml = format!(
            r#"
[[upstreams]]
name = "pt"
dialect = "{dialect}"
base_url = "{}"
auth = "passthrough"

[batching]
poll_interval = "50ms"
max_wait = "100ms"
"#,
            sim.base_url()
        );
        let app = TestApp::start(&toml, &[]).await;
        let resp = post_chat(&app, CALLER, &[("carpool-mode", "async")], &chat("hello")).await;
        assert_eq!(resp.status().as_u16(), 202, "{dialect}");
        let id = resp.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            eventually(PATIENCE, || !sim.jobs().is_empty()).await,
            "{dialect}: a job"
        );
        let window = sim.jobs()[0].metadata.as_ref().unwrap()["carpool_window"]
            .as_str()
            .unwrap()
            .to_owned();
        let orphan = upload_named(&sim, &format!("{window}.jsonl")).await;
        let foreign = upload_named(&sim, "nightly-export.jsonl").await;

        sim.clear_faults();
        let object = settled(&app, CALLER, &id).await;
        assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        let mut ids = input_files(&sim).await;
        for _ in 0..600 {
            if !ids.contains(&orphan) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            ids = input_files(&sim).await;
        }
        assert!(!ids.contains(&orphan), "{dialect}: the copy was deleted");
        assert!(ids.contains(&foreign), "{dialect}: {foreign} left alone");
        let deleted_with: Vec<_> = sim
            .calls()
            .into_iter()
            .filter(|c| c.method == "DELETE" && c.path.ends_with(&orphan))
            .map(|c| c.credential)
            .collect();
        assert_eq!(deleted_with, vec![Some(CALLER.to_owned())], "{dialect}");
        app.stop().await.unwrap();
    }
}
