//! Crash tests: the real binary, killed with SIGKILL at each stage of the
//! deferred path, then restarted on the same store. After the restart every
//! request is answered once, each `custom_id` is in exactly one job of the
//! simulator, and no window has two jobs.
//!
//! The test hosts the simulator in-process and drives carpool to each stage
//! with faults, waiting on what can be observed (the simulator's call log,
//! jobs and held responses, and a read-only look at carpool's SQLite store)
//! before it kills, never on a fixed sleep.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::Connection;
use support::binary::{self, Binary};
use support::config::SimConfig;
use support::{create_route, settled, CHAT, PATIENCE};
use tokio::time::Instant;

const ALICE: &str = "sk-alice";
const UPSTREAM_KEY: &str = "sk-upstream";
/// Two models, so every test has two windows to keep apart.
const MODELS: [&str; 2] = ["m-small", "m-large"];
const PER_MODEL: usize = 3;
const WINDOWS: usize = MODELS.len();
fn job_route(dialect: &str) -> &'static str {
    match dialect {
        "mistral" => "/v1/batch/jobs/{job_id}",
        _ => "/v1/batches/{batch_id}",
    }
}

/// The simulator, a folder for carpool's config and store, and the dialect.
struct Scene {
    dialect: &'static str,
    sim: SimHandle,
    dir: tempfile::TempDir,
}

