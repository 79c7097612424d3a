//! `carpool demo`: the embedded defaults end to end, in one process.
//!
//! It starts the simulated provider and carpool (config `config/demo.toml`,
//! embedded; SQLite in a temporary directory), sends a burst of deferred chat
//! calls over three models (one per upstream dialect) and three opt-in styles
//! (plus a few whose deadline no batch can meet, answered by flex),
//! prints progress on stderr while the windows fill and the jobs run, and
//! returns a [`DemoSummary`]: requests, answers checked against the
//! provider's own, batch jobs per model, turnaround, and the realtime versus
//! batch cost. It owns no part of carpool itself; it is carpool's first user.
//!
//! - [`traffic`]: the plan of calls and how each style sends one.
//! - [`tally`]: folding outcomes, joined with the provider's job record.
//! - [`summary`]: the result and its plain-text form.
//! - [`cost`]: token usage times the price table (pure).

pub use crate::pricing as cost;
pub mod summary;
pub mod tally;
pub mod traffic;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppError, AppState};
use crate::config::{self, ConfigError};
use crate::sim::{self, SimOptions};

pub use cost::{Cost, TokenUsage};
pub use summary::{DemoSummary, ModelSummary, StyleSummary};
pub use traffic::{Style, MODELS};

/// The demo's config. Base URLs and the store URL are replaced at start.
pub const CONFIG: &str = include_str!("../../config/demo.toml");

/// The key the demo's callers present to carpool.
const CREDENTIAL: &str = "sk-carpool-demo-caller";
/// carpool's own key for the simulated provider (`api_key_env` in the config).
const UPSTREAM_KEY_VAR: &str = "CARPOOL_DEMO_UPSTREAM_KEY";
const UPSTREAM_KEY: &str = "sk-simulated-provider";

/// What to send and how the simulated provider behaves.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Deferred calls to send, spread over [`MODELS`] and the styles of
    /// [`Style::ALL`].
    pub requests: usize,
    /// Calls sent first, besides `requests`, whose deadline no batch can
    /// meet ([`Style::NearDeadline`]): the OpenAI upstream answers them by
    /// flex.
    pub near_deadline: usize,
    /// Most calls in flight at once (a held call keeps its slot until answered).
    pub concurrency: usize,
    /// Most handle polls in flight at once, besides the calls.
    pub poll_concurrency: usize,
    /// How long the simulated provider takes per batch job.
    pub job_duration: Duration,
    /// Extra job time per line.
    pub line_duration: Duration,
    /// Added to every simulated provider response.
    pub provider_latency: Duration,
    /// Calls still unanswered after this long count as failures.
    pub deadline: Duration,
    /// A progress line on stderr about every second.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            requests: 300,
            near_deadline: 6,
            concurrency: 50,
            poll_concurrency: 10,
            job_duration: Duration::from_millis(1500),
            line_duration: Duration::from_millis(2),
            provider_latency: Duration::from_millis(20),
            deadline: Duration::from_secs(50),
            progress: true,
        }
    }
}

