//! The transparent pass-through: calls reach the routed upstream and its
//! answers come back unchanged, streams included.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::binary::Binary;
use support::upstream::Upstream;
use support::{client, dead_address, eventually, metrics, one_upstream, TestApp};

const KEY: (&str, &str) = ("UPSTREAM_KEY", "sk-upstream-secret");

async fn app_for(upstream: &Upstream, extra: &str) -> TestApp {
    TestApp::start(&one_upstream(&upstream.base_url(), extra), &[KEY]).await
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn plain_chat_completion_passes_through_unchanged() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    let direct = client()
        .post(format!("{}/v1/chat/completions", up.base_url()))
        .json(&chat("mistral-small"))
        .send()
        .await
        .unwrap();
    let direct_body = direct.bytes().await.unwrap();
    // OpenAI SDKs (base `http://host/v1`) and Mistral's (`http://host`)
    // both call /v1/chat/completions.
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .json(&chat("mistral-small"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "primary");
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.bytes().await.unwrap(), direct_body);
}

#[tokio::test]
async fn streamed_first_event_reaches_client_before_upstream_finishes() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    up.hold_streams();
    let mut body = chat("mistral-small");
    body["stream"] = json!(true);
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    // The upstream is held after its first event: it must arrive anyway.
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("first event was buffered")
        .unwrap()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(
        first.starts_with("data: ") && first.contains("Hel"),
        "{first}"
    );
    assert!(!first.contains("[DONE]"));
    up.release_streams();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(
        rest.contains("\"lo\"") && rest.ends_with("data: [DONE]\n\n"),
        "{rest}"
    );
}

#[tokio::test]
async fn upstream_error_status_headers_and_body_come_back_verbatim() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    for code in [400u16, 404, 429, 500, 503] {
        let path = format!("/status/{code}?x=1");
        let direct = client()
            .post(format!("{}{path}", up.base_url()))
            .send()
            .await
            .unwrap();
        let direct_body = direct.bytes().await.unwrap();
        let resp = client().post(app.url(&path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), code);
        assert_eq!(resp.headers()["retry-after"], "3");
        assert_eq!(resp.headers()["x-upstream"], "primary");
        assert_eq!(resp.bytes().await.unwrap(), direct_body);
    }
    let text = metrics(&app).await;
    assert!(
        text.contains(r#"carpool_upstream_errors_total{operation="passthrough",status="503",upstream="primary"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn routes_by_first_matching_model_glob_else_first_upstream() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let config = format!(
        r#"
[[upstreams]]
name = "a"
dialect = "openai"
base_url = "{}"
models = ["gpt-*"]
[[upstreams]]
name = "b"
dialect = "mistral"
base_url = "{}"
models = ["mistral-*", "codestral-*"]
"#,
        a.base_url(),
        b.base_url()
    );
    let app = TestApp::start(&config, &[]).await;
    for (model, expect) in [
        ("gpt-4o-mini", "a"),
        ("mistral-small-latest", "b"),
        ("codestral-2501", "b"),
        ("unknown-model", "a"),
    ] {
        let resp = client()
            .post(app.url("/v1/chat/completions"))
            .json(&chat(model))
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["upstream"], expect, "model {model}");
    }
    // No JSON body: the first upstream.
    let resp = client().get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.headers()["x-upstream"], "a");
}

fn clients_toml(key: &str) -> String {
    format!(
        "[[clients]]\nname = \"app\"\nkey_sha256 = \"{}\"\n",
        hex::encode(Sha256::digest(key.as_bytes()))
    )
}

#[tokio::test]
async fn managed_auth_sends_carpools_key_and_refuses_unknown_clients_without_touching_upstream() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, &clients_toml("client-key")).await;
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("wrong-key")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "authentication_error");
    assert!(err["error"]["message"].is_string() && err["error"].get("param").is_some());
    let resp = client().get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "a missing key is refused too");
    // The janitor's start-up listing of provider files (GET /v1/files) is
    // carpool's own call, not the refused callers'.
    let touched: Vec<_> = up
        .calls()
        .into_iter()
        .filter(|c| !c.path_and_query.starts_with("/v1/files"))
        .collect();
    assert!(touched.is_empty(), "upstream was touched: {touched:?}");

    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("client-key")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Only the caller's call: the janitor's start-up listing of provider
    // files (GET /v1/files) is carpool's own.
    let calls: Vec<_> = up
        .calls()
        .into_iter()
        .filter(|c| !c.path_and_query.starts_with("/v1/files"))
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some("Bearer sk-upstream-secret")
    );
}