impl Scene {
    async fn new(dialect: &'static str) -> Self {
        Self {
            dialect,
            sim: sim::spawn(SimOptions::default()).await.unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("carpool.db")
    }

    /// Writes a config with this `max_wait` and returns its path.
    fn config(&self, max_wait: &str) -> PathBuf {
        SimConfig::new(self.dialect, &self.sim)
            .binary(&self.db())
            .client("alice", ALICE)
            .batching(&format!("max_wait = \"{max_wait}\""))
            .batching("poll_interval = \"100ms\"")
            .write(&self.dir.path().join(format!("carpool-{max_wait}.toml")))
    }

    /// The binary on the config with this `max_wait`.
    async fn start(&self, max_wait: &str) -> Binary {
        Binary::start(&self.config(max_wait), &[("UPSTREAM_KEY", UPSTREAM_KEY)]).await
    }

    /// The windows in carpool's store: (state, file id, job id).
    async fn windows(&self) -> Vec<(String, Option<String>, Option<String>)> {
        let mut conn = binary::read_only(&self.db()).await;
        let rows = sqlx::query_as("SELECT state, file_id, job_id FROM windows")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        rows
    }

    /// The requests the store holds as succeeded: id, completed_at, body.
    async fn succeeded(&self) -> BTreeMap<String, (i64, Vec<u8>)> {
        let mut conn = binary::read_only(&self.db()).await;
        let rows: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT id, completed_at, response_body FROM requests WHERE status = 'succeeded'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        rows.into_iter()
            .map(|(id, at, body)| (id, (at, body)))
            .collect()
    }

    /// Waits until the store has all `WINDOWS` windows and each satisfies `ok`.
    async fn until_windows(
        &self,
        what: &str,
        ok: impl Fn(&(String, Option<String>, Option<String>)) -> bool,
    ) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let windows = self.windows().await;
            if windows.len() == WINDOWS && windows.iter().all(&ok) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: windows never got {what}: {windows:?}",
                self.dialect
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `cond` holds of the simulator.
    async fn until(&self, what: &str, cond: impl Fn(&SimHandle) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond(&self.sim) {
            assert!(
                Instant::now() < deadline,
                "{}: never saw {what}",
                self.dialect
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Over both runs, each window's file was uploaded exactly once.
    fn assert_each_window_uploaded_once(&self) {
        assert_eq!(
            self.successful_calls("POST", "/v1/files"),
            WINDOWS,
            "{}: each window is uploaded once",
            self.dialect
        );
    }

    fn successful_calls(&self, method: &str, route: &str) -> usize {
        self.sim
            .calls()
            .iter()
            .filter(|c| c.method == method && c.route == route && c.status == 200)
            .count()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One accepted request: carpool's id and the body sent.
struct Sent {
    id: String,
    body: Value,
}

/// `PER_MODEL` async requests per model; each must be acknowledged with 202.
async fn send_requests(carpool: &Binary) -> Vec<Sent> {
    send_many(carpool, PER_MODEL).await
}

/// `per_model` async requests per model, a few dozen at a time.
async fn send_many(carpool: &Binary, per_model: usize) -> Vec<Sent> {
    let http = client();
    // Every body names its model, so the batch answer (Mistral fills in the
    // job's model) equals the synchronous one.
    let bodies: Vec<Value> = MODELS
        .iter()
        .flat_map(|model| {
            (0..per_model).map(move |i| {
                json!({
                    "model": model,
                    "messages": [{"role": "user", "content": format!("crash {model} {i}")}],
                    "max_tokens": 16,
                })
            })
        })
        .collect();
    let calls = bodies.into_iter().map(|body| {
        let http = http.clone();
        let url = carpool.url(CHAT);
        async move {
            let resp = http
                .post(url)
                .bearer_auth(ALICE)
                .header("carpool-mode", "async")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202);
            let object: Value = resp.json().await.unwrap();
            assert_eq!(object["status"], "queued");
            Sent {
                id: object["id"].as_str().unwrap().to_owned(),
                body,
            }
        }
    });
    futures_util::stream::iter(calls)
        .buffered(32)
        .collect()
        .await
}

/// What must hold after the restart, whatever the stage of the kill.
async fn assert_every_request_answered_once(scene: &Scene, carpool: &Binary, sent: &[Sent]) {
    let dialect = scene.dialect;
    let http = client();
    let mut answers = Vec::new();
    for s in sent {
        answers.push(settled(carpool, ALICE, &s.id).await);
    }
    let jobs = scene.sim.jobs();

    // Each custom_id in exactly one job, and only ours.
    let mut seen = BTreeMap::<String, Vec<String>>::new();
    for job in &jobs {
        for custom_id in &job.custom_ids {
            seen.entry(custom_id.clone())
                .or_default()
                .push(job.id.clone());
        }
    }
    let ours: HashSet<&str> = sent.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        seen.keys().map(String::as_str).collect::<HashSet<_>>(),
        ours,
        "{dialect}: the jobs hold exactly the accepted requests"
    );
    for (custom_id, in_jobs) in &seen {
        assert_eq!(
            in_jobs.len(),
            1,
            "{dialect}: {custom_id} was submitted in {in_jobs:?}"
        );
    }

    // One job per window.
    let mut per_window = BTreeMap::<String, usize>::new();
    for job in &jobs {
        let window = job
            .metadata
            .as_ref()
            .and_then(|m| m["carpool_window"].as_str())
            .expect("every job names its window")
            .to_owned();
        *per_window.entry(window).or_default() += 1;
    }
    assert_eq!(per_window.len(), WINDOWS, "{dialect}: {per_window:?}");
    assert!(
        per_window.values().all(|n| *n == 1),
        "{dialect}: a window got two jobs: {per_window:?}"
    );

    // Each request answered by the job that holds it, with its own answer.
    for (s, object) in sent.iter().zip(answers) {
        assert_eq!(object["status"], "succeeded", "{dialect}: {object}");
        assert_eq!(object["served_by"], "batch");
        assert_eq!(
            object["batch_id"].as_str(),
            Some(seen[&s.id][0].as_str()),
            "{dialect}: answered from the job that holds it"
        );
        let expected = sim::expected_response(CHAT, &s.body);
        assert_eq!(object["response"]["body"], expected, "{dialect}");
        let result = http
            .get(carpool.url(&format!("/v1/carpool/requests/{}/result", s.id)))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200);
        assert_eq!(result.json::<Value>().await.unwrap(), expected, "{dialect}");
    }
}

macro_rules! in_both_dialects {
    ($name:ident, $scenario:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mistral() {
                super::$scenario("mistral").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn openai() {
                super::$scenario("openai").await;
            }
        }
    };
}

/// Stage 1. The first run's `max_wait` is an hour, so the windows stay open
/// for certain (no timing involved); the restart runs on a second config
/// whose `max_wait` is 100ms, so the resumed windows flush at once.
async fn after_acknowledgement_before_flush(dialect: &'static str) {
    let scene = Scene::new(dialect).await;
    let mut carpool = scene.start("1h").await;
    let sent = send_requests(&carpool).await;
    scene.until_windows("open", |w| w.0 == "open").await;
    // (The janitor's start-up listing of provider files is no submission.)
    assert!(
        scene.sim.calls().iter().all(|c| c.method != "POST"),
        "nothing was submitted to the provider"
    );
    carpool.kill();

    let carpool = scene.start("100ms").await;
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    scene.assert_each_window_uploaded_once();
}

/// Stage 2. Job creation answers 500 until cleared: carpool uploads each
/// window, records the file and marks the window `creating`, and no job
/// exists. Killed there; the restart looks the window up, finds no job,
/// and creates one from the recorded upload.
async fn after_upload_before_create(dialect: &'static str) {
    let scene = Scene::new(dialect).await;
    scene
        .sim
        .add_fault(Fault::status(create_route(dialect), 500, 0));
    let mut carpool = scene.start("100ms").await;
    let sent = send_requests(&carpool).await;
    scene
        .until_windows("uploaded and creating", |w| {
            w.0 == "creating" && w.1.is_some() && w.2.is_none()
        })
        .await;
    carpool.kill();
    assert!(scene.sim.jobs().is_empty());

    scene.sim.clear_faults();
    let carpool = scene.start("100ms").await;
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    scene.assert_each_window_uploaded_once();
}

/// Stage 3. The simulator creates each job and holds the response: the job
/// exists, carpool never learns its id. Killed there; the restart must
/// adopt the job found by its `carpool_window` metadata, not create another.
async fn after_create_before_the_job_id_is_stored(dialect: &'static str) {
    let scene = Scene::new(dialect).await;
    scene
        .sim
        .add_fault(Fault::hold_response(create_route(dialect), 0));
    let mut carpool = scene.start("100ms").await;
    let sent = send_requests(&carpool).await;
    scene
        .until("every window's job created and its response held", |sim| {
            sim.held_responses() == WINDOWS && sim.jobs().len() == WINDOWS
        })
        .await;
    scene
        .until_windows("creating without a job id", |w| {
            w.0 == "creating" && w.2.is_none()
        })
        .await;
    carpool.kill();

    scene.sim.clear_faults();
    let carpool = scene.start("100ms").await;
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    scene.assert_each_window_uploaded_once();
}

/// Stage 4. Jobs stay running until the faults are cleared; killed once
/// carpool has stored every job id and polled the job; after the restart
/// polls again, the jobs are let go.
async fn while_the_job_runs(dialect: &'static str) {
    let scene = Scene::new(dialect).await;
    scene.sim.add_fault(Fault::NextJob {
        outcome: JobOutcome::Stuck,
        count: 0,
    });
    let mut carpool = scene.start("100ms").await;
    let sent = send_requests(&carpool).await;
    scene
        .until_windows("submitted", |w| w.0 == "submitted" && w.2.is_some())
        .await;
    let polled = |sim: &SimHandle, after: usize| {
        let calls = sim.calls();
        sim.jobs().iter().all(|job| {
            calls[after.min(calls.len())..].iter().any(|c| {
                c.method == "GET"
                    && c.route == job_route(dialect)
                    && c.job_id.as_deref() == Some(&job.id)
            })
        })
    };
    scene
        .until("every running job polled", |sim| {
            sim.jobs().len() == WINDOWS && polled(sim, 0)
        })
        .await;
    carpool.kill();

    let before_restart = scene.sim.calls().len();
    let carpool = scene.start("100ms").await;
    scene
        .until("every running job polled after the restart", |sim| {
            polled(sim, before_restart)
        })
        .await;
    scene.sim.clear_faults();
    scene.sim.finish_jobs();
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    scene.assert_each_window_uploaded_once();
}

/// Stage 5. The jobs finish, and each result download is handled but its
/// response held; killed while carpool waits for the results.
async fn while_results_download(dialect: &'static str) {
    let scene = Scene::new(dialect).await;
    scene
        .sim
        .add_fault(Fault::hold_response("GET /v1/files/{file_id}/content", 0));
    let mut carpool = scene.start("100ms").await;
    let sent = send_requests(&carpool).await;
    scene
        .until("every window's results download held", |sim| {
            sim.held_responses() == WINDOWS
        })
        .await;
    scene
        .until_windows("submitted", |w| w.0 == "submitted")
        .await;
    carpool.kill();

    scene.sim.clear_faults();
    let carpool = scene.start("100ms").await;
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    scene.assert_each_window_uploaded_once();
}

/// Stage 5, mid-file. Each results file pauses after 550 of its 600 lines.
/// carpool spools a file whole before it stores any of it, so nothing is
/// stored when it is killed there; after the restart a fresh download
/// answers every request once.
async fn midway_through_a_results_file(dialect: &'static str) {
    const PER_WINDOW: usize = 600;
    const BEFORE_HOLD: u64 = 550;
    let scene = Scene::new(dialect).await;
    scene.sim.add_fault(Fault::hold_body_after_lines(
        "GET /v1/files/{file_id}/content",
        BEFORE_HOLD,
        0,
    ));
    let mut carpool = scene.start("1h").await;
    let sent = send_many(&carpool, PER_WINDOW).await;
    carpool.kill();
    // Restarted on a short max_wait, so both full windows flush together.
    let mut carpool = scene.start("100ms").await;
    scene
        .until("every results download paused midway", |sim| {
            sim.held_responses() == WINDOWS
        })
        .await;
    scene
        .until_windows("submitted", |w| w.0 == "submitted")
        .await;
    assert!(
        scene.succeeded().await.is_empty(),
        "{dialect}: a results file is stored only once it has fully arrived"
    );
    carpool.kill();

    scene.sim.clear_faults();
    let carpool = scene.start("100ms").await;
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    scene.assert_each_window_uploaded_once();
    assert_eq!(scene.succeeded().await.len(), sent.len());
}

/// Between flush and upload. The simulator stores each upload and holds
/// the response: carpool never learns the file id and the window stays
/// sealed. Killed there; the restart uploads again, deletes the first
/// copy it never recorded (review L12), and submits each window once: no
/// input file is left at the provider once the windows finish.
async fn while_the_upload_is_answered(dialect: &'static str) {
    let scene = Scene::new(dialect).await;
    scene
        .sim
        .add_fault(Fault::hold_response("POST /v1/files", 0));
    let mut carpool = scene.start("100ms").await;
    let sent = send_requests(&carpool).await;
    scene
        .until("every window's upload held", |sim| {
            sim.held_responses() == WINDOWS
        })
        .await;
    scene
        .until_windows("sealed without a file", |w| {
            w.0 == "sealed" && w.1.is_none()
        })
        .await;
    carpool.kill();

    scene.sim.clear_faults();
    let carpool = scene.start("100ms").await;
    assert_every_request_answered_once(&scene, &carpool, &sent).await;
    assert_eq!(
        scene.successful_calls("POST", "/v1/files"),
        2 * WINDOWS,
        "{dialect}: each window uploaded again after the restart"
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = window_inputs(&scene.sim).await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dialect}: orphaned input files at the provider: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The files at the simulator named as carpool window inputs.
async fn window_inputs(sim: &SimHandle) -> Vec<String> {
    let list: Value = client()
        .get(format!("{}/v1/files?purpose=batch", sim.base_url()))
        .bearer_auth(UPSTREAM_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["filename"].as_str())
        .filter(|name| name.starts_with("cpw_"))
        .map(str::to_owned)
        .collect()
}

in_both_dialects!(
    kill_while_the_upload_is_answered_then_restart_uploads_again_and_submits_once,
    while_the_upload_is_answered
);
in_both_dialects!(
    kill_midway_through_a_results_file_then_restart_stores_it_whole_and_answers_each_once,
    midway_through_a_results_file
);
in_both_dialects!(
    kill_after_acknowledgement_before_flush_then_restart_answers_each_request_once,
    after_acknowledgement_before_flush
);
in_both_dialects!(
    kill_after_upload_before_create_then_restart_answers_each_request_once,
    after_upload_before_create
);
in_both_dialects!(
    kill_after_create_before_the_job_id_is_stored_then_restart_adopts_the_job,
    after_create_before_the_job_id_is_stored
);
in_both_dialects!(
    kill_while_the_job_runs_then_restart_answers_each_request_once,
    while_the_job_runs
);
in_both_dialects!(
    kill_while_results_download_then_restart_answers_each_request_once,
    while_results_download
);
