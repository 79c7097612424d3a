//! Results stay retrievable for `results_ttl`, then they are gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use carpool::sim::{self, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, TestApp};

#[tokio::test]
async fn a_result_is_purged_once_results_ttl_has_passed() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = SimConfig::new("mistral", &sim)
        .batching("max_wait = \"50ms\"\nresults_ttl = \"1s\"")
        .toml();
    let app = TestApp::start(&config, &[("UPSTREAM_KEY", "sk-up")]).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "keep me a while"}]});
    let resp = client()
        .post(app.url("/v1/chat/completions"))
        .header("carpool-mode", "wait")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["carpool-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let url = app.url(&format!("/v1/carpool/requests/{id}"));
    let kept: Value = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kept["status"], "succeeded");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = client().get(&url).send().await.unwrap().status();
        if status == 404 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            tokio::time::Instant::now() < deadline,
            "result never purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await.unwrap();
}
