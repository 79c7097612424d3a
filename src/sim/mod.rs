//! The simulated provider: all three batch dialects on one port, faults on demand.
//!
//! It owns an in-memory imitation of the Mistral and OpenAI APIs carpool
//! talks to (reference: `provider-apis.md`), used by tests, benches and
//! `carpool demo`. It does not own anything of carpool itself.
//!
//! - [`answers`]: the pure, deterministic answer to every synchronous body
//!   ([`expected_response`]).
//! - [`sync_api`]: chat (plain and SSE, with the stream gate), embeddings,
//!   FIM, moderations, completions, models.
//! - [`responses`]: OpenAI's Responses API, plain and as its event stream.
//! - [`files`]: the Files API shared by both dialects.
//! - [`jobs`]: the batch engine: validation, timeline, result files.
//! - [`mistral`] / [`openai`] / [`anthropic`]: each dialect's batch routes
//!   and shapes ([`anthropic`] also serves `/v1/messages`).
//! - [`faults`]: what can go wrong, and the book that hands it out.
//! - [`edge`]: faults, latency, bearer auth and the call log around `/v1`.
//! - [`control`]: the `/_sim/` JSON API mirroring [`SimHandle`].
//!
//! Start it in-process with [`spawn`] (port 0) or as `carpool sim --listen`
//! ([`serve_cli`]).

mod answers;
mod anthropic;
mod control;
mod edge;
mod error;
mod faults;
mod files;
mod jobs;
mod mistral;
mod openai;
mod quota;
mod responses;
mod state;
mod sync_api;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use answers::{canonical_hash, chat_stream_events, expected_response, token_estimate};
pub use anthropic::stream_events as messages_stream_events;
pub use control::OptionsPatch;
pub use faults::{Fault, JobOutcome};
pub use responses::stream_events as responses_stream_events;
pub use state::{CallRecord, JobRecord};

use error::ApiError;
use state::{lock, Sim};

/// How the simulator behaves. `Default` is fast: no latency, 50 ms jobs.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Added to every `/v1` response.
    pub latency: Duration,
    /// Processing time of a job: a quarter queued/validating, half running,
    /// a quarter finalizing.
    pub job_duration: Duration,
    /// Extra running time per line.
    pub line_duration: Duration,
    /// Time a cancelled job spends in CANCELLATION_REQUESTED / cancelling.
    pub cancel_duration: Duration,
    /// Delay before each streamed chunk after the first.
    pub chunk_delay: Duration,
    /// Requests per job above which the job fails (`too_many_tasks`).
    pub max_requests_per_job: usize,
    /// Inline Mistral `requests` above which create is refused (422).
    pub max_inline_requests: usize,
    /// Upload size above which `POST /v1/files` is refused (413).
    pub max_file_bytes: u64,
    /// Content chunks per streamed completion (then a final chunk and `[DONE]`).
    pub stream_chunks: usize,
    /// Faults active from the start.
    pub faults: Vec<Fault>,
    /// Keep a record of every call (turn off for long benchmarks).
    pub record_calls: bool,
    /// Input tokens (four bytes of each line's body) one key may have in
    /// unfinished jobs of one model; a create past it is refused with
    /// `token_limit_exceeded` (`sim::quota`). `None`: no limit.
    pub enqueued_token_limit: Option<u64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            job_duration: Duration::from_millis(50),
            line_duration: Duration::ZERO,
            cancel_duration: Duration::from_millis(20),
            chunk_delay: Duration::ZERO,
            max_requests_per_job: 50_000,
            max_inline_requests: 10_000,
            max_file_bytes: 512 * 1_000_000,
            stream_chunks: 4,
            faults: Vec::new(),
            record_calls: true,
            enqueued_token_limit: None,
        }
    }
}

/// A running simulator: its address, and the levers tests pull.
pub struct SimHandle {
    addr: SocketAddr,
    sim: Arc<Sim>,
    token: CancellationToken,
    tracker: TaskTracker,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`, without `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replace every active fault.
    pub fn set_faults(&self, faults: Vec<Fault>) {
        lock(&self.sim.faults).set(faults);
    }

    pub fn add_fault(&self, fault: Fault) {
        lock(&self.sim.faults).add(fault);
    }

    /// Clear every fault, let stuck jobs go on and held responses go.
    pub fn clear_faults(&self) {
        control::clear(&self.sim);
    }

    /// The faults still active (used-up ones are gone).
    pub fn faults(&self) -> Vec<Fault> {
        lock(&self.sim.faults).list()
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        lock(&self.sim.calls).clone()
    }

    pub fn clear_calls(&self) {
        lock(&self.sim.calls).clear();
    }

    /// Every job, brought up to now.
    pub fn jobs(&self) -> Vec<JobRecord> {
        control::job_records(&self.sim)
    }

