//! Replicas sharing one store: a window on its way to a job is worked on by
//! one process at a time, and a caller held on one replica is answered as
//! soon as another stores its result (Postgres).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use carpool::app::AppState;
use carpool::deferral::engine::now_ms;
use carpool::deferral::flusher;
use carpool::model::ServedBy;
use carpool::model::WindowId;
use carpool::resolution::fallback::{self, Candidate, FallbackReason};
use carpool::resolution::poller;
use carpool::sim::{self, Fault, SimHandle, SimOptions};
use carpool::store::{FlushReason, Lease, Resolution, ResolvedStatus, WindowLimits, WindowState};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{metric, metrics, post_chat, TestApp, PATIENCE};
use tokio_util::sync::CancellationToken;

/// A replica that shares nothing with the others but the store, and runs no
/// background task, so the test decides who submits. The uploads and jobs
/// are the simulator's, over HTTP.
async fn replica(sim: &SimHandle, db: &str) -> AppState {
    let toml = SimConfig::new("openai", sim)
        .batching("max_wait = \"1h\"")
        .toml();
    let vars = BTreeMap::from([
        ("UPSTREAM_KEY".to_owned(), "sk-upstream".to_owned()),
        ("CARPOOL_STORE__URL".to_owned(), db.to_owned()),
    ]);
    let config = carpool::config::from_toml_str(&toml, &vars).unwrap();
    AppState::new(config, CancellationToken::new())
        .await
        .unwrap()
}

/// One stored request in a window of its own, sealed; returns the window.
async fn sealed_window(state: &AppState, model: &str) -> WindowId {
    let store = &state.deferral.store;
    let limits = WindowLimits {
        max_requests: 100,
        max_bytes: 1_000_000,
    };
    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
    let accepted = store
        .accept(support::async_request(model, body, limits))
        .await
        .unwrap();
    let window = accepted.record.window_id.unwrap();
    assert!(store
        .seal_window(&window, FlushReason::Operator, now_ms())
        .await
        .unwrap());
    window
}

fn uploads(sim: &SimHandle) -> usize {
    sim.calls()
        .iter()
        .filter(|c| c.method == "POST" && c.route == "/v1/files")
        .count()
}

