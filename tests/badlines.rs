//! One caller's bad line never sinks the others (SPEC section 3, issue 19):
//! a batch the provider refuses for a line it names fails only that line's
//! caller, with the provider's code and message, and the rest go again at
//! once, uncounted. Also what intake refuses before a batch ever sees it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, post_chat, settled, TestApp, CHAT};

const ALICE: &str = "sk-alice";

/// carpool before a fresh simulator, `batching` extra `[batching]` keys.
async fn setup(dialect: &str, batching: &str) -> (TestApp, SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new(dialect, &sim)
        .client("alice", ALICE)
        .batching("max_wait = \"30s\"")
        .batching(batching);
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", "sk-upstream")]).await;
    (app, sim)
}

fn chat(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 32})
}

async fn async_call(app: &TestApp, body: &Value) -> String {
    let resp = post_chat(app, ALICE, &[("prefer", "respond-async")], body).await;
    assert_eq!(resp.status(), 202);
    let obj: Value = resp.json().await.unwrap();
    obj["id"].as_str().unwrap().to_owned()
}

async fn result(app: &TestApp, id: &str) -> (u16, Value) {
    let resp = client()
        .get(app.url(&format!("/v1/carpool/requests/{id}/result")))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn a_named_bad_line_fails_its_caller_only_and_the_rest_succeed_uncounted() {
    // resubmit_limit = 0: under the old chain the good lines would go
    // realtime; a refusal for another's line must not use up their limit.
    let (app, sim) = setup("openai", "max_requests = 3\nresubmit_limit = 0").await;
    sim.add_fault(Fault::invalid_line(2, "invalid_url"));
    let bodies: Vec<Value> = (0..3).map(|i| chat(&format!("question {i}"))).collect();
    let mut ids = Vec::new();
    for body in &bodies {
        ids.push(async_call(&app, body).await);
    }
    let objects = join_all(ids.iter().map(|id| settled(&app, ALICE, id))).await;
    let jobs = sim.jobs();
    assert_eq!(jobs.len(), 2, "the good lines went again as a second job");
    assert_eq!(jobs[0].status, "failed");
    let bad = jobs[0].custom_ids[1].clone();
    let mut good: Vec<String> = ids.iter().filter(|id| **id != bad).cloned().collect();
    let mut second = jobs[1].custom_ids.clone();
    good.sort();
    second.sort();
    assert_eq!(second, good, "only the good lines were resubmitted");
    for (i, (id, obj)) in ids.iter().zip(&objects).enumerate() {
        if *id == bad {
            assert_eq!(obj["status"], "failed", "{obj}");
            assert_eq!(obj["error"]["code"], "invalid_url", "{obj}");
            let message = obj["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("does not match the batch endpoint"),
                "{message}"
            );
            let (status, body) = result(&app, id).await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"]["code"], "invalid_url");
            assert_eq!(body["error"]["param"], "url");
            assert_eq!(body["error"]["message"], obj["error"]["message"]);
        } else {
            assert_eq!(obj["status"], "succeeded", "{obj}");
            assert_eq!(obj["served_by"], "batch", "{obj}");
            assert_eq!(obj["batch_id"], jobs[1].id.as_str(), "{obj}");
            let (status, body) = result(&app, id).await;
            assert_eq!(status, 200);
            assert_eq!(body, sim::expected_response(CHAT, &bodies[i]));
        }
    }
    assert!(
        sim.calls().iter().all(|c| c.route != CHAT),
        "no realtime call was made"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_wait_caller_with_the_bad_line_gets_400_the_others_their_answers() {
    let (app, sim) = setup("openai", "max_requests = 3").await;
    sim.add_fault(Fault::invalid_line(1, "mismatched_model"));
    let held = join_all((0..3).map(|i| {
        let app = &app;
        async move {
            let body = chat(&format!("waiting {i}"));
            let resp = post_chat(app, ALICE, &[("carpool-mode", "wait")], &body).await;
            let status = resp.status().as_u16();
            let served = resp
                .headers()
                .get("carpool-served-by")
                .map(|v| v.to_str().unwrap().to_owned());
            (body, status, served, resp.json::<Value>().await.unwrap())
        }
    }))
    .await;
    let refused: Vec<_> = held.iter().filter(|h| h.1 == 400).collect();
    assert_eq!(refused.len(), 1, "exactly the bad line's caller is refused");
    assert_eq!(refused[0].3["error"]["code"], "mismatched_model");
    assert_eq!(refused[0].3["error"]["type"], "invalid_request_error");
    for (body, status, served, answer) in held.iter().filter(|h| h.1 != 400) {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(served.as_deref(), Some("batch"));
        assert_eq!(*answer, sim::expected_response(CHAT, body));
    }
    assert_eq!(sim.jobs().len(), 2);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_refusal_naming_no_line_follows_the_old_chain() {
    // Mistral words its job errors without a line; an OpenAI job failure
    // without one (simulated) is the same case.
    for (dialect, fault) in [
        ("mistral", Fault::invalid_line(2, "invalid_url")),
        ("openai", Fault::next_job(JobOutcome::Failed)),
    ] {
        let (app, sim) = setup(dialect, "max_requests = 3\non_batch_failure = \"error\"").await;
        sim.add_fault(fault);
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(async_call(&app, &chat(&format!("q {i}"))).await);
        }
        for id in &ids {
            let obj = settled(&app, ALICE, id).await;
            assert_eq!(obj["status"], "failed", "{dialect}: {obj}");
            assert_eq!(obj["error"]["code"], "batch_failed", "{dialect}: {obj}");
            assert_eq!(result(&app, id).await.0, 502, "{dialect}");
        }
        assert_eq!(sim.jobs().len(), 1, "{dialect}: nothing resubmitted");
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn bodies_the_batch_api_refuses_are_refused_at_intake_and_nothing_is_stored() {
    for dialect in ["openai", "mistral"] {
        let (app, sim) = setup(dialect, "max_requests = 1").await;
        let refused = [
            json!({"messages": [{"role": "user", "content": "no model"}]}),
            json!({"model": "", "messages": [{"role": "user", "content": "empty"}]}),
            json!({"model": "   ", "messages": [{"role": "user", "content": "blank"}]}),
            json!({"model": 7, "messages": [{"role": "user", "content": "a number"}]}),
        ];
        for body in &refused {
            for headers in [[("carpool-mode", "wait")], [("prefer", "respond-async")]] {
                let resp = post_chat(&app, ALICE, &headers, body).await;
                assert_eq!(resp.status(), 400, "{dialect}: {body}");
                let err: Value = resp.json().await.unwrap();
                assert!(err["error"]["message"].is_string(), "{dialect}: {err}");
            }
        }
        let listed: Value = client()
            .get(app.url("/v1/carpool/requests"))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(listed["data"], json!([]), "{dialect}: nothing stored");
        assert!(
            sim.calls()
                .iter()
                .all(|c| !(c.method == "POST" && c.route == "/v1/files")),
            "{dialect}: the simulator saw no upload"
        );
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_model_that_is_not_a_string_is_named_as_such_and_passthrough_is_unchanged() {
    for dialect in ["openai", "mistral"] {
        let (app, sim) = setup(dialect, "max_requests = 1").await;
        for model in [json!(5), json!(["m"]), json!({"name": "m"}), json!(true)] {
            let body = json!({"model": model, "messages": [{"role": "user", "content": "x"}]});
            let resp = post_chat(&app, ALICE, &[("carpool-mode", "wait")], &body).await;
            assert_eq!(resp.status(), 400, "{dialect}: {body}");
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["param"], "model", "{dialect}: {err}");
            assert_eq!(err["error"]["code"], "invalid_type", "{dialect}: {err}");
            let message = err["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("model") && message.contains("string"),
                "{dialect}: {err}"
            );
            assert!(!message.contains("JSON"), "{dialect}: {err}");
        }
        // Not deferred: forwarded as is, the provider's own refusal relayed.
        let body = json!({"model": 5, "messages": [{"role": "user", "content": "x"}]});
        let resp = post_chat(&app, ALICE, &[], &body).await;
        assert_eq!(resp.status(), 400, "{dialect}");
        assert!(
            sim.calls().iter().any(|c| c.route == CHAT),
            "{dialect}: the passthrough call reached the provider"
        );
        assert!(
            sim.calls()
                .iter()
                .all(|c| !(c.method == "POST" && c.route == "/v1/files")),
            "{dialect}: nothing deferred"
        );
        app.stop().await.unwrap();
    }
}
