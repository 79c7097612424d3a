//! Builds the shared state, serves, and shuts down. Owns the process
//! lifecycle: signal → stop accepting → bounded drain (`server.shutdown_grace`)
//! → tracked tasks joined. Does not own what any request does.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::StoreBackend;
use crate::config::{self, Config};
use crate::deferral::{flusher, Deferral};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::forward::ForwarderError;
use crate::proxy::health::Readiness;
use crate::proxy::Forwarder;
use crate::resolution::{deadline, janitor, poller, waiters};
use crate::store::{FlushReason, Store, StoreError};
use crate::webhooks::{self, Webhooks};

/// Everything a handler or worker needs: a cheap `Clone` of `Arc`s, built
/// once here. No globals.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub forwarder: Forwarder,
    pub readiness: Arc<Readiness>,
    /// The deferred path: store, batch clients, waiters, worker wake-ups.
    pub deferral: Deferral,
    /// Webhook deliveries (the outbox worker's handle).
    pub webhooks: Webhooks,
    /// Cancelled when the process should stop.
    pub shutdown: CancellationToken,
    /// Every background task, so shutdown can wait for them. Spawn through
    /// [`AppState::spawn`], never bare `tokio::spawn`.
    pub tasks: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Forwarder(#[from] ForwarderError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl AppState {
    /// Connects the store and builds everything; starts no task.
    pub async fn new(config: Config, shutdown: CancellationToken) -> Result<Self, AppError> {
        let store = Store::connect(&config.store.url).await?;
        let metrics = Arc::new(Metrics::with_models(config.named_models())?);
        let forwarder = Forwarder::new(&config.server, metrics.clone())?;
        let readiness = Arc::new(Readiness::new(
            forwarder.client().clone(),
            &config.upstreams,
        ));
        let config = Arc::new(config);
        let tasks = TaskTracker::new();
        let deferral = Deferral::new(
            config.clone(),
            store.clone(),
            forwarder.clone(),
            metrics.clone(),
            tasks.clone(),
        );
        let webhooks = Webhooks::new(
            config.clone(),
            store,
            metrics.clone(),
            deferral.waiters.stored().clone(),
        );
        Ok(Self {
            config,
            metrics,
            forwarder,
            deferral,
            webhooks,
            readiness,
            shutdown,
            tasks,
        })
    }

    /// Spawns a tracked background task; it should watch `self.shutdown`.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }
}

/// Serves on `listener` until `state.shutdown` is cancelled, then stops
/// accepting, lets in-flight calls (streams included) finish for up to
/// `server.shutdown_grace`, and waits for tracked tasks in the same budget.
pub async fn run(listener: TcpListener, state: AppState) -> std::io::Result<()> {
    let token = state.shutdown.clone();
    let grace = state.config.server.shutdown_grace;
    state.spawn(flusher::run(state.deferral.clone(), token.clone()));
    state.spawn(poller::run(state.deferral.clone(), token.clone()));
    state.spawn(deadline::run(state.deferral.clone(), token.clone()));
    state.spawn(janitor::run(state.deferral.clone(), token.clone()));
    state.spawn(waiters::follow_replicas(
        state.deferral.clone(),
        token.clone(),
    ));
    state.spawn(webhooks::worker::run(state.webhooks.clone(), token.clone()));
    let app = crate::server::router(state.clone());
    let server = crate::server::listen::serve(
        listener,
        app,
        token.clone(),
        crate::server::listen::Limits::of(&state.config.server),
    );
    let deadline = async {
        token.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = server => {}
        () = deadline => {
            tracing::warn!(grace = %humantime::format_duration(grace), "shutdown grace elapsed; dropping calls still in flight");
        }
    }
    // Open windows are sealed so nothing waits on a max_wait that no
    // process is counting; sealed windows are submitted on the way out if
    // the grace allows, else on the next start. On a shared Postgres store
    // the other replicas go on counting, so a replica leaving (a rolling
    // deploy) leaves the fleet's windows to them.
    let sealing = match state.config.store.backend {
        StoreBackend::Sqlite => flusher::seal_all(&state.deferral, FlushReason::Shutdown).await,
        StoreBackend::Postgres => Ok(0),
    };
    match sealing {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(windows = n, "sealed open windows for shutdown");
            if tokio::time::timeout(grace, flusher::submit_sealed(&state.deferral))
                .await
                .is_err()
            {
                tracing::warn!("sealed windows not all submitted before the grace ran out; the next start submits them");
            }
        }
        Err(err) => tracing::error!(error = %err, "could not seal open windows at shutdown"),
    }
    state.tasks.close();
    if tokio::time::timeout(grace, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not finish within the grace period");
    }
    // Work cut off by the grace (a submission retrying a failing upload,
    // say) leaves its lease behind; given up here, the next process takes
    // the window up at once instead of when the lease runs out.
    let deferral = &state.deferral;
    match deferral.store.release_leases_of(&deferral.instance).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(leases = n, "gave up the leases of work cut off by shutdown"),
        Err(err) => {
            tracing::warn!(error = %err, "could not give up leases at shutdown; they run out by themselves")
        }
    }
    Ok(())
}

/// Sets up the global tracing subscriber: `text` or `json` lines, filtered
/// by `RUST_LOG` (default `info`).
pub fn init_tracing(format: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let installed = match format {
        "json" => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        "text" => builder.try_init(),
        other => {
            return Err(format!(
                "unknown log format \"{other}\", expected text|json"
            ))
        }
    };
    installed.map_err(|e| e.to_string())
}

/// Cancels `token` on SIGTERM or Ctrl-C.
async fn watch_signals(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
        () = token.cancelled() => return,
    }
    token.cancel();
}

/// `carpool serve`.
pub async fn serve_cli(config_path: &Path, log_format: &str) -> ExitCode {
    if let Err(e) = init_tracing(log_format) {
        eprintln!("carpool: {e}");
        return ExitCode::FAILURE;
    }
    let config = match config::load(config_path) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("carpool: {} is not valid:", config_path.display());
            for p in err.problems() {
                eprintln!("  {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let listener = match TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.server.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let state = match AppState::new(config, shutdown.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    state.spawn(watch_signals(shutdown));
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let upstreams: Vec<&str> = state
        .config
        .upstreams
        .iter()
        .map(|u| u.name.as_str())
        .collect();
    tracing::info!(listen = %addr, upstreams = ?upstreams, "carpool listening");
    match run(listener, state).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