#[tokio::test]
async fn a_window_another_replica_is_submitting_is_left_to_it() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/carpool.db", dir.path().display());
    let mine = replica(&sim, &db).await;
    let theirs = replica(&sim, &db).await;
    assert_ne!(mine.deferral.instance, theirs.deferral.instance);
    let store = &mine.deferral.store;

    // Sealed, and leased by the other replica (as while it uploads): this
    // one uploads nothing and creates nothing.
    let sealed = sealed_window(&mine, "m-sealed").await;
    let now = now_ms();
    assert!(theirs
        .deferral
        .store
        .claim_lease(
            &Lease::Window(sealed.clone()),
            &theirs.deferral.instance,
            now,
            now + 60_000
        )
        .await
        .unwrap());
    let record = store.window(&sealed).await.unwrap().unwrap();
    assert!(!flusher::submit_leased(&mine.deferral, record)
        .await
        .unwrap());
    assert_eq!(uploads(&sim), 0);
    assert!(sim.jobs().is_empty());

    // In `creating` under the other replica's lease: its create call may be
    // on its way, so this one must not adopt the window and create a
    // second job (what it did before leases, finding no job yet).
    let creating = sealed_window(&mine, "m-creating").await;
    let theirs_store = &theirs.deferral.store;
    assert!(theirs_store
        .claim_lease(
            &Lease::Window(creating.clone()),
            &theirs.deferral.instance,
            now,
            now + 60_000
        )
        .await
        .unwrap());
    assert!(theirs_store
        .record_upload(&creating, "file-of-theirs")
        .await
        .unwrap());
    assert!(theirs_store.mark_creating(&creating).await.unwrap());
    let record = store.window(&creating).await.unwrap().unwrap();
    assert_eq!(record.state, WindowState::Creating);
    assert!(!flusher::submit_leased(&mine.deferral, record)
        .await
        .unwrap());
    assert!(sim.jobs().is_empty());
    assert!(sim.calls().iter().all(|c| c.method != "POST"));

    // Once the other replica gives the sealed window up, this one submits
    // it: one upload, one job, and its own lease given up.
    assert!(theirs_store
        .release_lease(&Lease::Window(sealed.clone()), &theirs.deferral.instance)
        .await
        .unwrap());
    let record = store.window(&sealed).await.unwrap().unwrap();
    assert!(flusher::submit_leased(&mine.deferral, record)
        .await
        .unwrap());
    assert_eq!(uploads(&sim), 1);
    assert_eq!(sim.jobs().len(), 1);
    let submitted = store.window(&sealed).await.unwrap().unwrap();
    assert_eq!(submitted.state, WindowState::Submitted);

    // Its job, polled and reconciled by the other replica (lease held):
    // this one does not ask the provider about it, let alone reconcile it.
    let now = now_ms();
    assert!(theirs_store
        .claim_lease(
            &Lease::Window(sealed.clone()),
            &theirs.deferral.instance,
            now,
            now + 60_000
        )
        .await
        .unwrap());
    let job_polls = || {
        sim.calls()
            .iter()
            .filter(|c| c.method == "GET" && c.route.starts_with("/v1/batches/"))
            .count()
    };
    assert!(!poller::poll_leased(&mine.deferral, submitted.clone())
        .await
        .unwrap());
    assert_eq!(job_polls(), 0);
    // Given up: this one polls it.
    assert!(theirs_store
        .release_lease(&Lease::Window(sealed.clone()), &theirs.deferral.instance)
        .await
        .unwrap());
    assert!(poller::poll_leased(&mine.deferral, submitted)
        .await
        .unwrap());
    assert_eq!(job_polls(), 1);
}