/// Why the demo could not run at all (a call that fails is counted, not this).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the simulated provider: {0}")]
    Sim(#[source] std::io::Error),
    #[error("cannot create a temporary directory for the store: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("the embedded demo config is invalid: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(#[source] std::io::Error),
    #[error("cannot start carpool: {0}")]
    App(#[from] AppError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// `carpool demo`: runs with the defaults, prints the summary on stdout, and
/// exits 0 only when every call got its own answer. `RUST_LOG` turns on
/// carpool's log lines (stderr).
pub async fn cli() -> ExitCode {
    // carpool's own log lines only on request (`RUST_LOG=info`), so the
    // progress and the summary stay readable.
    if std::env::var_os("RUST_LOG").is_some() {
        let installed = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
        if let Err(err) = installed {
            eprintln!("carpool demo: cannot set up logging: {err}");
        }
    }
    match run_demo(DemoOptions::default()).await {
        Ok(summary) => {
            print!("{summary}");
            let _ = std::io::stdout().flush();
            if summary.all_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("carpool demo: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the whole demo in this process and returns what happened.
pub async fn run_demo(options: DemoOptions) -> Result<DemoSummary, DemoError> {
    let provider = sim::spawn(SimOptions {
        latency: options.provider_latency,
        job_duration: options.job_duration,
        line_duration: options.line_duration,
        ..SimOptions::default()
    })
    .await
    .map_err(DemoError::Sim)?;
    let dir = tempfile::tempdir().map_err(DemoError::TempDir)?;
    let vars = overrides(&provider.base_url(), &dir.path().join("carpool.db"));
    let config = config::from_toml_str(CONFIG, &vars)?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Listen)?;
    let addr = listener.local_addr().map_err(DemoError::Listen)?;
    let shutdown = CancellationToken::new();
    let state = AppState::new(config, shutdown.clone()).await?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(DemoError::Client)?;
    if options.progress {
        eprintln!(
            "carpool demo: provider (simulated) at {}, carpool at http://{addr}; sending {} deferred calls, at most {} (and {} polls) at a time",
            provider.base_url(),
            options.requests + options.near_deadline,
            options.concurrency,
            options.poll_concurrency
        );
    }
    let caller = traffic::Caller {
        client,
        base_url: format!("http://{addr}"),
        credential: CREDENTIAL.to_owned(),
        in_flight: Semaphore::new(options.concurrency.max(1)),
        polls: Semaphore::new(options.poll_concurrency.max(1)),
        deadline: Instant::now() + options.deadline,
        answered: AtomicUsize::new(0),
    };
    let demo = async {
        let summary = drive(&options, &caller, &state, &provider).await;
        shutdown.cancel();
        summary
    };
    // The summary stands whatever the drain reports.
    let (_served, summary) = tokio::join!(app::run(listener, state.clone()), demo);
    provider.shutdown().await;
    // The store's folder goes only after carpool has stopped.
    drop(dir);
    Ok(summary)
}

/// Sends every call, shows progress until the last answer, and tallies.
async fn drive(
    options: &DemoOptions,
    caller: &traffic::Caller,
    state: &AppState,
    provider: &sim::SimHandle,
) -> DemoSummary {
    let started = Instant::now();
    let total = options.requests + options.near_deadline;
    // The near-deadline calls first: before any job has finished, the
    // configured turnaround is what carpool plans with.
    let plan = traffic::near_deadline_calls(options.near_deadline)
        .into_iter()
        .chain(traffic::plan(options.requests));
    let calls = join_all(plan.map(|call| caller.run(call)));
    tokio::pin!(calls);
    let mut ticker = tokio::time::interval_at(
        Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let outcomes = loop {
        tokio::select! {
            outcomes = &mut calls => break outcomes,
            _ = ticker.tick(), if options.progress => {
                eprintln!("{}", progress_line(started.elapsed(), total, &caller.answered, state));
            }
        }
    };
    let elapsed = started.elapsed();
    let mut tally = tally::Tally::default();
    for outcome in &outcomes {
        tally.record(outcome);
    }
    let flushes = by_label(&state.metrics.flushes, "reason");
    tally.summarize(
        &provider.jobs(),
        &state.config.prices,
        flushes.into_iter().collect(),
        elapsed,
    )
}

/// The environment the embedded config sees: the addresses it cannot know,
/// and the upstream key. Nothing is read from the process environment.
fn overrides(provider_url: &str, db: &std::path::Path) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert(UPSTREAM_KEY_VAR.to_owned(), UPSTREAM_KEY.to_owned());
    vars.insert(
        "CARPOOL_STORE__URL".to_owned(),
        format!("sqlite://{}", db.display()),
    );
    for i in 0..MODELS.len() {
        vars.insert(
            format!("CARPOOL_UPSTREAMS__{i}__BASE_URL"),
            provider_url.to_owned(),
        );
    }
    vars
}

fn progress_line(
    elapsed: Duration,
    requests: usize,
    answered: &AtomicUsize,
    state: &AppState,
) -> String {
    let accepted: u64 = by_label(&state.metrics.deferred_accepted, "outcome")
        .get("new")
        .copied()
        .unwrap_or(0);
    let jobs = by_label(&state.metrics.batch_jobs, "status");
    let submitted = jobs.get("submitted").copied().unwrap_or(0);
    let finished: u64 = jobs
        .iter()
        .filter(|(status, _)| status.as_str() != "submitted")
        .map(|(_, n)| n)
        .sum();
    format!(
        "  {:>5.1}s  accepted {accepted:>4}/{requests}  answered {:>4}/{requests}  batch jobs {submitted} submitted, {finished} finished",
        elapsed.as_secs_f64(),
        answered.load(Ordering::Relaxed),
    )
}

/// A counter family summed by the values of one label.
fn by_label(counter: &IntCounterVec, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for family in counter.collect() {
        for metric in family.get_metric() {
            let Some(pair) = metric.get_label().iter().find(|p| p.name() == label) else {
                continue;
            };
            // Counters hold whole numbers; the f64 is exact below 2^53.
            let value = metric.get_counter().get_value() as u64;
            *out.entry(pair.value().to_owned()).or_default() += value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_is_valid_with_the_demo_overrides() {
        let vars = overrides("http://127.0.0.1:1", std::path::Path::new("/tmp/x.db"));
        let config = config::from_toml_str(CONFIG, &vars).unwrap();
        assert_eq!(config.store.url, "sqlite:///tmp/x.db");
        for (model, upstream) in MODELS {
            let routed = config.route(Some(model));
            assert_eq!(routed.name, upstream);
            assert_eq!(routed.base_url.as_str(), "http://127.0.0.1:1/");
            assert!(
                config.prices.for_model(model).is_some(),
                "{model} has a price"
            );
        }
    }

    #[test]
    fn by_label_sums_a_counter_family_per_label_value() {
        let counter =
            IntCounterVec::new(prometheus::Opts::new("t_total", "t"), &["reason", "x"]).unwrap();
        counter.with_label_values(&["a", "1"]).inc_by(2);
        counter.with_label_values(&["a", "2"]).inc_by(3);
        counter.with_label_values(&["b", "1"]).inc();
        let sums = by_label(&counter, "reason");
        assert_eq!(sums.get("a"), Some(&5));
        assert_eq!(sums.get("b"), Some(&1));
        assert!(by_label(&counter, "missing").is_empty());
    }
}