    /// Creates refused so far for [`SimOptions::enqueued_token_limit`].
    pub fn quota_refusals(&self) -> u64 {
        self.sim
            .quota_refusals
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Leaves job `id` out of every job listing from now on (the listing
    /// lags or misses it); it can still be fetched, polled and cancelled.
    pub fn hide_from_listing(&self, id: &str) {
        lock(&self.sim.unlisted).insert(id.to_owned());
    }

    /// Make every pending job step due now (stuck jobs stay stuck).
    pub fn finish_jobs(&self) {
        control::finish(&self.sim);
    }

    /// How many responses [`Fault::HoldResponse`] is holding right now
    /// (their calls were handled and are in the call log).
    pub fn held_responses(&self) -> usize {
        self.sim.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Let every held response go (the fault stays for later calls).
    pub fn release_held(&self) {
        self.sim.release_held();
    }

    /// Streamed completions pause after their first event until released.
    pub fn hold_streams(&self) {
        self.sim.gate.send_replace(true);
    }

    pub fn release_streams(&self) {
        self.sim.gate.send_replace(false);
    }

    /// Change options at run time (new jobs and calls see the change).
    pub fn update_options(&self, f: impl FnOnce(&mut SimOptions)) {
        self.sim.update_opts(f);
    }

    /// Stop accepting, close every connection, and wait for them to end.
    pub async fn shutdown(self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Dropping the handle stops the server too.
impl Drop for SimHandle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Start on `127.0.0.1:0`.
pub async fn spawn(opts: SimOptions) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    spawn_on(listener, opts).await
}

/// Start on a listener the caller bound.
pub async fn spawn_on(listener: TcpListener, opts: SimOptions) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let sim = Sim::new(opts);
    let app = router(Arc::clone(&sim));
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(accept_loop(listener, app, token.clone(), tracker.clone()));
    Ok(SimHandle {
        addr,
        sim,
        token,
        tracker,
    })
}

/// `carpool sim --listen ADDR`. Prints `carpool sim listening on URL`, runs
/// until SIGINT/SIGTERM. `CARPOOL_SIM_OPTIONS` (an [`OptionsPatch`] as JSON)
/// and `CARPOOL_SIM_FAULTS` (a JSON list of [`Fault`]) set it up at start.
pub async fn serve_cli(listen: SocketAddr) -> ExitCode {
    let mut opts = SimOptions::default();
    if let Ok(raw) = std::env::var("CARPOOL_SIM_OPTIONS") {
        match serde_json::from_str::<OptionsPatch>(&raw) {
            Ok(patch) => patch.apply(&mut opts),
            Err(err) => {
                eprintln!("carpool sim: CARPOOL_SIM_OPTIONS is not valid: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Ok(raw) = std::env::var("CARPOOL_SIM_FAULTS") {
        match serde_json::from_str::<Vec<Fault>>(&raw) {
            Ok(faults) => opts.faults = faults,
            Err(err) => {
                eprintln!("carpool sim: CARPOOL_SIM_FAULTS is not valid: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(err) => {
            eprintln!("carpool sim: cannot listen on {listen}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match spawn_on(listener, opts).await {
        Ok(h) => h,
        Err(err) => {
            eprintln!("carpool sim: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("carpool sim listening on {}", handle.base_url());
    let _ = std::io::stdout().flush();
    wait_for_signal().await;
    handle.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn router(sim: Arc<Sim>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(sync_api::chat))
        .route("/v1/embeddings", post(sync_api::answer))
        .route("/v1/fim/completions", post(sync_api::answer))
        .route("/v1/moderations", post(sync_api::answer))
        .route("/v1/chat/moderations", post(sync_api::answer))
        .route("/v1/completions", post(sync_api::answer))
        .route("/v1/responses", post(responses::handler))
        .route("/v1/models", get(sync_api::models))
        .route("/v1/models/{model_id}", get(sync_api::model))
        .route("/v1/files", post(files::upload).get(files::list))
        .route(
            "/v1/files/{file_id}",
            get(files::retrieve).delete(files::delete),
        )
        .route("/v1/files/{file_id}/content", get(files::content))
        .route("/v1/batches", post(openai::create).get(openai::list))
        .route("/v1/batches/{batch_id}", get(openai::get))
        .route("/v1/batches/{batch_id}/cancel", post(openai::cancel))
        .route("/v1/batch/jobs", post(mistral::create).get(mistral::list))
        .route(
            "/v1/batch/jobs/{job_id}",
            get(mistral::get).delete(mistral::delete),
        )
        .route("/v1/batch/jobs/{job_id}/cancel", post(mistral::cancel))
        .route("/v1/messages", post(anthropic::messages))
        .route(
            "/v1/messages/batches",
            post(anthropic::create).get(anthropic::list),
        )
        .route("/v1/messages/batches/{batch_id}", get(anthropic::get))
        .route(
            "/v1/messages/batches/{batch_id}/cancel",
            post(anthropic::cancel),
        )
        .route(
            "/v1/messages/batches/{batch_id}/results",
            get(anthropic::results),
        )
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown route",
            )
            .code("unknown_url")
        })
        // Uploads are capped by `max_file_bytes` while streaming instead.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&sim),
            edge::edge,
        ));
    v1.merge(control::routes()).with_state(sim)
}

/// The error that makes hyper close a connection without answering.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by a simulated fault")
    }
}

impl std::error::Error for Dropped {}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors and the like: let others finish.
                    tracing::warn!(%err, "sim: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let token = token.clone();
        tracker.spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        let response = app.oneshot(req.map(Body::new)).await;
                        let response = match response {
                            Ok(r) => r,
                            Err(never) => match never {},
                        };
                        if response
                            .extensions()
                            .get::<edge::DropConnection>()
                            .is_some()
                        {
                            return Err(Dropped);
                        }
                        Ok::<_, Dropped>(response)
                    }
                });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = token.cancelled() => {}
            }
        });
    }
}