async fn until<T, F>(what: &str, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request another replica is sending realtime (its deadline came, or
/// its batch failed) is not sent again by this one.
#[tokio::test]
async fn a_request_another_replica_is_sending_realtime_is_left_to_it() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/carpool.db", dir.path().display());
    let mine = replica(&sim, &db).await;
    let theirs = replica(&sim, &db).await;
    let window = sealed_window(&mine, "m-realtime").await;
    let store = &mine.deferral.store;
    let id = store
        .open_request_ids(&window)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let upstream = mine.deferral.upstream("sim").unwrap();
    let candidate = || Candidate {
        id: &id,
        upstream,
        endpoint: "/v1/chat/completions",
        model: "m-realtime",
        key: Some("sk-upstream"),
        reason: FallbackReason::Deadline,
        context: "test",
    };
    let realtime_calls = || {
        sim.calls()
            .iter()
            .filter(|c| c.method == "POST" && c.route == "/v1/chat/completions")
            .count()
    };
    let now = now_ms();
    let theirs_store = &theirs.deferral.store;
    assert!(theirs_store
        .claim_lease(
            &Lease::Request(id.clone()),
            &theirs.deferral.instance,
            now,
            now + 60_000
        )
        .await
        .unwrap());
    assert!(!fallback::realtime(&mine.deferral, candidate())
        .await
        .unwrap());
    assert_eq!(realtime_calls(), 0);
    assert!(store.is_open(&id).await.unwrap());

    // Given up unanswered (the other replica failed): this one sends it.
    assert!(theirs_store
        .release_lease(&Lease::Request(id.clone()), &theirs.deferral.instance)
        .await
        .unwrap());
    assert!(fallback::realtime(&mine.deferral, candidate())
        .await
        .unwrap());
    assert_eq!(realtime_calls(), 1);
    assert!(!store.is_open(&id).await.unwrap());
}

/// A caller held on replica A; replica B stores its result (as when B
/// downloads a job's output, or answers by the realtime fallback). A hears
/// of it through Postgres and answers at once, well before the 15 s at
/// which a held call re-reads the store on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_held_on_one_replica_is_answered_when_another_stores_its_result() {
    if support::pg::skipped() {
        return;
    }
    let schema = support::pg::Schema::create().await;
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let toml = SimConfig::new("openai", &sim)
        .batching("max_wait = \"1h\"")
        .toml();
    let url = schema.url();
    let vars = [
        ("UPSTREAM_KEY", "sk-upstream"),
        ("CARPOOL_STORE__URL", url.as_str()),
    ];
    let a = TestApp::start(&toml, &vars).await;
    let b = TestApp::start(&toml, &vars).await;
    for replica in [&a, &b] {
        until("the replica to listen", || async {
            (metric(&metrics(replica).await, "carpool_replicas_listening") == 1.0).then_some(())
        })
        .await;
    }

    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let answer = json!({"id": "chatcmpl-b", "object": "chat.completion", "choices": []});
    let held = async {
        let resp = post_chat(&a, "sk-caller", &[("carpool-mode", "wait")], &body).await;
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap(), Instant::now())
    };
    let store = &b.state.deferral.store;
    let elsewhere = async {
        let id = until("the held call to be stored", || async {
            let window = store.open_windows().await.unwrap().into_iter().next()?;
            store
                .open_request_ids(&window.id)
                .await
                .unwrap()
                .into_iter()
                .next()
        })
        .await;
        let stored_at = Instant::now();
        assert!(store
            .resolve_one(Resolution {
                id,
                status: ResolvedStatus::Succeeded,
                served_by: Some(ServedBy::Realtime),
                response_status: Some(200),
                response_body: Some(Bytes::from(answer.to_string())),
                error_code: None,
                error_message: None,
                completed_at: now_ms(),
                charge: None,
            })
            .await
            .unwrap());
        stored_at
    };
    let ((status, got, answered_at), stored_at) = tokio::join!(held, elsewhere);
    assert_eq!(status, 200);
    assert_eq!(got, answer);
    let waited = answered_at - stored_at;
    assert!(
        waited < Duration::from_secs(10),
        "answered {waited:?} after another replica stored the result: by re-reading, not by hearing of it"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A process shutting down while its submission of a window is still
/// retrying a failing upload (cut off by the grace) gives up the window's
/// lease on the way out: the next process, a restart or another replica,
/// takes the window up at once instead of when the lease runs out.
#[tokio::test]
async fn a_graceful_shutdown_leaves_no_lease_behind() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    sim.add_fault(Fault::status("POST /v1/files", 500, 0));
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/carpool.db", dir.path().display());
    let toml = SimConfig::new("openai", &sim)
        .server("shutdown_grace = \"200ms\"")
        .batching("max_wait = \"1h\"")
        .toml();
    let vars = [
        ("UPSTREAM_KEY", "sk-upstream"),
        ("CARPOOL_STORE__URL", db.as_str()),
    ];
    let first = TestApp::start(&toml, &vars).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_chat(&first, "sk-caller", &[("carpool-mode", "async")], &body).await;
    assert_eq!(resp.status(), 202);
    first.stop().await.unwrap();
    assert!(uploads(&sim) > 0, "the shutdown tried to submit the window");

    let next = replica(&sim, &db).await;
    let store = &next.deferral.store;
    let sealed = store.windows_in(&[WindowState::Sealed]).await.unwrap();
    assert_eq!(sealed.len(), 1, "{sealed:?}");
    let now = now_ms();
    assert!(
        store
            .claim_lease(
                &Lease::Window(sealed[0].id.clone()),
                &next.deferral.instance,
                now,
                now + 10_000
            )
            .await
            .unwrap(),
        "the window is still leased by the process that shut down"
    );
}

