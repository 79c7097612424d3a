//! Crash tests of the Anthropic dialect on the real binary: killed with
//! SIGKILL after acknowledging, and between a batch's create and the
//! commit of its id, then restarted on the same store. Anthropic batches
//! carry no metadata, so the restart must find the batch it created by
//! listing the key's batches; every request is answered once, each in
//! exactly one batch, and no window gets a second batch.
//!
//! Two windows of one key (two `anthropic-beta` values) with different
//! sizes, so telling their batches apart is part of the test: once ended
//! by their results' `custom_id`s, while running by their request counts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use carpool::model::Dialect;
use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use serde_json::{json, Value};
use sqlx::Connection;
use support::binary::{self, Binary};
use support::config::SimConfig;
use support::{settled, PATIENCE};
use tokio::time::Instant;

const ALICE: &str = "sk-ant-alice";
const UPSTREAM_KEY: &str = "sk-ant-upstream";
const CREATE: &str = "POST /v1/messages/batches";
/// Two windows of one key, told apart by scope, of three and two requests.
const WINDOWS: [(&str, usize); 2] = [("beta-one", 3), ("beta-two", 2)];

struct Scene {
    sim: SimHandle,
    dir: tempfile::TempDir,
}

struct Sent {
    id: String,
    body: Value,
}

impl Scene {
    async fn new() -> Self {
        Self {
            sim: sim::spawn(SimOptions::default()).await.unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("carpool.db")
    }

    async fn start(&self, max_wait: &str) -> Binary {
        let config = SimConfig::new("anthropic", &self.sim)
            .binary(&self.db())
            .client("alice", ALICE)
            .batching(&format!("max_wait = \"{max_wait}\""))
            .batching("poll_interval = \"100ms\"")
            .write(&self.dir.path().join(format!("carpool-{max_wait}.toml")));
        Binary::start(&config, &[("UPSTREAM_KEY", UPSTREAM_KEY)]).await
    }

    /// The windows in the store: (state, job id).
    async fn windows(&self) -> Vec<(String, Option<String>)> {
        let mut conn = binary::read_only(&self.db()).await;
        let rows = sqlx::query_as("SELECT state, job_id FROM windows")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        rows
    }

    async fn until_windows(&self, what: &str, ok: impl Fn(&(String, Option<String>)) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let windows = self.windows().await;
            if windows.len() == WINDOWS.len() && windows.iter().all(&ok) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "windows never got {what}: {windows:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn until(&self, what: &str, cond: impl Fn(&SimHandle) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond(&self.sim) {
            assert!(Instant::now() < deadline, "never saw {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn batches(&self) -> Vec<sim::JobRecord> {
        self.sim
            .jobs()
            .into_iter()
            .filter(|j| j.dialect == Dialect::Anthropic)
            .collect()
    }
}

/// Every window's requests, async, each acknowledged with 202; the models
/// alternate, since one batch takes both.
async fn send(carpool: &Binary) -> Vec<Sent> {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut sent = Vec::new();
    for (beta, n) in WINDOWS {
        for i in 0..n {
            let model = if i % 2 == 0 {
                "claude-sim-a"
            } else {
                "claude-sim-b"
            };
            let body = json!({
                "model": model, "max_tokens": 16,
                "messages": [{"role": "user", "content": format!("crash {beta} {i}")}],
            });
            let resp = http
                .post(carpool.url("/v1/messages"))
                .header("x-api-key", ALICE)
                .header("anthropic-version", "2023-06-01")
                .header("anthropic-beta", beta)
                .header("carpool-mode", "async")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202);
            let object: Value = resp.json().await.unwrap();
            sent.push(Sent {
                id: object["id"].as_str().unwrap().to_owned(),
                body,
            });
        }
    }
    sent
}

async fn assert_every_request_answered_once(scene: &Scene, carpool: &Binary, sent: &[Sent]) {
    let mut answers = Vec::new();
    for s in sent {
        answers.push(settled(carpool, ALICE, &s.id).await);
    }
    let batches = scene.batches();
    assert_eq!(
        batches.len(),
        WINDOWS.len(),
        "one batch per window: {batches:?}"
    );
    let mut seen = BTreeMap::<String, Vec<String>>::new();
    for batch in &batches {
        for custom_id in &batch.custom_ids {
            seen.entry(custom_id.clone())
                .or_default()
                .push(batch.id.clone());
        }
    }
    let ours: HashSet<&str> = sent.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        seen.keys().map(String::as_str).collect::<HashSet<_>>(),
        ours
    );
    assert!(seen.values().all(|b| b.len() == 1), "{seen:?}");
    for (s, object) in sent.iter().zip(answers) {
        assert_eq!(object["status"], "succeeded", "{object}");
        assert_eq!(object["batch_id"].as_str(), Some(seen[&s.id][0].as_str()));
        assert_eq!(
            object["response"]["body"],
            sim::expected_response("/v1/messages", &s.body)
        );
    }
    let windows = scene.windows().await;
    assert!(windows.iter().all(|w| w.0 == "completed"), "{windows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_after_acknowledgement_then_restart_submits_each_window_once() {
    let scene = Scene::new().await;
    let mut carpool = scene.start("1h").await;
    let sent = send(&carpool).await;
    scene.until_windows("open", |w| w.0 == "open").await;
    assert!(scene.sim.calls().is_empty());
    carpool.kill();

    let carpool = scene.start("100ms").await;
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
}

/// Kills with every batch created at the provider and its create answer
/// held, so carpool never stored a batch id; `outcome` is how the batches
/// run meanwhile (`None`: they end at once).
async fn kill_between_create_and_commit(outcome: Option<JobOutcome>) {
    let scene = Scene::new().await;
    scene.sim.add_fault(Fault::hold_response(CREATE, 0));
    if let Some(outcome) = outcome {
        scene.sim.add_fault(Fault::NextJob { outcome, count: 0 });
    }
    let mut carpool = scene.start("100ms").await;
    let sent = send(&carpool).await;
    scene
        .until("every window's batch created and its answer held", |sim| {
            sim.held_responses() == WINDOWS.len() && sim.jobs().len() == WINDOWS.len()
        })
        .await;
    scene
        .until_windows("creating without a batch id", |w| {
            w.0 == "creating" && w.1.is_none()
        })
        .await;
    carpool.kill();

    // Only the held answers go; stuck batches stay running until released.
    scene.sim.set_faults(
        outcome
            .map(|outcome| vec![Fault::NextJob { outcome, count: 0 }])
            .unwrap_or_default(),
    );
    scene.sim.release_held();
    let carpool = scene.start("100ms").await;
    if outcome.is_some() {
        // Adopted while running: told apart by request count.
        scene
            .until_windows("submitted with a batch id", |w| {
                w.0 == "submitted" && w.1.is_some()
            })
            .await;
        scene.sim.clear_faults();
    }
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    assert_eq!(
        carpool
            .logs()
            .iter()
            .filter(|l| l["message"] == "adopted a job created before a restart")
            .count(),
        WINDOWS.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_create_and_commit_then_restart_adopts_the_ended_batches() {
    kill_between_create_and_commit(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_create_and_commit_then_restart_adopts_the_running_batches() {
    kill_between_create_and_commit(Some(JobOutcome::Stuck)).await;
}
