//! The operator's API: open windows, flushing, jobs in flight; refused
//! without the admin token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use carpool::sim::{self, Fault, JobOutcome, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, metrics, TestApp};

const ADMIN: &str = "admin-secret-token";

async fn setup() -> (TestApp, sim::SimHandle) {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new("openai", &sim)
        .server("admin_token_env = \"CARPOOL_TEST_ADMIN\"")
        .batching("max_wait = \"1h\"")
        // Named in the config, so /metrics shows it by name.
        .extra("[[batching.models]]\nmodel = \"gpt-4o-mini\"\n")
        .toml();
    let app = TestApp::start(
        &config,
        &[("UPSTREAM_KEY", "sk-up"), ("CARPOOL_TEST_ADMIN", ADMIN)],
    )
    .await;
    (app, sim)
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    let resp = client()
        .get(app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn admin_api_refuses_a_missing_or_wrong_token() {
    let (app, _sim) = setup().await;
    for path in ["/admin/windows", "/admin/jobs"] {
        let none = client().get(app.url(path)).send().await.unwrap();
        assert_eq!(none.status(), 401);
        let wrong = client()
            .get(app.url(path))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        let body: Value = wrong.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
    }
    let flush = client()
        .post(app.url("/admin/flush"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(flush.status(), 401);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn operator_lists_a_window_flushes_it_and_sees_its_job() {
    let (app, sim) = setup().await;
    sim.add_fault(Fault::NextJob {
        outcome: JobOutcome::Stuck,
        count: 1,
    });
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let resp = client()
            .post(app.url("/v1/chat/completions"))
            .header("carpool-mode", "async")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    let windows = admin_get(&app, "/admin/windows").await;
    let data = windows["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["model"], "gpt-4o-mini");
    assert_eq!(data[0]["requests"], 3);
    assert!(data[0]["bytes"].as_u64().unwrap() > 0);
    let id = data[0]["id"].as_str().unwrap().to_owned();
    // The flusher's pass publishes the open window on /metrics too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(&app).await;
        if text.contains("carpool_window_requests{model=\"gpt-4o-mini\"} 3") {
            assert!(text.contains("carpool_window_bytes{model=\"gpt-4o-mini\"}"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "window gauges never set"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let unknown = client()
        .post(app.url("/admin/windows/cpw_00000000000000000000000000000000/flush"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let flushed = client()
        .post(app.url(&format!("/admin/windows/{id}/flush")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(flushed.status(), 200);
    assert!(admin_get(&app, "/admin/windows").await["data"]
        .as_array()
        .unwrap()
        .is_empty());

    // The job is stuck at the provider, so the window shows as submitted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let job = loop {
        let jobs = admin_get(&app, "/admin/jobs").await;
        if let Some(job) = jobs["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["state"] == "submitted")
        {
            break job.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no submitted job listed: {jobs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(job["window"], id);
    assert_eq!(job["flush_reason"], "operator");
    assert_eq!(job["requests"], 3);
    assert_eq!(job["job_id"], sim.jobs()[0].id);
    let text = metrics(&app).await;
    assert!(text.contains("carpool_flushes_total{reason=\"operator\"} 1"));
    app.stop().await.unwrap();
}