/// Review L3: a job created for a window that already has one is
/// cancelled. This replica's create call is answered late (held at the
/// provider); meanwhile another replica, taking the window over as one
/// does after a lease ran out, looks the job up, does not find it (the
/// provider's listing misses it) and creates a second one, recorded
/// first. The late answer's job is then surplus: cancelled at once, so
/// one job stays live and the request is answered once, from it.
#[tokio::test]
async fn a_job_created_for_a_window_that_already_has_one_is_cancelled() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/carpool.db", dir.path().display());
    let mine = replica(&sim, &db).await;
    let theirs = replica(&sim, &db).await;
    let store = &mine.deferral.store;
    let limits = WindowLimits {
        max_requests: 100,
        max_bytes: 1_000_000,
    };
    let body = r#"{"model":"m","messages":[{"role":"user","content":"once"}]}"#;
    let accepted = store
        .accept(support::async_request("m", body.to_owned(), limits))
        .await
        .unwrap();
    let request = accepted.record.id.clone();
    let window = accepted.record.window_id.clone().unwrap();
    assert!(store
        .seal_window(&window, FlushReason::Operator, now_ms())
        .await
        .unwrap());

    sim.add_fault(Fault::hold_response("POST /v1/batches", 1));
    let record = store.window(&window).await.unwrap().unwrap();
    let submitting = {
        let deferral = mine.deferral.clone();
        tokio::spawn(async move { flusher::submit_leased(&deferral, record).await })
    };
    let first = until("the first job created, its answer held", || async {
        (sim.held_responses() == 1 && sim.jobs().len() == 1).then(|| sim.jobs()[0].id.clone())
    })
    .await;
    sim.hide_from_listing(&first);

    // The other replica, as after a lease it took over: finds the window
    // `creating`, no job in the listing, and creates and records its own.
    let record = store.window(&window).await.unwrap().unwrap();
    assert_eq!(record.state, WindowState::Creating);
    let stale = record.clone();
    flusher::submit(&theirs.deferral, record).await.unwrap();
    let recorded = store.window(&window).await.unwrap().unwrap();
    assert_eq!(recorded.state, WindowState::Submitted);
    let second = recorded.job_id.clone().unwrap();
    assert_ne!(second, first);

    // The late answer arrives: its job is refused by the store, cancelled.
    sim.release_held();
    assert!(submitting.await.unwrap().unwrap());
    let status = |id: &str| {
        sim.jobs()
            .into_iter()
            .find(|j| j.id == id)
            .map(|j| j.status)
            .unwrap()
    };
    let cancel_calls = sim
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.route == "/v1/batches/{batch_id}/cancel")
        .map(|c| c.job_id.clone())
        .collect::<Vec<_>>();
    assert_eq!(
        cancel_calls,
        vec![Some(first.clone())],
        "the surplus job, cancelled"
    );
    until("the surplus job cancelled", || async {
        (status(&first) == "cancelled").then_some(())
    })
    .await;
    assert_ne!(status(&second), "cancelled", "the recorded job stays live");

    // A record read before the lease, saying `creating`, is read again
    // under it: the window has its job, nothing is looked up or created.
    let creates = || {
        sim.calls()
            .iter()
            .filter(|c| c.method == "POST" && c.route == "/v1/batches")
            .count()
    };
    let before = creates();
    assert!(flusher::submit_leased(&mine.deferral, stale).await.unwrap());
    assert_eq!(creates(), before);
    assert_eq!(sim.jobs().len(), 2);

    // Answered once, from the recorded job.
    sim.finish_jobs();
    let record = store.window(&window).await.unwrap().unwrap();
    assert!(poller::poll_leased(&theirs.deferral, record).await.unwrap());
    let answered = store.request_by_id(&request).await.unwrap().unwrap();
    assert_eq!(answered.status, carpool::model::RequestStatus::Succeeded);
    assert_eq!(answered.batch_id.as_deref(), Some(second.as_str()));
    assert_eq!(answered.served_by, Some(ServedBy::Batch));
    let live: Vec<_> = sim
        .jobs()
        .into_iter()
        .filter(|j| j.status != "cancelled")
        .map(|j| j.id)
        .collect();
    assert_eq!(live, vec![second]);
}
