//! OpenAI's Responses API (`POST /v1/responses`) deferred end to end,
//! through the HTTP surface, against the simulated provider: every opt-in
//! and answer mode chat completions has, the body sent to the batch line as
//! the caller wrote it, `background: true` refused at intake, results kept
//! verbatim (every `output[]` item), tokens read from Responses usage, and
//! `stream: true` in wait mode re-emitted as the Responses event stream.
//! The official SDK's view is in `tests/sdk_responses.py`, driven from here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use bytes::Bytes;
use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, metrics, request_object, settled, submissions, TestApp, PATIENCE};

const RESPONSES: &str = "/v1/responses";
const KEY: &str = "sk-alice";
const MODEL: &str = "gpt-4o-mini";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// carpool (openai dialect unless `dialect` says otherwise) in front of a
/// fresh simulator; `batching` is extra `[batching]` keys, `tail` more TOML.
async fn setup_dialect(dialect: &str, batching: &str, tail: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new(dialect, &sim)
        .server("max_body = \"64KB\"")
        .client("alice", KEY)
        .batching("max_wait = \"100ms\"")
        .batching(batching)
        .extra(tail);
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

async fn setup(batching: &str, tail: &str) -> (TestApp, SimHandle) {
    setup_dialect("openai", batching, tail).await
}

/// A plain Responses body.
fn ask(text: &str) -> Value {
    json!({"model": MODEL, "input": text, "max_output_tokens": 64})
}

/// A Responses body whose answer holds a reasoning item, a function call
/// and a message (the simulator answers `reasoning` and function tools so).
fn ask_with_tool(text: &str) -> Value {
    json!({
        "model": MODEL,
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}],
        "reasoning": {"effort": "low"},
        "tools": [{
            "type": "function",
            "name": "lookup_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }],
    })
}

async fn post(app: &TestApp, headers: &[(&str, &str)], body: &Value) -> reqwest::Response {
    post_raw(app, headers, body.to_string()).await
}

async fn post_raw(app: &TestApp, headers: &[(&str, &str)], body: String) -> reqwest::Response {
    let mut req = client()
        .post(app.url(RESPONSES))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// What the simulator answers the same body synchronously, asked directly.
async fn synchronous(sim: &SimHandle, body: &Value) -> Value {
    let resp = client()
        .post(format!("{}{RESPONSES}", sim.base_url()))
        .bearer_auth("sk-direct")
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn output_types(answer: &Value) -> Vec<String> {
    answer["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["type"].as_str().unwrap().to_owned())
        .collect()
}

/// The message text of a response: every `output_text` part, in order.
fn output_text(answer: &Value) -> String {
    let mut text = String::new();
    for item in answer["output"].as_array().unwrap() {
        if item["type"] == "message" {
            for part in item["content"].as_array().unwrap() {
                if part["type"] == "output_text" {
                    text.push_str(part["text"].as_str().unwrap());
                }
            }
        }
    }
    text
}

#[tokio::test]
async fn a_deferred_responses_call_is_answered_by_batch_with_the_synchronous_body() {
    let (app, sim) = setup("delete_files = false", "").await;
    let body = ask_with_tool("What is the weather in Lyon?");
    let resp = post(&app, &[("carpool-mode", "wait")], &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["carpool-served-by"], "batch");
    assert!(resp.headers().contains_key("carpool-batch-id"));
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer, synchronous(&sim, &body).await);
    assert_eq!(answer, sim::expected_response(RESPONSES, &body));
    // Every output item survived the batch: reasoning, function call, message.
    assert_eq!(
        output_types(&answer),
        ["reasoning", "function_call", "message"]
    );
    assert_eq!(answer["output"][1]["name"], "lookup_weather");
    assert!(output_text(&answer).contains("Lyon"));

    let jobs = sim.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].endpoint, RESPONSES);
    assert_eq!(jobs[0].custom_ids.len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_batch_line_carries_the_callers_body_byte_for_byte_except_stream() {
    let (app, sim) = setup("delete_files = false", "").await;
    // Odd spacing inside values, unusual key order: kept as sent.
    let inner = r#""input":[{"content": "spaced   out", "role":"user"}],"model":"gpt-4o-mini","metadata":{"k" : "v"},"store":false"#;
    let sent = format!(r#"{{"stream":false,{inner}}}"#);
    let resp = post_raw(&app, &[("carpool-mode", "async")], sent).await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(settled(&app, KEY, &id).await["status"], "succeeded");
    let job = &sim.jobs()[0];
    let file = &job.input_file_ids[0];
    let content = client()
        .get(format!("{}/v1/files/{file}/content", sim.base_url()))
        .bearer_auth("sk-upstream")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = content.lines().next().unwrap();
    let line_json: Value = serde_json::from_str(line).unwrap();
    assert_eq!(line_json["url"], RESPONSES);
    assert_eq!(line_json["method"], "POST");
    assert_eq!(line_json["custom_id"], id.as_str());
    let at = line.find(r#","body":"#).unwrap() + r#","body":"#.len();
    assert_eq!(&line[at..line.len() - 1], format!("{{{inner}}}"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn async_responses_call_gets_a_handle_and_its_result_verbatim() {
    let (app, sim) = setup("", "").await;
    let body = ask("an async question");
    let resp = post(&app, &[("carpool-mode", "async")], &body).await;
    assert_eq!(resp.status(), 202);
    let object: Value = resp.json().await.unwrap();
    let id = object["id"].as_str().unwrap().to_owned();
    assert_eq!(object["endpoint"], RESPONSES);
    assert_eq!(object["model"], MODEL);
    let done = settled(&app, KEY, &id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["served_by"], "batch");
    let expected = synchronous(&sim, &body).await;
    assert_eq!(done["response"]["body"], expected);
    let result = client()
        .get(app.url(&format!("/v1/carpool/requests/{id}/result")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    assert_eq!(result.json::<Value>().await.unwrap(), expected);
    // Prefer: respond-async is the same opt-in.
    let resp = post(&app, &[("prefer", "respond-async")], &ask("preferred")).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.headers()["preference-applied"], "respond-async");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_defer_prefix_and_a_rule_defer_responses_calls() {
    let (app, sim) = setup("", "[[rules]]\npath = \"/v1/responses\"\nmode = \"wait\"\n").await;
    let body = ask("by rule");
    let resp = post(&app, &[], &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["carpool-served-by"], "batch");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        synchronous(&sim, &body).await
    );
    let body = ask("by prefix");
    let resp = client()
        .post(app.url("/defer/v1/responses"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["carpool-served-by"], "batch");
    // Carpool-Mode: now passes it through, whatever the rule says.
    let resp = post(&app, &[("carpool-mode", "now")], &ask("now")).await;
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("carpool-request-id"));
    assert_eq!(sim.jobs().len(), 2);
    app.stop().await.unwrap();
}

/// A webhook receiver that records every body it gets.
async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<Bytes>>>) {
    async fn record(State(hits): State<Arc<Mutex<Vec<Bytes>>>>, body: Bytes) -> StatusCode {
        hits.lock().unwrap().push(body);
        StatusCode::NO_CONTENT
    }
    let hits = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .fallback(record)
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

#[tokio::test]
async fn a_callback_gets_a_signed_webhook_with_the_responses_result() {
    let (addr, hits) = receiver().await;
    let (app, sim) = setup(
        "",
        &format!(
            "[webhooks]\nsecrets = [\"{SECRET}\"]\nschedule = [\"50ms\"]\nallow_hosts = [\"127.0.0.1\"]\n"
        ),
    )
    .await;
    let body = ask_with_tool("call me back about Oslo");
    let resp = post(
        &app,
        &[("carpool-callback", &format!("http://{addr}/hook"))],
        &body,
    )
    .await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        support::eventually(PATIENCE, || !hits.lock().unwrap().is_empty()).await,
        "no webhook arrived"
    );
    let hit: Value = serde_json::from_slice(&hits.lock().unwrap()[0]).unwrap();
    assert_eq!(hit["type"], "carpool.request.succeeded");
    assert_eq!(hit["data"]["id"], id.as_str());
    assert_eq!(hit["data"]["endpoint"], RESPONSES);
    assert_eq!(
        hit["data"]["response"]["body"],
        synchronous(&sim, &body).await
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn idempotency_keys_and_sdk_retries_reattach_to_one_responses_request() {
    let (app, sim) = setup("", "").await;
    let body = ask("only once please");
    let headers = [("carpool-mode", "async"), ("idempotency-key", "resp-1")];
    let first: Value = post(&app, &headers, &body).await.json().await.unwrap();
    let again: Value = post(&app, &headers, &body).await.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let other = post(&app, &headers, &ask("a different body")).await;
    assert_eq!(other.status(), 422);

    // An SDK retry (same body, x-stainless-retry-count) re-attaches, in
    // wait mode too, and gets the same answer.
    let retried = ask("retried by the SDK");
    let one: Value = post(&app, &[("carpool-mode", "async")], &retried)
        .await
        .json()
        .await
        .unwrap();
    let two = post(
        &app,
        &[("carpool-mode", "wait"), ("x-stainless-retry-count", "1")],
        &retried,
    )
    .await;
    assert_eq!(two.status(), 200);
    assert_eq!(
        two.headers()["carpool-request-id"],
        one["id"].as_str().unwrap()
    );
    assert_eq!(
        two.json::<Value>().await.unwrap(),
        synchronous(&sim, &retried).await
    );
    for id in [&first["id"], &one["id"]] {
        assert_eq!(
            settled(&app, KEY, id.as_str().unwrap()).await["status"],
            "succeeded"
        );
    }
    // Two requests, each in exactly one batch.
    let counts = submissions(&sim);
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.iter().all(|(_, n)| *n == 1));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_queued_responses_call_can_be_cancelled_and_is_never_submitted() {
    let (app, sim) = setup("max_wait = \"1m\"", "").await;
    let resp = post(&app, &[("carpool-mode", "async")], &ask("never mind")).await;
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = app.url(&format!("/v1/carpool/requests/{id}"));
    let cancelled = client().delete(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(cancelled.status(), 200);
    assert_eq!(request_object(&app, KEY, &id).await["status"], "cancelled");
    let again = client().delete(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(again.status(), 409);
    assert!(submissions(&sim).is_empty());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn background_true_is_refused_at_intake_and_nothing_is_stored() {
    let (app, sim) = setup("max_wait = \"50ms\"", "").await;
    let mut body = ask("in the background");
    body["background"] = json!(true);
    for mode in ["wait", "async"] {
        let resp = post(&app, &[("carpool-mode", mode)], &body).await;
        assert_eq!(resp.status(), 400, "{mode}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["param"], "background", "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("background"));
    }
    let listed = client()
        .get(app.url("/v1/carpool/requests"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(listed["data"], json!([]), "{listed}");
    // `background: false` is an ordinary call.
    body["background"] = json!(false);
    let resp = post(&app, &[("carpool-mode", "wait")], &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.jobs().len(), 1);
    assert_eq!(sim.jobs()[0].custom_ids.len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_mistral_dialect_refuses_to_defer_responses() {
    let (app, sim) = setup_dialect("mistral", "", "").await;
    let resp = post(&app, &[("carpool-mode", "wait")], &ask("no batch for this")).await;
    assert_eq!(resp.status(), 422);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], "not_batchable");
    assert!(sim.jobs().is_empty());
    app.stop().await.unwrap();
}

/// One SSE event as a client reads it: its `event:` name and its data.
#[derive(Debug)]
struct Event {
    name: Option<String>,
    data: Value,
}

/// Parses an SSE body; returns the events and how many comments it held.
fn parse_sse(text: &str) -> (Vec<Event>, usize) {
    let mut events = Vec::new();
    let mut comments = 0;
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if line.starts_with(':') {
                comments += 1;
            } else if let Some(rest) = line.strip_prefix("event: ") {
                name = Some(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("data: ") {
                data.push_str(rest);
            } else {
                panic!("unexpected SSE line {line:?}");
            }
        }
        if !data.is_empty() {
            events.push(Event {
                name,
                data: serde_json::from_str(&data).unwrap(),
            });
        }
    }
    (events, comments)
}

#[tokio::test]
async fn stream_true_in_wait_mode_is_answered_as_the_responses_event_stream() {
    let (app, sim) = setup("", "").await;
    let mut body = ask_with_tool("stream me the weather in Rome");
    body["stream"] = json!(true);
    let resp = post(&app, &[("carpool-mode", "wait")], &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(PATIENCE, resp.text())
        .await
        .unwrap()
        .unwrap();
    let (events, comments) = parse_sse(&text);
    assert!(comments >= 1, "no keep-alive while waiting: {text}");
    assert!(!text.contains("[DONE]"));

    let mut plain = body.clone();
    plain.as_object_mut().unwrap().remove("stream");
    let expected = synchronous(&sim, &plain).await;

    for (n, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], json!(n), "{event:?}");
        assert_eq!(event.name.as_deref(), event.data["type"].as_str());
    }
    let types: Vec<&str> = events
        .iter()
        .map(|e| e.data["type"].as_str().unwrap())
        .collect();
    assert_eq!(types[0], "response.created");
    assert_eq!(types[1], "response.in_progress");
    assert_eq!(*types.last().unwrap(), "response.completed");
    assert_eq!(events[0].data["response"]["status"], "in_progress");
    assert_eq!(events[0].data["response"]["output"], json!([]));
    assert_eq!(events[0].data["response"]["id"], expected["id"]);
    assert_eq!(events.last().unwrap().data["response"], expected);

    // Each output item is announced and finished, in order, with the item.
    let added: Vec<&Value> = events
        .iter()
        .filter(|e| e.data["type"] == "response.output_item.added")
        .map(|e| &e.data)
        .collect();
    let done: Vec<&Value> = events
        .iter()
        .filter(|e| e.data["type"] == "response.output_item.done")
        .map(|e| &e.data)
        .collect();
    assert_eq!(added.len(), 3);
    assert_eq!(done.len(), 3);
    for (i, item) in expected["output"].as_array().unwrap().iter().enumerate() {
        assert_eq!(added[i]["output_index"], json!(i));
        assert_eq!(added[i]["item"]["type"], item["type"]);
        assert_eq!(added[i]["item"]["id"], item["id"]);
        assert_eq!(done[i]["item"], *item);
    }
    // The function call's arguments and the message's text, by deltas.
    let args: String = events
        .iter()
        .filter(|e| e.data["type"] == "response.function_call_arguments.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(args, expected["output"][1]["arguments"].as_str().unwrap());
    let deltas: Vec<&Value> = events
        .iter()
        .filter(|e| e.data["type"] == "response.output_text.delta")
        .map(|e| &e.data)
        .collect();
    assert!(deltas.len() >= 2, "the text should come in pieces");
    let text: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, output_text(&expected));
    assert!(deltas
        .iter()
        .all(|d| d["item_id"] == expected["output"][2]["id"] && d["output_index"] == 2));
    for kind in [
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
    ] {
        assert!(types.contains(&kind), "no {kind} in {types:?}");
    }
    let text_done = events
        .iter()
        .find(|e| e.data["type"] == "response.output_text.done")
        .unwrap();
    assert_eq!(text_done.data["text"], json!(output_text(&expected)));
    // The batch line never carried `stream`.
    assert_eq!(sim.jobs()[0].endpoint, RESPONSES);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_tokens_metric_counts_responses_usage() {
    // Named in the config, so /metrics shows it by name.
    let (app, sim) = setup("", &format!("[[batching.models]]\nmodel = \"{MODEL}\"\n")).await;
    let body = ask("count my tokens, if you would");
    let resp = post(&app, &[("carpool-mode", "wait")], &body).await;
    assert_eq!(resp.status(), 200);
    let expected = synchronous(&sim, &body).await;
    let input = expected["usage"]["input_tokens"].as_u64().unwrap();
    let output = expected["usage"]["output_tokens"].as_u64().unwrap();
    assert!(input > 0 && output > 0);
    let text = metrics(&app).await;
    let sample = |kind: &str| -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with("carpool_tokens_total{"))
            .find(|l| {
                l.contains(&format!("kind=\"{kind}\""))
                    && l.contains(&format!("model=\"{MODEL}\""))
                    && l.contains("served_by=\"batch\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(sample("input"), Some(input as f64), "{text}");
    assert_eq!(sample("output"), Some(output as f64), "{text}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_deadline_fallback_answers_a_responses_call_realtime_with_the_same_body() {
    let (app, sim) = setup("fallback_margin = \"1s\"\nmax_wait = \"50ms\"", "").await;
    sim.add_fault(Fault::next_job(JobOutcome::Stuck));
    let body = ask("in a hurry");
    let resp = post(
        &app,
        &[("carpool-mode", "wait"), ("carpool-deadline", "3")],
        &body,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["carpool-served-by"], "realtime");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        synchronous(&sim, &body).await
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_simulator_validates_responses_batch_lines_like_openai() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let base = sim.base_url();
    let good = json!({"custom_id": "a", "method": "POST", "url": RESPONSES, "body": ask("fine")});
    let wrong_url = json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": ask("wrong url")});
    let mut bg = ask("background");
    bg["background"] = json!(true);
    let background = json!({"custom_id": "c", "method": "POST", "url": RESPONSES, "body": bg});
    for (lines, bad) in [
        (vec![good.clone()], None),
        (vec![good.clone(), wrong_url], Some(("url", 2))),
        (vec![good.clone(), background], Some(("body.background", 2))),
    ] {
        let jsonl: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(jsonl.into_bytes()).file_name("in.jsonl"),
            );
        let file: Value = client()
            .post(format!("{base}/v1/files"))
            .bearer_auth("sk-direct")
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let batch: Value = client()
            .post(format!("{base}/v1/batches"))
            .bearer_auth("sk-direct")
            .json(&json!({"input_file_id": file["id"], "endpoint": RESPONSES, "completion_window": "24h"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = batch["id"].as_str().unwrap().to_owned();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let done = loop {
            let b: Value = client()
                .get(format!("{base}/v1/batches/{id}"))
                .bearer_auth("sk-direct")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if ["completed", "failed"].contains(&b["status"].as_str().unwrap()) {
                break b;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match bad {
            None => {
                assert_eq!(done["status"], "completed", "{done}");
                let out = client()
                    .get(format!(
                        "{base}/v1/files/{}/content",
                        done["output_file_id"].as_str().unwrap()
                    ))
                    .bearer_auth("sk-direct")
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                let row: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
                assert_eq!(
                    row["response"]["body"],
                    sim::expected_response(RESPONSES, &ask("fine"))
                );
                assert_eq!(row["response"]["body"]["object"], "response");
                assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 0);
            }
            Some((param, line)) => {
                assert_eq!(done["status"], "failed", "{done}");
                assert_eq!(done["errors"]["data"][0]["param"], param, "{done}");
                assert_eq!(done["errors"]["data"][0]["line"], line, "{done}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_sdk_reads_deferred_responses_plain_and_streamed() {
    let (app, sim) = setup(
        // The SDK's declared 60 s read timeout is its deadline: under the
        // default margin its fallback comes at 30 s, so the batch answers.
        "max_wait = \"200ms\"",
        "",
    )
    .await;
    let (ok, text) = support::python::run(
        "sdk_responses.py",
        vec![app.url(""), sim.base_url()],
        vec![("CARPOOL_SDK_KEY".to_owned(), KEY.to_owned())],
    )
    .await;
    assert!(ok, "SDK check failed:\n{text}");
    assert!(text.contains(" 0 failed"), "{text}");
    assert!(
        sim.jobs().iter().all(|j| j.endpoint == RESPONSES) && !sim.jobs().is_empty(),
        "the deferred SDK calls became Responses batch jobs"
    );
    app.stop().await.unwrap();
}
