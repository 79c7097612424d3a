//! The deferred path through the HTTP surface, against the simulated
//! provider, in both dialects: windows become batch jobs, and every caller
//! gets its own answer, once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use carpool::sim::{self, Fault, SimHandle, SimOptions};
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, metric, metrics, post_chat, settled, submissions, TestApp, CHAT};

const DIALECTS: [&str; 2] = ["mistral", "openai"];
const ALICE: &str = "sk-alice";
const BOB: &str = "sk-bob";

/// carpool in front of a fresh simulator; `batching` is extra `[batching]`
/// keys (max_wait 1m unless given), `tail` any further TOML.
async fn setup(dialect: &str, batching: &str, tail: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new(dialect, &sim)
        .server("max_body = \"64KB\"")
        .client("alice", ALICE)
        .client("bob", BOB)
        .batching("max_wait = \"1m\"")
        .batching(batching)
        .extra(tail);
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 32})
}

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.unwrap()
}

#[tokio::test]
async fn concurrent_wait_calls_over_two_models_make_two_jobs_and_each_caller_gets_its_own_answer() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 10", "").await;
        let calls = (0..20).map(|i| {
            let model = if i % 2 == 0 { "model-a" } else { "model-b" };
            let body = chat(model, &format!("question number {i}"));
            let app = &app;
            async move {
                let resp = post_chat(app, ALICE, &[("carpool-mode", "wait")], &body).await;
                let status = resp.status();
                let served = resp.headers().get("carpool-served-by").cloned();
                let batch = resp.headers().get("carpool-batch-id").cloned();
                let id = resp.headers().get("carpool-request-id").cloned();
                (body, status, served, batch, id, json_of(resp).await)
            }
        });
        for (body, status, served, batch, id, answer) in join_all(calls).await {
            assert_eq!(status, 200, "{dialect}: {answer}");
            assert_eq!(
                answer,
                sim::expected_response(CHAT, &body),
                "{dialect}: a caller got another's answer"
            );
            assert_eq!(served.unwrap(), "batch");
            assert!(batch.is_some() && id.is_some());
        }
        let jobs = sim.jobs();
        assert_eq!(jobs.len(), 2, "{dialect}: one job per model");
        let models: HashSet<_> = jobs.iter().map(|j| j.custom_ids.len()).collect();
        assert_eq!(models, HashSet::from([10]));
        assert!(submissions(&sim).iter().all(|(_, n)| *n == 1));
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn max_requests_five_splits_twelve_requests_into_jobs_of_five_five_and_two() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 5\nmax_wait = \"300ms\"", "").await;
        let mut ids = Vec::new();
        for i in 0..12 {
            let resp = post_chat(
                &app,
                ALICE,
                &[("carpool-mode", "async")],
                &chat("m", &format!("q{i}")),
            )
            .await;
            assert_eq!(resp.status(), 202);
            ids.push(json_of(resp).await["id"].as_str().unwrap().to_owned());
        }
        for id in &ids {
            assert_eq!(settled(&app, ALICE, id).await["status"], "succeeded");
        }
        let mut sizes: Vec<usize> = sim.jobs().iter().map(|j| j.custom_ids.len()).collect();
        sizes.sort();
        assert_eq!(sizes, vec![2, 5, 5], "{dialect}");
        let text = metrics(&app).await;
        assert_eq!(
            metric(&text, "carpool_flushes_total{reason=\"max_requests\"}"),
            2.0
        );
        assert_eq!(
            metric(&text, "carpool_flushes_total{reason=\"max_wait\"}"),
            1.0
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn max_wait_flushes_a_lone_request() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_wait = \"200ms\"", "").await;
        let body = chat("lonely", "anyone there?");
        let resp = post_chat(&app, ALICE, &[("carpool-mode", "wait")], &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(json_of(resp).await, sim::expected_response(CHAT, &body));
        assert_eq!(sim.jobs().len(), 1);
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn async_then_poll_then_result_equals_the_synchronous_answer() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_wait = \"100ms\"", "").await;
        let body = chat("m", "what is a carpool?");
        let resp = post_chat(&app, ALICE, &[("prefer", "respond-async")], &body).await;
        assert_eq!(resp.status(), 202);
        assert_eq!(resp.headers()["preference-applied"], "respond-async");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let accepted = json_of(resp).await;
        assert_eq!(accepted["object"], "carpool.request");
        assert_eq!(accepted["status"], "queued");
        let id = accepted["id"].as_str().unwrap();
        assert_eq!(location, format!("/v1/carpool/requests/{id}"));

        let done = settled(&app, ALICE, id).await;
        assert_eq!(done["status"], "succeeded");
        assert_eq!(done["served_by"], "batch");
        assert!(done["batch_id"].is_string());

        let result = client()
            .get(app.url(&format!("{location}/result")))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200);
        let from_batch = json_of(result).await;
        let direct = client()
            .post(format!("{}{CHAT}", sim.base_url()))
            .bearer_auth("sk-direct")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(from_batch, json_of(direct).await, "{dialect}");
        let now = post_chat(&app, ALICE, &[("carpool-mode", "now")], &body).await;
        assert_eq!(from_batch, json_of(now).await);
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn delete_before_flush_keeps_the_request_out_of_every_job() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 3", "").await;
        let first = json_of(
            post_chat(
                &app,
                ALICE,
                &[("carpool-mode", "async")],
                &chat("m", "cancel me"),
            )
            .await,
        )
        .await;
        let cancelled_id = first["id"].as_str().unwrap().to_owned();
        let url = app.url(&format!("/v1/carpool/requests/{cancelled_id}"));
        let del = client()
            .delete(&url)
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(del.status(), 200);
        assert_eq!(json_of(del).await["status"], "cancelled");
        let mut kept = Vec::new();
        for i in 0..3 {
            let resp = post_chat(
                &app,
                ALICE,
                &[("carpool-mode", "async")],
                &chat("m", &format!("keep {i}")),
            )
            .await;
            kept.push(json_of(resp).await["id"].as_str().unwrap().to_owned());
        }
        for id in &kept {
            assert_eq!(settled(&app, ALICE, id).await["status"], "succeeded");
        }
        let submitted: Vec<String> = submissions(&sim).into_iter().map(|(id, _)| id).collect();
        assert!(
            !submitted.contains(&cancelled_id),
            "{dialect}: a cancelled request was submitted"
        );
        assert_eq!(submitted.len(), 3);
        let again = client()
            .delete(&url)
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 409);
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn idempotent_repeat_and_sdk_retry_each_make_one_submission() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_wait = \"200ms\"", "").await;
        let body = chat("m", "only once please");
        let key = [("carpool-mode", "async"), ("idempotency-key", "job-42")];
        let a = json_of(post_chat(&app, ALICE, &key, &body).await).await;
        let b = json_of(post_chat(&app, ALICE, &key, &body).await).await;
        assert_eq!(a["id"], b["id"]);
        let reused = post_chat(&app, ALICE, &key, &chat("m", "a different body")).await;
        assert_eq!(reused.status(), 422);
        assert_eq!(
            json_of(reused).await["error"]["code"],
            "idempotency_key_reused"
        );

        // An SDK retry carries no key, only a retry count.
        let retried_body = chat("m", "sent by an SDK that timed out");
        let first = post_chat(
            &app,
            ALICE,
            &[("carpool-mode", "wait"), ("x-stainless-retry-count", "0")],
            &retried_body,
        );
        let (first, second) = tokio::join!(first, async {
            // The retry arrives while the first attempt is still held.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let listed = json_of(
                    client()
                        .get(app.url("/v1/carpool/requests?limit=10"))
                        .bearer_auth(ALICE)
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
                if listed["data"].as_array().unwrap().len() >= 2 {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            post_chat(
                &app,
                ALICE,
                &[("carpool-mode", "wait"), ("x-stainless-retry-count", "1")],
                &retried_body,
            )
            .await
        });
        let (id1, id2) = (
            first.headers()["carpool-request-id"].clone(),
            second.headers()["carpool-request-id"].clone(),
        );
        assert_eq!(id1, id2, "{dialect}: the retry became a second request");
        assert_eq!(json_of(first).await, json_of(second).await);
        settled(&app, ALICE, a["id"].as_str().unwrap()).await;
        let subs = submissions(&sim);
        assert_eq!(subs.len(), 2, "{dialect}: {subs:?}");
        assert!(subs.iter().all(|(_, n)| *n == 1));
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn another_credential_gets_404_on_the_handle() {
    let (app, _sim) = setup("mistral", "", "").await;
    let made = json_of(
        post_chat(
            &app,
            ALICE,
            &[("carpool-mode", "async")],
            &chat("m", "mine"),
        )
        .await,
    )
    .await;
    let url = app.url(&format!(
        "/v1/carpool/requests/{}",
        made["id"].as_str().unwrap()
    ));
    for path in [url.clone(), format!("{url}/result")] {
        let resp = client().get(&path).bearer_auth(BOB).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(json_of(resp).await["error"]["code"], "not_found");
    }
    assert_eq!(
        client()
            .delete(&url)
            .bearer_auth(BOB)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let bobs = json_of(
        client()
            .get(app.url("/v1/carpool/requests"))
            .bearer_auth(BOB)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(bobs["data"].as_array().unwrap().len(), 0);
    assert_eq!(
        client()
            .get(&url)
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let unknown = client()
        .get(app.url("/v1/carpool/requests/cpr_nope"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_per_line_failure_reaches_only_its_own_caller_with_the_upstream_status_and_body() {
    for dialect in DIALECTS {
        let (app, sim) = setup(dialect, "max_requests = 2", "").await;
        let doomed = json_of(
            post_chat(
                &app,
                ALICE,
                &[("carpool-mode", "async")],
                &chat("m", "doomed"),
            )
            .await,
        )
        .await;
        let doomed_id = doomed["id"].as_str().unwrap().to_owned();
        sim.add_fault(Fault::FailLines {
            custom_ids: vec![doomed_id.clone()],
            fraction: 0.0,
            status: 400,
        });
        let fine_body = chat("m", "fine");
        let fine = post_chat(&app, ALICE, &[("carpool-mode", "wait")], &fine_body).await;
        assert_eq!(fine.status(), 200);
        assert_eq!(
            json_of(fine).await,
            sim::expected_response(CHAT, &fine_body)
        );

        let failed = settled(&app, ALICE, &doomed_id).await;
        assert_eq!(failed["status"], "failed", "{dialect}: {failed}");
        assert_eq!(failed["response"]["status_code"], 400);
        let result = client()
            .get(app.url(&format!("/v1/carpool/requests/{doomed_id}/result")))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 400);
        let body = json_of(result).await;
        assert!(body["error"]["message"].is_string(), "{body}");
        assert_eq!(body, failed["response"]["body"]);
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_streamed_wait_call_gets_valid_sse() {
    for dialect in DIALECTS {
        let (app, _sim) = setup(dialect, "max_wait = \"100ms\"", "").await;
        let mut body = chat("m", "stream this back to me please");
        let expected = sim::expected_response(CHAT, &body);
        body["stream"] = json!(true);
        let resp = post_chat(&app, ALICE, &[("carpool-mode", "wait")], &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert!(resp.headers().contains_key("carpool-request-id"));
        let text = resp.text().await.unwrap();
        assert!(text.starts_with(':'), "keep-alive comment first");
        assert!(text.ends_with("data: [DONE]\n\n"));
        let mut content = String::new();
        for event in text
            .split("\n\n")
            .filter(|e| e.starts_with("data: ") && !e.contains("[DONE]"))
        {
            let chunk: Value = serde_json::from_str(&event["data: ".len()..]).unwrap();
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], expected["id"]);
            if let Some(piece) = chunk["choices"]
                .get(0)
                .and_then(|c| c["delta"]["content"].as_str())
            {
                content.push_str(piece);
            }
        }
        assert_eq!(
            content,
            expected["choices"][0]["message"]["content"]
                .as_str()
                .unwrap(),
            "{dialect}"
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_the_spec_status_and_stores_nothing() {
    let (app, sim) = setup("openai", "max_wait = \"50ms\"", "").await;
    let raw = |body: &'static str, headers: &[(&'static str, &'static str)]| {
        let mut req = client()
            .post(app.url(CHAT))
            .bearer_auth(ALICE)
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    let bad_json = raw("{\"model\": \"m\", ", &[("carpool-mode", "async")])
        .await
        .unwrap();
    assert_eq!(bad_json.status(), 400);
    let no_model = raw("{\"messages\": []}", &[("carpool-mode", "async")])
        .await
        .unwrap();
    assert_eq!(no_model.status(), 400);
    assert_eq!(json_of(no_model).await["error"]["param"], "model");
    let bad_deadline = raw(
        "{\"model\": \"m\"}",
        &[("carpool-mode", "async"), ("carpool-deadline", "soonish")],
    )
    .await
    .unwrap();
    assert_eq!(bad_deadline.status(), 400);
    let bad_mode = raw("{\"model\": \"m\"}", &[("carpool-mode", "later")])
        .await
        .unwrap();
    assert_eq!(bad_mode.status(), 400);
    let huge = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(70_000)
    );
    let too_large = client()
        .post(app.url(CHAT))
        .bearer_auth(ALICE)
        .header("carpool-mode", "async")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    let not_batchable = client()
        .post(app.url("/v1/ocr"))
        .bearer_auth(ALICE)
        .header("carpool-mode", "async")
        .json(&json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(not_batchable.status(), 422);
    let listed = json_of(
        client()
            .get(app.url("/v1/carpool/requests"))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        listed["data"].as_array().unwrap().len(),
        0,
        "something was stored: {listed}"
    );
    assert!(app
        .state
        .deferral
        .store
        .open_windows()
        .await
        .unwrap()
        .is_empty());
    // Nothing reached the provider either.
    assert!(sim.jobs().is_empty());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn batch_answers_count_tokens_and_savings_at_the_configured_prices() {
    let prices = "[prices]\nbatch_discount = 0.5\n\n[[prices.models]]\nmodel = \"priced-*\"\ninput = 2.0\noutput = 8.0\n";
    let (app, _sim) = setup("openai", "max_wait = \"100ms\"", prices).await;
    let body = chat("priced-model", "how much did this cost?");
    let resp = post_chat(&app, ALICE, &[("carpool-mode", "wait")], &body).await;
    assert_eq!(resp.status(), 200);
    let answer = json_of(resp).await;
    let (input, output) = (
        answer["usage"]["prompt_tokens"].as_f64().unwrap(),
        answer["usage"]["completion_tokens"].as_f64().unwrap(),
    );
    let expected = (input * 2.0 + output * 8.0) / 1e6 * 0.5;
    let text = metrics(&app).await;
    let saved = metric(
        &text,
        "carpool_estimated_savings_usd_total{model=\"priced-model\"}",
    );
    assert!(
        (saved - expected).abs() < 1e-12,
        "saved {saved}, expected {expected}"
    );
    assert_eq!(
        metric(
            &text,
            "carpool_tokens_total{kind=\"input\",model=\"priced-model\",served_by=\"batch\"}"
        ),
        input
    );
    assert_eq!(
        metric(&text, "carpool_results_total{outcome=\"succeeded\"}"),
        1.0
    );
    app.stop().await.unwrap();
}

/// Model names come from callers: even names a configured glob matches
/// share one label past the first 100, so they cannot grow the metrics
/// without bound.
#[tokio::test]
async fn model_labels_stop_growing_after_the_first_hundred_names() {
    let (app, _sim) = setup(
        "openai",
        "max_wait = \"1h\"\nmax_open_windows_per_client = 1000",
        "[[batching.models]]\nmodel = \"made-up-*\"\n",
    )
    .await;
    let names = carpool::metrics::MAX_MODEL_LABELS + 5;
    let calls = (0..names).map(|i| {
        let body = chat(&format!("made-up-{i}"), "hello");
        let app = &app;
        async move {
            let resp = post_chat(app, ALICE, &[("carpool-mode", "async")], &body).await;
            assert_eq!(resp.status(), 202);
        }
    });
    join_all(calls).await;
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    let text = loop {
        let text = metrics(&app).await;
        let in_windows: f64 = text
            .lines()
            .filter(|l| l.starts_with("carpool_window_requests{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if in_windows == names as f64 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "window gauges never counted every call"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let series = text
        .lines()
        .filter(|l| l.starts_with("carpool_window_requests{"))
        .count();
    assert_eq!(series, carpool::metrics::MAX_MODEL_LABELS + 1);
    assert_eq!(
        metric(&text, "carpool_window_requests{model=\"_other\"}"),
        5.0
    );
}

/// A result file of several chunks (reconciliation stores 2,000 results a
/// transaction, with up to two queued while the next is parsed): every
/// request gets its own answer, each counted once.
#[tokio::test]
async fn a_result_file_of_several_chunks_answers_every_request_with_its_own_result() {
    use carpool::deferral::engine::now_ms;
    use carpool::model::{RequestId, RequestStatus, ServedBy};
    use carpool::store::{FlushReason, WindowLimits};

    const N: usize = 7_000;
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let toml = SimConfig::new("openai", &sim)
        .batching("max_wait = \"1h\"\npoll_interval = \"50ms\"")
        .toml();
    let app = TestApp::start(&toml, &[("UPSTREAM_KEY", "sk-upstream")]).await;
    let store = &app.state.deferral.store;
    let bodies: Vec<Value> = (0..N)
        .map(|i| json!({"model": "m", "messages": [{"role": "user", "content": format!("question {i}")}]}))
        .collect();
    let limits = WindowLimits {
        max_requests: 50_000,
        max_bytes: 100_000_000,
    };
    let accepted = join_all(
        bodies
            .iter()
            .map(|body| store.accept(support::async_request("m", body.to_string(), limits))),
    )
    .await;
    let ids: Vec<RequestId> = accepted.into_iter().map(|a| a.unwrap().record.id).collect();
    let windows = store.open_windows().await.unwrap();
    assert_eq!(windows.len(), 1);
    assert!(store
        .seal_window(&windows[0].id, FlushReason::Operator, now_ms())
        .await
        .unwrap());
    app.state.deferral.flush_wake.notify_one();

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while metric(&metrics(&app).await, "carpool_results_total") < N as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "not every result was stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, body) in ids.iter().zip(&bodies) {
        let record = store.get(id, "anonymous").await.unwrap().unwrap();
        assert_eq!(record.status, RequestStatus::Succeeded, "{id}");
        assert_eq!(record.served_by, Some(ServedBy::Batch));
        let stored: Value = serde_json::from_slice(&record.response_body.unwrap()).unwrap();
        assert_eq!(stored, sim::expected_response(CHAT, body), "{id}");
    }
    assert_eq!(sim.jobs().len(), 1);
    let text = metrics(&app).await;
    assert_eq!(metric(&text, "carpool_results_total"), N as f64);
    app.stop().await.unwrap();
}
