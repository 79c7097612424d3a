//! The simulated provider through its HTTP surface: both batch dialects end to
//! end, every fault, validation, listing, cancel and the control API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use carpool::sim::{self, expected_response, Fault, JobOutcome, SimHandle, SimOptions};
use futures_util::StreamExt;
use reqwest::{multipart, Client, StatusCode};
use serde_json::{json, Value};

const KEY: &str = "sk-test-1";

struct Sim {
    handle: SimHandle,
    http: Client,
    base: String,
}

async fn start(opts: SimOptions) -> Sim {
    let handle = sim::spawn(opts).await.unwrap();
    let base = handle.base_url();
    Sim {
        handle,
        http: Client::new(),
        base,
    }
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn upload(&self, jsonl: &str) -> String {
        let (status, body) = self.upload_raw(jsonl.as_bytes().to_vec()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    async fn upload_raw(&self, data: Vec<u8>) -> (StatusCode, Value) {
        let form = multipart::Form::new()
            .text("purpose", "batch")
            .part("file", multipart::Part::bytes(data).file_name("in.jsonl"));
        let r = self
            .http
            .post(self.url("/v1/files"))
            .bearer_auth(KEY)
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn content(&self, file_id: &str) -> Vec<Value> {
        let r = self
            .http
            .get(self.url(&format!("/v1/files/{file_id}/content")))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Poll a job until `done(job)` holds; every status seen, in order.
    async fn poll(&self, path: &str, done: impl Fn(&Value) -> bool) -> (Value, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen: Vec<String> = Vec::new();
        loop {
            let (status, job) = self.get(path).await;
            assert_eq!(status, StatusCode::OK, "{job}");
            let s = job["status"].as_str().unwrap().to_owned();
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            if done(&job) {
                return (job, seen);
            }
            assert!(Instant::now() < deadline, "job never got there: {job}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn chat_body(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

fn openai_line(id: &str, model: &str, text: &str) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": chat_body(model, text)}).to_string()
}

fn mistral_line(id: &str, text: &str) -> String {
    json!({"custom_id": id, "body": {"messages": [{"role": "user", "content": text}]}}).to_string()
}

fn jsonl(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn openai_terminal(j: &Value) -> bool {
    matches!(
        j["status"].as_str(),
        Some("completed" | "failed" | "expired" | "cancelled")
    )
}

fn mistral_terminal(j: &Value) -> bool {
    matches!(
        j["status"].as_str(),
        Some("SUCCESS" | "FAILED" | "TIMEOUT_EXCEEDED" | "CANCELLED")
    )
}

/// Is `seen` in the order of `order` (each step forward or equal)?
fn in_order(seen: &[String], order: &[&str]) -> bool {
    let idx: Vec<usize> = seen
        .iter()
        .map(|s| order.iter().position(|o| o == s).unwrap_or(usize::MAX))
        .collect();
    idx.iter().all(|i| *i != usize::MAX) && idx.windows(2).all(|w| w[0] < w[1])
}

fn by_custom_id(lines: Vec<Value>) -> HashMap<String, Value> {
    lines
        .into_iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_owned(), l))
        .collect()
}

async fn openai_batch(s: &Sim, lines: &[String]) -> Value {
    let file = s.upload(&jsonl(lines)).await;
    let (status, batch) = s
        .post(
            "/v1/batches",
            &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"gw_window": "w1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    batch
}

async fn mistral_job(s: &Sim, lines: &[String], model: &str) -> Value {
    let file = s.upload(&jsonl(lines)).await;
    let (status, job) = s
        .post(
            "/v1/batch/jobs",
            &json!({"input_files": [file], "endpoint": "/v1/chat/completions", "model": model, "metadata": {"gw_window": "w1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job
}

// ---------------------------------------------------------------- sync calls

#[tokio::test]
async fn chat_answer_is_deterministic_and_matches_expected_response() {
    let s = start(SimOptions::default()).await;
    let body = chat_body("sim-small", "what is a carpool?");
    let (status, a) = s.post("/v1/chat/completions", &body).await;
    let (_, b) = s.post("/v1/chat/completions", &body).await;
    let (_, other) = s
        .post(
            "/v1/chat/completions",
            &chat_body("sim-small", "something else"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(a, b);
    assert_eq!(a, expected_response("/v1/chat/completions", &body));
    assert_ne!(
        a["choices"][0]["message"]["content"],
        other["choices"][0]["message"]["content"]
    );
    assert!(a["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("what is a carpool?"));
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn missing_bearer_gets_401_and_the_credential_is_recorded_per_call() {
    let s = start(SimOptions::default()).await;
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body("m", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    s.post("/v1/chat/completions", &chat_body("m", "x")).await;
    let calls = s.handle.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].credential, None);
    assert_eq!(calls[0].status, 401);
    assert_eq!(calls[1].credential.as_deref(), Some(KEY));
    assert_eq!(calls[1].route, "/v1/chat/completions");
    assert_eq!(calls[1].method, "POST");
}

#[tokio::test]
async fn invalid_json_and_missing_model_get_openai_style_400() {
    let s = start(SimOptions::default()).await;
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "model");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

async fn sse_events(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn streamed_chat_sends_chunks_then_done_and_matches_the_plain_answer() {
    let s = start(SimOptions {
        stream_chunks: 5,
        ..SimOptions::default()
    })
    .await;
    let mut body = chat_body("sim-small", "stream me a story");
    let plain = expected_response("/v1/chat/completions", &body);
    body["stream"] = json!(true);
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse_events(r).await;
    assert_eq!(events.len(), 7, "5 content chunks, a final chunk, [DONE]");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..6]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == plain["id"]));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn stream_gate_holds_everything_after_the_first_event_until_released() {
    let s = start(SimOptions::default()).await;
    s.handle.hold_streams();
    let mut body = chat_body("sim-small", "hold me");
    body["stream"] = json!(true);
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(first.starts_with("data: {"), "{first}");
    assert!(first.contains("\"role\":\"assistant\""));
    // Nothing more arrives while held.
    let more = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(
        more.is_err(),
        "a second event arrived while the gate was held"
    );
    s.handle.release_streams();
    let mut rest = String::new();
    while let Some(chunk) = stream.next().await {
        rest.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(rest.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test]
async fn other_sync_endpoints_answer_deterministically() {
    let s = start(SimOptions::default()).await;
    for (path, body) in [
        (
            "/v1/embeddings",
            json!({"model": "sim-embed", "input": ["a", "b"]}),
        ),
        (
            "/v1/fim/completions",
            json!({"model": "codestral-latest", "prompt": "def f(", "suffix": "return 1"}),
        ),
        ("/v1/moderations", json!({"input": "please flagme"})),
        (
            "/v1/chat/moderations",
            json!({"model": "m", "input": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "once upon"}),
        ),
    ] {
        let (status, answer) = s.post(path, &body).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        assert_eq!(answer, expected_response(path, &body), "{path}");
    }
    let (_, emb) = s
        .post(
            "/v1/embeddings",
            &json!({"model": "e", "input": ["a", "b"]}),
        )
        .await;
    assert_eq!(emb["data"].as_array().unwrap().len(), 2);
    let (_, m) = s
        .post("/v1/moderations", &json!({"input": "please flagme"}))
        .await;
    assert_eq!(m["results"][0]["flagged"], true);
    let (status, models) = s.get("/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert!(models["data"].as_array().unwrap().len() > 3);
}

// ---------------------------------------------------------- batch lifecycles

#[tokio::test]
async fn openai_batch_runs_validating_to_completed_with_the_synchronous_answers() {
    let s = start(SimOptions {
        job_duration: Duration::from_millis(300),
        ..SimOptions::default()
    })
    .await;
    let lines: Vec<String> = (0..20)
        .map(|i| openai_line(&format!("r{i}"), "gpt-4o-mini", &format!("q{i}")))
        .collect();
    let batch = openai_batch(&s, &lines).await;
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["object"], "batch");
    assert!(batch["id"].as_str().unwrap().starts_with("batch_"));
    let id = batch["id"].as_str().unwrap();
    let (done, seen) = s.poll(&format!("/v1/batches/{id}"), openai_terminal).await;
    assert!(
        in_order(
            &seen,
            &["validating", "in_progress", "finalizing", "completed"]
        ),
        "{seen:?}"
    );
    assert!(seen.contains(&"in_progress".to_owned()), "{seen:?}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 20, "completed": 20, "failed": 0})
    );
    assert_eq!(done["model"], "gpt-4o-mini");
    assert!(done["error_file_id"].is_null());
    assert!(done["completed_at"].is_u64());
    let out = s.content(done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 20);
    let order: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    let input_order: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    assert_ne!(order, input_order, "output lines are shuffled");
    for line in &out {
        let i: usize = line["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["error"].is_null());
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        let body = chat_body("gpt-4o-mini", &format!("q{i}"));
        assert_eq!(
            line["response"]["body"],
            expected_response("/v1/chat/completions", &body)
        );
    }
    let jobs = s.handle.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].custom_ids, input_order);
    assert_eq!(jobs[0].status, "completed");
    assert_eq!(jobs[0].model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(jobs[0].metadata, Some(json!({"gw_window": "w1"})));
    assert_eq!(jobs[0].credential.as_deref(), Some(KEY));
    let create = s
        .handle
        .calls()
        .into_iter()
        .find(|c| c.route == "/v1/batches" && c.method == "POST")
        .unwrap();
    assert_eq!(create.job_id.as_deref(), Some(id));
}

#[tokio::test]
async fn mistral_job_runs_queued_to_success_and_fills_in_the_job_model() {
    let s = start(SimOptions {
        job_duration: Duration::from_millis(300),
        ..SimOptions::default()
    })
    .await;
    let lines: Vec<String> = (0..10)
        .map(|i| mistral_line(&format!("c{i}"), &format!("m{i}")))
        .collect();
    let job = mistral_job(&s, &lines, "mistral-small-latest").await;
    assert_eq!(job["status"], "QUEUED");
    assert_eq!(job["total_requests"], 10);
    let id = job["id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "Mistral job ids are UUIDs");
    let (done, seen) = s
        .poll(&format!("/v1/batch/jobs/{id}"), mistral_terminal)
        .await;
    assert!(
        in_order(&seen, &["QUEUED", "RUNNING", "SUCCESS"]),
        "{seen:?}"
    );
    assert_eq!(done["succeeded_requests"], 10);
    assert_eq!(done["completed_requests"], 10);
    assert_eq!(done["failed_requests"], 0);
    assert!(done["error_file"].is_null());
    let file_id = done["output_file"].as_str().unwrap();
    let (_, meta) = s.get(&format!("/v1/files/{file_id}")).await;
    assert_eq!(meta["sample_type"], "batch_result");
    assert_eq!(meta["source"], "mistral");
    assert_eq!(meta["num_lines"], 10);
    let out = by_custom_id(s.content(file_id).await);
    for i in 0..10 {
        let line = &out[&format!("c{i}")];
        assert_eq!(line["response"]["status_code"], 200);
        let body = chat_body("mistral-small-latest", &format!("m{i}"));
        assert_eq!(
            line["response"]["body"],
            expected_response("/v1/chat/completions", &body)
        );
    }
    assert_eq!(s.handle.jobs()[0].custom_ids.len(), 10);
}

#[tokio::test]
async fn mistral_inline_requests_come_back_in_outputs_with_inline_true() {
    let s = start(SimOptions::default()).await;
    let requests: Vec<Value> = (0..3)
        .map(|i| json!({"custom_id": format!("i{i}"), "body": {"messages": [{"role": "user", "content": format!("t{i}")}]}}))
        .collect();
    let (status, job) = s
        .post("/v1/batch/jobs", &json!({"requests": requests, "endpoint": "/v1/chat/completions", "model": "mistral-large-latest"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let id = job["id"].as_str().unwrap();
    s.poll(&format!("/v1/batch/jobs/{id}"), mistral_terminal)
        .await;
    let (_, plain) = s.get(&format!("/v1/batch/jobs/{id}")).await;
    assert!(plain.get("outputs").is_none());
    let (_, inline) = s.get(&format!("/v1/batch/jobs/{id}?inline=true")).await;
    let outputs = by_custom_id(inline["outputs"].as_array().unwrap().clone());
    assert_eq!(outputs.len(), 3);
    let body = chat_body("mistral-large-latest", "t1");
    assert_eq!(
        outputs["i1"]["response"]["body"],
        expected_response("/v1/chat/completions", &body)
    );
    assert!(s.handle.jobs()[0].inline);
}

// ------------------------------------------------------------------- faults

#[tokio::test]
async fn rate_limit_fault_answers_429_with_retry_after_then_lets_calls_through() {
    let s = start(SimOptions::default()).await;
    s.handle
        .add_fault(Fault::rate_limited("POST /v1/files", 3, 2));
    for _ in 0..3 {
        let (status, body) = s.upload_raw(b"{}\n".to_vec()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
    let form = multipart::Form::new().text("purpose", "batch").part(
        "file",
        multipart::Part::bytes(b"{}".to_vec()).file_name("a"),
    );
    s.handle
        .add_fault(Fault::rate_limited("POST /v1/files", 1, 7));
    let r = s
        .http
        .post(s.url("/v1/files"))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "7");
    let (status, _) = s.upload_raw(b"{}\n".to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    let statuses: Vec<u16> = s.handle.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, vec![429, 429, 429, 429, 200]);
    assert!(s.handle.faults().is_empty());
}

#[tokio::test]
async fn server_error_fault_hits_only_its_route_and_has_no_side_effect() {
    let s = start(SimOptions::default()).await;
    let file = s.upload(&jsonl(&[openai_line("a", "m", "x")])).await;
    s.handle
        .add_fault(Fault::status("POST /v1/batches", 500, 1));
    let create = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let (status, _) = s.get("/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = s.post("/v1/batches", &create).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["type"], "server_error");
    assert!(s.handle.jobs().is_empty(), "a refused create makes no job");
    let (status, _) = s.post("/v1/batches", &create).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.handle.jobs().len(), 1);
}

#[tokio::test]
async fn drop_connection_fault_closes_without_a_response() {
    let s = start(SimOptions::default()).await;
    s.handle
        .add_fault(Fault::drop_connection("GET /v1/batch/jobs/{id}", 1));
    let err = s
        .http
        .get(s.url("/v1/batch/jobs/whatever"))
        .bearer_auth(KEY)
        .send()
        .await;
    assert!(err.is_err(), "expected a transport error, got {err:?}");
    let (status, _) = s.get("/v1/batch/jobs/whatever").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        s.handle.calls()[0].status,
        0,
        "a dropped call is recorded with status 0"
    );
}

#[tokio::test]
async fn hold_response_fault_creates_the_job_but_answers_only_when_released() {
    let s = start(SimOptions::default()).await;
    let file = s.upload(&jsonl(&[openai_line("a", "m", "x")])).await;
    s.handle
        .add_fault(Fault::hold_response("POST /v1/batches", 1));
    let create = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let request = s
        .http
        .post(s.url("/v1/batches"))
        .bearer_auth(KEY)
        .json(&create)
        .send();
    let held = tokio::spawn(request);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.handle.held_responses() == 0 {
        assert!(Instant::now() < deadline, "the create was never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!held.is_finished(), "a held response must not arrive");
    let jobs = s.handle.jobs();
    assert_eq!(jobs.len(), 1, "the held call was handled");
    let logged = s.handle.calls();
    let create_call = logged.iter().find(|c| c.route == "/v1/batches").unwrap();
    assert_eq!(create_call.status, 200);
    assert_eq!(create_call.job_id.as_deref(), Some(jobs[0].id.as_str()));

    s.handle.release_held();
    let response = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let batch: Value = response.json().await.unwrap();
    assert_eq!(batch["id"], jobs[0].id.as_str());
    assert_eq!(s.handle.held_responses(), 0);
    let (status, _) = s.post("/v1/batches", &create).await;
    assert_eq!(status, StatusCode::OK, "a used-up hold lets calls through");
}

#[tokio::test]
async fn hold_body_after_lines_sends_that_many_lines_then_pauses_until_released() {
    let s = start(SimOptions::default()).await;
    let lines: Vec<String> = (0..5)
        .map(|i| openai_line(&format!("r{i}"), "m", &format!("line {i}")))
        .collect();
    let data = jsonl(&lines);
    let file = s.upload(&data).await;
    s.handle.add_fault(Fault::hold_body_after_lines(
        "GET /v1/files/{file_id}/content",
        2,
        1,
    ));
    let resp = s
        .http
        .get(s.url(&format!("/v1/files/{file_id}/content", file_id = file)))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.iter().filter(|b| **b == b'\n').count() < 2 {
        assert!(Instant::now() < deadline, "the first lines never came");
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    while s.handle.held_responses() == 0 {
        assert!(Instant::now() < deadline, "the body was never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        String::from_utf8(got.clone()).unwrap(),
        jsonl(&lines[..2]),
        "exactly two lines before the hold"
    );
    s.handle.release_held();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(got).unwrap(), data);
    assert_eq!(s.handle.held_responses(), 0);
}

#[tokio::test]
async fn clearing_faults_lets_held_responses_go() {
    let s = start(SimOptions::default()).await;
    s.handle
        .add_fault(Fault::hold_response("GET /v1/models", 0));
    let held = tokio::spawn(s.http.get(s.url("/v1/models")).bearer_auth(KEY).send());
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.handle.held_responses() == 0 {
        assert!(Instant::now() < deadline, "the call was never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.handle.clear_faults();
    let response = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn latency_option_and_fault_delay_responses() {
    let s = start(SimOptions {
        latency: Duration::from_millis(60),
        ..SimOptions::default()
    })
    .await;
    let t = Instant::now();
    s.get("/v1/models").await;
    assert!(t.elapsed() >= Duration::from_millis(60));
    s.handle.update_options(|o| o.latency = Duration::ZERO);
    s.handle
        .add_fault(Fault::latency(Duration::from_millis(80)));
    let t = Instant::now();
    s.get("/v1/models").await;
    assert!(t.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn next_job_failed_ends_failed_in_both_dialects() {
    let s = start(SimOptions::default()).await;
    s.handle.add_fault(Fault::next_job(JobOutcome::Failed));
    let b = openai_batch(&s, &[openai_line("a", "m", "x")]).await;
    let (done, _) = s
        .poll(
            &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
            openai_terminal,
        )
        .await;
    assert_eq!(done["status"], "failed");
    assert!(done["failed_at"].is_u64());
    assert_eq!(done["errors"]["data"][0]["code"], "simulated_failure");
    assert!(done["output_file_id"].is_null());

    s.handle.add_fault(Fault::next_job(JobOutcome::Failed));
    let j = mistral_job(&s, &[mistral_line("a", "x")], "m").await;
    let (done, _) = s
        .poll(
            &format!("/v1/batch/jobs/{}", j["id"].as_str().unwrap()),
            mistral_terminal,
        )
        .await;
    assert_eq!(done["status"], "FAILED");
    assert_eq!(done["errors"][0]["count"], 1);
    // The fault was for one job only.
    let j2 = mistral_job(&s, &[mistral_line("a", "x")], "m").await;
    let (done, _) = s
        .poll(
            &format!("/v1/batch/jobs/{}", j2["id"].as_str().unwrap()),
            mistral_terminal,
        )
        .await;
    assert_eq!(done["status"], "SUCCESS");
}

#[tokio::test]
async fn expired_openai_batch_delivers_finished_lines_and_marks_the_rest_batch_expired() {
    let s = start(SimOptions::default()).await;
    s.handle.add_fault(Fault::next_job(JobOutcome::Expired));
    let lines: Vec<String> = (0..10)
        .map(|i| openai_line(&format!("r{i}"), "m", &format!("q{i}")))
        .collect();
    let b = openai_batch(&s, &lines).await;
    let (done, _) = s
        .poll(
            &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
            openai_terminal,
        )
        .await;
    assert_eq!(done["status"], "expired");
    assert!(done["expired_at"].is_u64());
    assert_eq!(done["request_counts"]["completed"], 5);
    let out = s.content(done["output_file_id"].as_str().unwrap()).await;
    let errs = s.content(done["error_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 5);
    assert_eq!(errs.len(), 5);
    let done_ids: HashSet<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        done_ids,
        (0..5)
            .map(|i| format!("r{i}"))
            .collect::<HashSet<_>>()
            .iter()
            .map(String::as_str)
            .collect()
    );
    for e in &errs {
        assert!(e["response"].is_null());
        assert_eq!(e["error"]["code"], "batch_expired");
    }
}

#[tokio::test]
async fn timed_out_mistral_job_puts_finished_lines_in_output_and_the_rest_in_the_error_file() {
    let s = start(SimOptions::default()).await;
    s.handle.add_fault(Fault::next_job(JobOutcome::Expired));
    let lines: Vec<String> = (0..4)
        .map(|i| mistral_line(&format!("c{i}"), "x"))
        .collect();
    let j = mistral_job(&s, &lines, "m").await;
    let (done, _) = s
        .poll(
            &format!("/v1/batch/jobs/{}", j["id"].as_str().unwrap()),
            mistral_terminal,
        )
        .await;
    assert_eq!(done["status"], "TIMEOUT_EXCEEDED");
    assert_eq!(done["succeeded_requests"], 2);
    let out = s.content(done["output_file"].as_str().unwrap()).await;
    let errs = by_custom_id(s.content(done["error_file"].as_str().unwrap()).await);
    assert_eq!(out.len(), 2);
    assert_eq!(errs.len(), 2);
    assert!(errs.contains_key("c2") && errs.contains_key("c3"));
}

#[tokio::test]
async fn stuck_job_stays_in_progress_until_faults_are_cleared() {
    let s = start(SimOptions::default()).await;
    s.handle.add_fault(Fault::next_job(JobOutcome::Stuck));
    let b = openai_batch(
        &s,
        &[openai_line("a", "m", "x"), openai_line("b", "m", "y")],
    )
    .await;
    let path = format!("/v1/batches/{}", b["id"].as_str().unwrap());
    s.poll(&path, |j| j["status"] == "in_progress").await;
    s.handle.finish_jobs();
    let (_, still) = s.get(&path).await;
    assert_eq!(
        still["status"], "in_progress",
        "finishing does not free a stuck job"
    );
    s.handle.clear_faults();
    let (done, _) = s.poll(&path, openai_terminal).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["request_counts"]["completed"], 2);
}

#[tokio::test]
async fn chosen_custom_ids_fail_with_their_status_in_each_dialects_error_format() {
    let s = start(SimOptions::default()).await;
    s.handle
        .add_fault(Fault::fail_custom_ids(["r1", "c1"], 503));
    let b = openai_batch(
        &s,
        &[openai_line("r0", "m", "x"), openai_line("r1", "m", "y")],
    )
    .await;
    let (done, _) = s
        .poll(
            &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
            openai_terminal,
        )
        .await;
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["request_counts"],
        json!({"total": 2, "completed": 1, "failed": 1})
    );
    let errs = s.content(done["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["custom_id"], "r1");
    assert_eq!(errs[0]["response"]["status_code"], 503);
    assert!(errs[0]["response"]["body"]["error"]["message"].is_string());
    assert!(errs[0]["error"].is_null());

    let j = mistral_job(&s, &[mistral_line("c0", "x"), mistral_line("c1", "y")], "m").await;
    let (done, _) = s
        .poll(
            &format!("/v1/batch/jobs/{}", j["id"].as_str().unwrap()),
            mistral_terminal,
        )
        .await;
    assert_eq!(done["failed_requests"], 1);
    let errs = s.content(done["error_file"].as_str().unwrap()).await;
    assert_eq!(errs[0]["custom_id"], "c1");
    assert_eq!(errs[0]["response"]["status_code"], 503);
    assert!(
        errs[0]["error"].is_string(),
        "Mistral writes the error as a bare string"
    );
}

#[tokio::test]
async fn fraction_of_lines_fails_and_all_failed_batch_completes_without_output_file() {
    let s = start(SimOptions::default()).await;
    s.handle.add_fault(Fault::fail_fraction(0.5, 500));
    let lines: Vec<String> = (0..40)
        .map(|i| openai_line(&format!("r{i}"), "m", "x"))
        .collect();
    let b = openai_batch(&s, &lines).await;
    let (done, _) = s
        .poll(
            &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
            openai_terminal,
        )
        .await;
    let failed = done["request_counts"]["failed"].as_u64().unwrap();
    assert!((8..=32).contains(&failed), "{failed} of 40 failed");
    assert_eq!(
        done["request_counts"]["completed"].as_u64().unwrap() + failed,
        40
    );

    s.handle.set_faults(vec![Fault::fail_fraction(1.0, 500)]);
    let b = openai_batch(&s, &lines[..3]).await;
    let (done, _) = s
        .poll(
            &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
            openai_terminal,
        )
        .await;
    assert_eq!(done["status"], "completed");
    assert!(done["output_file_id"].is_null());
    assert_eq!(done["request_counts"]["failed"], 3);
    assert_eq!(
        s.content(done["error_file_id"].as_str().unwrap())
            .await
            .len(),
        3
    );
}

// --------------------------------------------------------------- validation

async fn openai_errors(s: &Sim, data: &str) -> Vec<String> {
    let file = s.upload(data).await;
    let (status, b) = s
        .post("/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    let (done, _) = s
        .poll(
            &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
            openai_terminal,
        )
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    done["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn openai_batch_validation_rejects_each_bad_input_with_its_code() {
    let s = start(SimOptions {
        max_requests_per_job: 3,
        ..SimOptions::default()
    })
    .await;
    let ok = openai_line("a", "m", "x");
    assert_eq!(
        openai_errors(&s, &format!("{ok}\nnot json\n")).await,
        ["invalid_json_line"]
    );
    assert_eq!(
        openai_errors(&s, &jsonl(&[ok.clone(), ok.clone()])).await,
        ["duplicate_custom_id"]
    );
    assert_eq!(
        openai_errors(&s, &jsonl(&[ok.clone(), openai_line("b", "other", "x")])).await,
        ["mismatched_model"]
    );
    let wrong_url = json!({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": chat_body("m", "x")}).to_string();
    assert_eq!(
        openai_errors(&s, &jsonl(&[ok.clone(), wrong_url])).await,
        ["invalid_url"]
    );
    let mut streaming = chat_body("m", "x");
    streaming["stream"] = json!(true);
    let stream_line = json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": streaming}).to_string();
    assert_eq!(
        openai_errors(&s, &jsonl(&[stream_line])).await,
        ["streaming_unsupported"]
    );
    let many: Vec<String> = (0..4)
        .map(|i| openai_line(&format!("r{i}"), "m", "x"))
        .collect();
    assert_eq!(openai_errors(&s, &jsonl(&many)).await, ["too_many_tasks"]);
    assert_eq!(openai_errors(&s, "\n").await, ["empty_file"]);
    let (_, failed) = s.get("/v1/batches?limit=1").await;
    assert_eq!(failed["data"][0]["errors"]["data"][0]["line"], json!(null));
}

#[tokio::test]
async fn openai_create_refuses_bad_requests_outright() {
    let s = start(SimOptions::default()).await;
    let file = s.upload(&jsonl(&[openai_line("a", "m", "x")])).await;
    let (status, _) = s.post("/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "5d"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s.post("/v1/batches", &json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s.post("/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/images/generations", "completion_window": "24h"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let long_key = "k".repeat(65);
    let (status, _) = s
        .post("/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {long_key: "v"}}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn mistral_validation_fails_the_job_or_refuses_the_create() {
    let s = start(SimOptions {
        max_inline_requests: 2,
        ..SimOptions::default()
    })
    .await;
    let dup = jsonl(&[mistral_line("a", "x"), mistral_line("a", "y")]);
    let j = mistral_job(&s, &[dup], "m").await;
    let (done, _) = s
        .poll(
            &format!("/v1/batch/jobs/{}", j["id"].as_str().unwrap()),
            mistral_terminal,
        )
        .await;
    assert_eq!(done["status"], "FAILED");
    assert!(done["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("custom_id"));
    let bad = "{\"custom_id\": \"a\", \"body\": \n".to_owned();
    let j = mistral_job(&s, &[bad], "m").await;
    let (done, _) = s
        .poll(
            &format!("/v1/batch/jobs/{}", j["id"].as_str().unwrap()),
            mistral_terminal,
        )
        .await;
    assert_eq!(done["status"], "FAILED");

    let reqs: Vec<Value> = (0..3)
        .map(|i| json!({"custom_id": format!("{i}"), "body": {}}))
        .collect();
    let (status, _) = s
        .post(
            "/v1/batch/jobs",
            &json!({"requests": reqs, "endpoint": "/v1/chat/completions", "model": "m"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s
        .post(
            "/v1/batch/jobs",
            &json!({"endpoint": "/v1/chat/completions", "model": "m"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s
        .post(
            "/v1/batch/jobs",
            &json!({"input_files": ["nope"], "endpoint": "/v1/chat/completions"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s
        .post(
            "/v1/batch/jobs",
            &json!({"input_files": ["x"], "endpoint": "/v1/nothing"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn a_line_without_a_model_fails_alone_with_a_400_line() {
    let s = start(SimOptions::default()).await;
    let file = s.upload(&jsonl(&[mistral_line("a", "x")])).await;
    let (_, j) = s
        .post(
            "/v1/batch/jobs",
            &json!({"input_files": [file], "endpoint": "/v1/chat/completions"}),
        )
        .await;
    let (done, _) = s
        .poll(
            &format!("/v1/batch/jobs/{}", j["id"].as_str().unwrap()),
            mistral_terminal,
        )
        .await;
    assert_eq!(done["status"], "SUCCESS");
    assert_eq!(done["failed_requests"], 1);
    let errs = s.content(done["error_file"].as_str().unwrap()).await;
    assert_eq!(errs[0]["response"]["status_code"], 400);
}

#[tokio::test]
async fn upload_over_the_size_cap_is_refused_with_413() {
    let s = start(SimOptions {
        max_file_bytes: 100,
        ..SimOptions::default()
    })
    .await;
    let (status, body) = s.upload_raw(vec![b'x'; 101]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "file_too_large");
    let (status, _) = s.upload_raw(vec![b'x'; 100]).await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------- files and lists

#[tokio::test]
async fn files_can_be_retrieved_listed_downloaded_and_deleted() {
    let s = start(SimOptions::default()).await;
    let data = jsonl(&[openai_line("a", "m", "x"), openai_line("b", "m", "y")]);
    let id = s.upload(&data).await;
    let (_, meta) = s.get(&format!("/v1/files/{id}")).await;
    assert_eq!(meta["bytes"], data.len());
    assert_eq!(meta["purpose"], "batch");
    assert_eq!(meta["filename"], "in.jsonl");
    assert_eq!(meta["num_lines"], 2);
    assert_eq!(meta["deleted"], false);
    let text = s
        .http
        .get(s.url(&format!("/v1/files/{id}/content")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, data);
    let second = s.upload(&data).await;
    let (_, page) = s.get("/v1/files?limit=1").await;
    assert_eq!(page["data"][0]["id"], second.as_str(), "newest first");
    assert_eq!(page["has_more"], true);
    let (_, page2) = s.get(&format!("/v1/files?limit=1&after={second}")).await;
    assert_eq!(page2["data"][0]["id"], id.as_str());
    assert_eq!(page2["has_more"], false);
    let (_, mpage) = s.get("/v1/files?page=1&page_size=1").await;
    assert_eq!(mpage["total"], 2);
    assert_eq!(mpage["data"][0]["id"], id.as_str());
    let r = s
        .http
        .delete(s.url(&format!("/v1/files/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let deleted: Value = r.json().await.unwrap();
    assert_eq!(
        deleted,
        json!({"id": id, "object": "file", "deleted": true})
    );
    let (status, _) = s.get(&format!("/v1/files/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let recorded: Vec<Option<String>> =
        s.handle.calls().iter().map(|c| c.file_id.clone()).collect();
    assert_eq!(recorded[0].as_deref(), Some(id.as_str()));
}

#[tokio::test]
async fn openai_batches_list_pages_by_cursor() {
    let s = start(SimOptions::default()).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            openai_batch(&s, &[openai_line("a", "m", "x")]).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (_, first) = s.get("/v1/batches?limit=2").await;
    assert_eq!(first["data"].as_array().unwrap().len(), 2);
    assert_eq!(first["first_id"], ids[2].as_str());
    assert_eq!(first["has_more"], true);
    let last = first["last_id"].as_str().unwrap();
    let (_, second) = s.get(&format!("/v1/batches?limit=2&after={last}")).await;
    assert_eq!(second["data"][0]["id"], ids[0].as_str());
    assert_eq!(second["has_more"], false);
}

#[tokio::test]
async fn mistral_jobs_list_filters_by_status_and_metadata_and_pages() {
    let s = start(SimOptions::default()).await;
    let a = mistral_job(&s, &[mistral_line("a", "x")], "m").await;
    s.poll(
        &format!("/v1/batch/jobs/{}", a["id"].as_str().unwrap()),
        mistral_terminal,
    )
    .await;
    s.handle
        .update_options(|o| o.job_duration = Duration::from_secs(600));
    let file = s.upload(&jsonl(&[mistral_line("b", "x")])).await;
    let (_, b) = s
        .post("/v1/batch/jobs", &json!({"input_files": [file], "endpoint": "/v1/chat/completions", "model": "m2", "metadata": {"team": "blue"}}))
        .await;
    let (_, all) = s.get("/v1/batch/jobs").await;
    assert_eq!(all["total"], 2);
    assert_eq!(all["data"][0]["id"], b["id"], "newest first");
    let (_, queued) = s.get("/v1/batch/jobs?status=QUEUED&status=RUNNING").await;
    assert_eq!(queued["total"], 1);
    assert_eq!(queued["data"][0]["id"], b["id"]);
    let (_, blue) = s.get("/v1/batch/jobs?team=blue").await;
    assert_eq!(blue["total"], 1);
    let (_, by_model) = s.get("/v1/batch/jobs?model=m").await;
    assert_eq!(by_model["data"][0]["id"], a["id"]);
    let (_, page) = s.get("/v1/batch/jobs?page=1&page_size=1").await;
    assert_eq!(page["data"][0]["id"], a["id"]);
    assert_eq!(page["total"], 2);
}

// ------------------------------------------------------------------- cancel

#[tokio::test]
async fn cancel_moves_through_cancelling_to_cancelled_in_both_dialects() {
    let s = start(SimOptions {
        job_duration: Duration::from_secs(600),
        ..SimOptions::default()
    })
    .await;
    let b = openai_batch(&s, &[openai_line("a", "m", "x")]).await;
    let id = b["id"].as_str().unwrap();
    let (status, c) = s
        .post(&format!("/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c["status"], "cancelling");
    assert!(c["cancelling_at"].is_u64());
    let (done, _) = s.poll(&format!("/v1/batches/{id}"), openai_terminal).await;
    assert_eq!(done["status"], "cancelled");
    assert!(done["cancelled_at"].is_u64());
    let (status, _) = s
        .post(&format!("/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let j = mistral_job(&s, &[mistral_line("a", "x")], "m").await;
    let id = j["id"].as_str().unwrap();
    let (_, c) = s
        .post(&format!("/v1/batch/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(c["status"], "CANCELLATION_REQUESTED");
    let (done, _) = s
        .poll(&format!("/v1/batch/jobs/{id}"), mistral_terminal)
        .await;
    assert_eq!(done["status"], "CANCELLED");
    assert_eq!(
        s.handle
            .jobs()
            .iter()
            .filter(|j| j.status.eq_ignore_ascii_case("cancelled"))
            .count(),
        2
    );
}

#[tokio::test]
async fn finish_jobs_makes_a_long_job_complete_without_waiting() {
    let s = start(SimOptions {
        job_duration: Duration::from_secs(3600),
        ..SimOptions::default()
    })
    .await;
    let b = openai_batch(&s, &[openai_line("a", "m", "x")]).await;
    s.handle.finish_jobs();
    let (_, done) = s
        .get(&format!("/v1/batches/{}", b["id"].as_str().unwrap()))
        .await;
    assert_eq!(done["status"], "completed");
}

// -------------------------------------------------------------- control API

#[tokio::test]
async fn control_api_drives_faults_records_gate_and_options_over_http() {
    let s = start(SimOptions::default()).await;
    let ctl = |p: &str| s.url(&format!("/_sim{p}"));
    let r = s.http.get(ctl("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "control routes need no auth");
    s.http
        .post(ctl("/faults"))
        .json(&json!({"kind": "http_error", "route": "GET /v1/models", "status": 503, "count": 1}))
        .send()
        .await
        .unwrap();
    let (status, _) = s.get("/v1/models").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    s.http
        .put(ctl("/faults"))
        .json(&json!([{"kind": "next_job", "outcome": "stuck"}]))
        .send()
        .await
        .unwrap();
    let faults: Value = s
        .http
        .get(ctl("/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults[0]["outcome"], "stuck");
    let b = openai_batch(&s, &[openai_line("a", "m", "x")]).await;
    s.http.delete(ctl("/faults")).send().await.unwrap();
    s.poll(
        &format!("/v1/batches/{}", b["id"].as_str().unwrap()),
        openai_terminal,
    )
    .await;
    let jobs: Vec<sim::JobRecord> = s
        .http
        .get(ctl("/jobs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs[0].custom_ids, vec!["a"]);
    assert_eq!(jobs[0].status, "completed");
    let calls: Vec<sim::CallRecord> = s
        .http
        .get(ctl("/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(calls.iter().all(|c| !c.route.starts_with("/_sim")));
    assert!(calls
        .iter()
        .any(|c| c.route == "/v1/batches" && c.job_id.as_deref() == b["id"].as_str()));
    let opts: Value = s
        .http
        .patch(ctl("/options"))
        .json(&json!({"stream_chunks": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(opts["stream_chunks"], 2);
    s.http.post(ctl("/streams/hold")).send().await.unwrap();
    let mut body = chat_body("m", "x");
    body["stream"] = json!(true);
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    s.http.post(ctl("/streams/release")).send().await.unwrap();
    let mut n = 1;
    while let Some(c) = stream.next().await {
        c.unwrap();
        n += 1;
    }
    assert!(n >= 2);
    s.http.delete(ctl("/calls")).send().await.unwrap();
    assert!(s.handle.calls().is_empty());
    s.handle.shutdown().await;
}

#[tokio::test]
async fn chunk_delay_spaces_out_streamed_events() {
    let s = start(SimOptions {
        chunk_delay: Duration::from_millis(30),
        stream_chunks: 4,
        ..SimOptions::default()
    })
    .await;
    let mut body = chat_body("m", "slow");
    body["stream"] = json!(true);
    let t = Instant::now();
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = sse_events(r).await;
    assert_eq!(events.len(), 6);
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "5 delayed frames after the first"
    );
}

// ------------------------------------------------------------ the binary

#[tokio::test]
async fn sim_binary_prints_its_url_takes_faults_from_env_and_exits_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_carpool"))
        .args(["sim", "--listen", "127.0.0.1:0"])
        .env(
            "CARPOOL_SIM_FAULTS",
            r#"[{"kind":"http_error","route":"GET /v1/models","status":503}]"#,
        )
        .env("CARPOOL_SIM_OPTIONS", r#"{"stream_chunks": 6}"#)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let base = first
        .strip_prefix("carpool sim listening on ")
        .unwrap()
        .to_owned();
    let http = Client::new();
    let r = http
        .get(format!("{base}/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = http
        .get(format!("{base}/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let opts: Value = http
        .get(format!("{base}/_sim/options"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(opts["stream_chunks"], 6);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
