//! The official Python SDKs (`openai`, `mistralai`) against the simulated
//! provider, and unchanged through carpool: only their base URL differs.
//! Needs the virtualenv that `tests/run.sh` prepares (`CARPOOL_PYTHON`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;

use carpool::sim::{self, SimOptions};
use support::TestApp;

fn python() -> PathBuf {
    let path = std::env::var_os("CARPOOL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        path.exists(),
        "{} not found: run `bash tests/run.sh`, which prepares the SDK virtualenv",
        path.display()
    );
    path
}

/// Runs the SDK check against `base` on a blocking thread; panics with its
/// output unless every check passed.
async fn sdk_check(base: String, deferred: bool) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk_check.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .arg(base)
            .env("CARPOOL_SDK_TIMEOUT", "60")
            .env("CARPOOL_SDK_DEFERRED", if deferred { "1" } else { "0" })
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "SDK check failed:\n{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdks_accept_the_simulated_provider() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    sdk_check(sim.base_url(), false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdks_work_unchanged_through_carpool_including_deferred_calls() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let config = format!(
        r#"
[[upstreams]]
name = "sim"
dialect = "openai"
base_url = "{base}"
auth = "passthrough"
models = ["gpt-*"]

[[upstreams]]
name = "sim-mistral"
dialect = "mistral"
base_url = "{base}"
auth = "passthrough"
models = ["*"]

[batching]
max_wait = "200ms"
poll_interval = "50ms"
"#,
        base = sim.base_url()
    );
    let app = TestApp::start(&config, &[]).await;
    sdk_check(app.url(""), true).await;
    // The SDKs' own batch calls passed through; the deferred ones became jobs too.
    let carpool_jobs = sim
        .jobs()
        .iter()
        .filter(|j| {
            j.metadata
                .as_ref()
                .is_some_and(|m| m.get("carpool_window").is_some())
        })
        .count();
    assert!(
        carpool_jobs >= 2,
        "deferred SDK calls made {carpool_jobs} carpool jobs"
    );
    app.stop().await.unwrap();
}
