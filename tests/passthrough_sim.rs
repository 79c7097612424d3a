//! Pass-through against the simulated provider started in-process: what the
//! provider answers is what the caller gets, streams included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use carpool::sim::{self, Fault, SimHandle, SimOptions};
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{client, TestApp};

async fn setup() -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = format!(
        r#"
[[upstreams]]
name = "sim"
dialect = "openai"
base_url = "{}"
auth = "passthrough"
"#,
        sim.base_url()
    );
    (TestApp::start(&config, &[]).await, sim)
}

fn chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

#[tokio::test]
async fn plain_chat_through_carpool_equals_the_providers_own_answer() {
    let (app, sim) = setup().await;
    let body = chat("pass me through");
    let via = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-caller")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(via.status(), 200);
    assert!(via.headers().get("carpool-request-id").is_none());
    let via: Value = via.json().await.unwrap();
    assert_eq!(via, sim::expected_response("/v1/chat/completions", &body));
    let call = sim
        .calls()
        .into_iter()
        .find(|c| c.route == "/v1/chat/completions")
        .unwrap();
    assert_eq!(
        call.credential.as_deref(),
        Some("sk-caller"),
        "the caller's key went upstream"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_streamed_completion_reaches_the_caller_before_the_provider_has_finished() {
    let (app, sim) = setup().await;
    sim.hold_streams();
    let mut body = chat("stream me");
    body["stream"] = json!(true);
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-caller")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    // The provider holds everything after its first event until released.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the first event never arrived while the provider held the rest")
        .unwrap()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    assert!(!first.contains("[DONE]"));
    sim.release_streams();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let all = first + &String::from_utf8(rest).unwrap();
    assert!(all.ends_with("data: [DONE]\n\n"));
    let content: String = all
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    body.as_object_mut().unwrap().remove("stream");
    let expected = sim::expected_response("/v1/chat/completions", &body);
    assert_eq!(
        content,
        expected["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_provider_error_comes_back_verbatim_and_is_not_retried() {
    let (app, sim) = setup().await;
    sim.add_fault(Fault::rate_limited("POST /v1/chat/completions", 1, 7));
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("sk-caller")
        .json(&chat("too fast"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    let calls = sim
        .calls()
        .into_iter()
        .filter(|c| c.route == "/v1/chat/completions")
        .count();
    assert_eq!(calls, 1, "carpool retried a pass-through call");
    app.stop().await.unwrap();
}