#[tokio::test]
async fn passthrough_auth_forwards_the_callers_key_unchanged() {
    let up = Upstream::start("primary").await;
    let config = one_upstream(&up.base_url(), "").replace("\"managed\"", "\"passthrough\"");
    let app = TestApp::start(&config, &[KEY]).await;
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("caller-own-key")
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.calls()[0].authorization.as_deref(),
        Some("Bearer caller-own-key")
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_without_reaching_upstream() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await; // max_body = 64KB
    let big = "x".repeat(70_000);
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": big}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "body_too_large");

    // A streamed upload with no Content-Length is cut off at the limit too.
    let chunks = (0..20).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 8_192]));
    let resp = client()
        .post(app.url("/v1/files"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert!(up.calls().iter().all(|c| c.body_len <= 64_000));
}

#[tokio::test]
async fn multipart_upload_streams_through_intact() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    let jsonl = "{\"custom_id\":\"a\",\"body\":{}}\n".repeat(1000);
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(jsonl.clone().into_bytes()).file_name("x.jsonl"),
        );
    let resp = client()
        .post(app.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["content_type"]
        .as_str()
        .unwrap()
        .starts_with("multipart/form-data; boundary="));
    assert!(body["body_len"].as_u64().unwrap() > jsonl.len() as u64);
}

#[tokio::test]
async fn unreachable_upstream_gets_502() {
    let dead = dead_address().await;
    let app = TestApp::start(&one_upstream(&format!("http://{dead}"), ""), &[KEY]).await;
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "upstream_unreachable");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(!msg.contains("sk-upstream-secret"), "{msg}");
    let ready = client().get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn upstream_that_does_not_answer_in_time_gets_504() {
    let up = Upstream::start("primary").await;
    let config = one_upstream(&up.base_url(), "").replace("\"5s\"", "\"300ms\"");
    let app = TestApp::start(&config, &[KEY]).await;
    let resp = client().post(app.url("/hang")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn hop_by_hop_and_carpool_headers_stay_behind() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    let resp = client()
        .get(app.url("/v1/models?page=2"))
        .header("connection", "x-secret-hop")
        .header("x-secret-hop", "1")
        .header("carpool-mode", "now")
        .header("x-stainless-retry-count", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let call = &up.calls()[0];
    assert_eq!(call.path_and_query, "/v1/models?page=2");
    assert!(!call.headers.contains_key("x-secret-hop"));
    assert!(!call.headers.contains_key("carpool-mode"));
    assert_eq!(call.headers["x-stainless-retry-count"], "1");
}

#[tokio::test]
async fn defer_prefix_is_stripped_before_forwarding() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    let resp = client()
        .get(app.url("/defer/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.calls()[0].path_and_query, "/v1/models");
}

#[tokio::test]
async fn ops_endpoints_report_health_readiness_and_metrics() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    let health = client().get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = client().get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let report: Value = ready.json().await.unwrap();
    assert_eq!(report["store"]["ready"], true);
    client()
        .post(app.url("/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    let text = metrics(&app).await;
    for family in [
        r#"carpool_requests_total{mode="passthrough",outcome="ok",route="/v1/chat/completions"} 1"#,
        "carpool_passthrough_duration_seconds_bucket",
        "carpool_proxy_overhead_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    assert!(!text.contains("sk-upstream-secret"));
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish() {
    let up = Upstream::start("primary").await;
    let app = app_for(&up, "").await;
    up.hold_streams();
    let mut body = chat("m");
    body["stream"] = json!(true);
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let addr = app.addr;
    let stopping = tokio::spawn(app.stop());
    // Stopped accepting: new connections are refused once the listener closes.
    let refused = eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_err()
    })
    .await;
    assert!(refused, "still accepting after shutdown");
    up.release_streams();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8(rest)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
    stopping.await.unwrap().unwrap();
}

/// The real binary: SIGTERM while a stream is in flight lets the stream
/// finish, then the process exits 0.
#[tokio::test]
async fn sigterm_drains_an_in_flight_stream_and_exits_zero() {
    let up = Upstream::start("primary").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("carpool.toml");
    let text = format!(
        "{}\n[store]\nurl = \"sqlite://{}/carpool.db\"\n",
        one_upstream(&up.base_url(), "")
            .replace("[server]\n", "[server]\nlisten = \"127.0.0.1:0\"\n"),
        dir.path().display()
    );
    std::fs::write(&path, text).unwrap();
    let mut carpool = Binary::start(&path, &[KEY]).await;

    up.hold_streams();
    let mut body = chat("m");
    body["stream"] = json!(true);
    let resp = client()
        .post(carpool.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();

    carpool.terminate();
    carpool.until_log("SIGTERM received, shutting down").await;
    up.release_streams();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8(rest)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));

    let status = carpool.exited().await;
    assert!(status.success(), "exit status {status}");
}
