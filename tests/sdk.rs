//! The official Python SDKs (`openai`, `mistralai`) against the simulated
//! provider, and unchanged through carpool: only their base URL differs.
//! Needs the virtualenv that `tests/run.sh` prepares (`CARPOOL_PYTHON`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use carpool::sim::{self, SimOptions};
use support::TestApp;

/// Runs the SDK check against `base` on a blocking thread; panics with its
/// output unless every check passed.
async fn sdk_check(base: String, deferred: bool) {
    let env = [
        ("CARPOOL_SDK_TIMEOUT", "60"),
        ("CARPOOL_SDK_DEFERRED", if deferred { "1" } else { "0" }),
    ];
    let env = env.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec();
    let (ok, text) = support::python::run("sdk_check.py", vec![base], env).await;
    assert!(ok, "SDK check failed:\n{text}");
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
# The SDKs declare a 60 s read timeout (x-stainless-read-timeout), which is
# their deadline: under the default 5 m margin their fallback comes at 30 s,
# half their wait, so the batch answers them.
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
    // The client made with `project=` / `organization=` had a job of its
    // own, and every batch call of it carried both headers.
    let scoped: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.header("openai-project") == Some("proj_sdk"))
        .collect();
    let create = scoped
        .iter()
        .find(|c| c.method == "POST" && c.route == "/v1/batches")
        .expect("no batch job was created with the client's project");
    let job = sim
        .jobs()
        .into_iter()
        .find(|j| Some(&j.id) == create.job_id.as_ref())
        .unwrap();
    assert_eq!(job.custom_ids.len(), 1, "the project's job: {job:?}");
    for (method, route) in [("POST", "/v1/files"), ("GET", "/v1/batches/{batch_id}")] {
        assert!(
            scoped
                .iter()
                .any(|c| c.method == method && c.route == route),
            "no {method} {route} call carried the client's project"
        );
    }
    assert!(scoped
        .iter()
        .all(|c| c.header("openai-organization") == Some("org_sdk")));
    app.stop().await.unwrap();
}
