//! What a replica leaves behind when it stops gracefully.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use carpool::sim::{self, SimOptions};
use carpool::store::WindowState;
use serde_json::json;
use support::config::SimConfig;
use support::{post_chat, TestApp};

/// On a shared Postgres store the other replicas go on counting an open
/// window's max_wait, so one replica's rolling restart must not seal the
/// fleet's partial windows (it used to seal every open window it could
/// read, making every deploy's batches smaller).
#[tokio::test]
async fn stopping_one_postgres_replica_leaves_the_fleets_open_windows_open() {
    if support::pg::skipped() {
        return;
    }
    let schema = support::pg::Schema::create().await;
    let url = schema.url();
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let toml = SimConfig::new("openai", &sim)
        .server("shutdown_grace = \"1s\"")
        .batching("max_wait = \"1h\"")
        .toml();
    let vars = [
        ("UPSTREAM_KEY", "sk-upstream"),
        ("CARPOOL_STORE__URL", url.as_str()),
    ];
    let staying = TestApp::start(&toml, &vars).await;
    let leaving = TestApp::start(&toml, &vars).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_chat(&staying, "sk-caller", &[("carpool-mode", "async")], &body).await;
    assert_eq!(resp.status(), 202);

    leaving.stop().await.unwrap();
    let store = &staying.state.deferral.store;
    assert_eq!(
        store.windows_in(&[WindowState::Open]).await.unwrap().len(),
        1
    );
    assert!(store
        .windows_in(&[
            WindowState::Sealed,
            WindowState::Uploaded,
            WindowState::Creating
        ])
        .await
        .unwrap()
        .is_empty());
    staying.stop().await.unwrap();
}
