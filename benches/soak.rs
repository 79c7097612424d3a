//! The soak: a long run of deferred calls through the release binary and
//! the simulator, with carpool restarted (SIGTERM, then started again on
//! the same store) every tenth of the calls, on the embedded SQLite store
//! and on Postgres. Every `CARPOOL_SOAK_SAMPLE_SECS` (60) it records
//! carpool's RSS, the store's size on disk and its request rows; at the end
//! it waits for every request to be answered and for `results_ttl` to
//! purge them, and checks that the store shrank back to what the TTL keeps
//! and that memory returned to its idle baseline.
//!
//! ```sh
//! cargo bench --bench soak                                 # 1,000,000 calls per store
//! CARPOOL_SOAK_CALLS=200000 CARPOOL_SOAK_STORE=sqlite cargo bench --bench soak
//! ```
//!
//! Postgres is the local test database (127.0.0.1:5432, `test`), in a
//! schema of the run's own, dropped at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::Connection;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const KEY: &str = "sk-soak";
const ADMIN: &str = "admin-soak";
const PG: &str = "postgres://postgres@127.0.0.1:5432/test";
const RESULTS_TTL_SECS: u64 = 60;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where a run keeps its requests.
#[derive(Clone)]
enum Backend {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Backend {
    fn url(&self) -> String {
        match self {
            Self::Sqlite(db) => format!("sqlite://{}", db.display()),
            Self::Postgres(schema) => format!("{PG}?options=-c%20search_path%3D{schema}"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Bytes on disk: SQLite's three files, or the schema's relations.
    async fn size(&self) -> Res<u64> {
        match self {
            Self::Sqlite(db) => Ok(["", "-wal", "-shm"]
                .iter()
                .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
                .map(|m| m.len())
                .sum()),
            Self::Postgres(schema) => {
                let mut conn = sqlx::PgConnection::connect(PG).await?;
                let size: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(SUM(pg_total_relation_size(c.oid)) AS BIGINT) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relkind IN ('r', 'm')",
                )
                .bind(schema)
                .fetch_one(&mut conn)
                .await?;
                let _ = conn.close().await;
                Ok(u64::try_from(size.unwrap_or(0)).unwrap_or(0))
            }
        }
    }
}

struct Carpool {
    child: Child,
    url: String,
}

impl Drop for Carpool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start(dir: &Path, backend: &Backend, sim: &str, http: &reqwest::Client) -> Res<Carpool> {
    let port = free_port()?;
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_token = \"{ADMIN}\"\n\
             shutdown_grace = \"10s\"\n\n\
             [store]\nurl = \"{}\"\n\n\
             [[upstreams]]\nname = \"sim\"\ndialect = \"openai\"\nbase_url = \"{sim}\"\n\
             auth = \"managed\"\napi_key_env = \"SOAK_UPSTREAM_KEY\"\n\n\
             [batching]\nmax_wait = \"500ms\"\nmax_requests = 5000\npoll_interval = \"200ms\"\n\
             results_ttl = \"{RESULTS_TTL_SECS}s\"\nmax_pending = 1000000\n\
             max_pending_per_client = 1000000\n",
            backend.url()
        ),
    )?;
    let log = std::fs::File::create(dir.join(format!("soak-{}.log", backend.name())))?;
    let child = Command::new(env!("CARGO_BIN_EXE_carpool"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("SOAK_UPSTREAM_KEY", "sk-upstream")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()?;
    let carpool = Carpool {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{}/healthz", carpool.url)).send().await {
            if r.status().is_success() {
                return Ok(carpool);
            }
        }
        if Instant::now() > deadline {
            return Err("carpool did not become healthy".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM and wait for the exit: the graceful restart an operator does.
fn stop(mut carpool: Carpool) -> Res<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(carpool.child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    carpool.child.wait()?;
    Ok(())
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `GET /admin/requests`: stored requests per status.
async fn counts(http: &reqwest::Client, url: &str) -> Res<Value> {
    Ok(http
        .get(format!("{url}/admin/requests"))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?)
}

fn open(counts: &Value) -> u64 {
    ["queued", "submitted"]
        .iter()
        .map(|s| counts["by_status"][s].as_u64().unwrap_or(0))
        .sum()
}

struct Sample {
    at: Duration,
    sent: u64,
    rss: f64,
    store_mib: f64,
    rows: u64,
}

struct Figures {
    backend: &'static str,
    calls: u64,
    restarts: u32,
    secs: f64,
    idle_rss: f64,
    peak_rss: f64,
    end_rss: f64,
    peak_store: f64,
    end_store: f64,
    end_rows: u64,
    failed: u64,
}

async fn soak(backend: Backend, dir: &Path, sim: &str, calls: u64, segments: u64) -> Res<Figures> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(128)
        .timeout(Duration::from_secs(60))
        .build()?;
    let conns: usize = env_or("CARPOOL_SOAK_CONNS", 64);
    let sample_every = Duration::from_secs(env_or("CARPOOL_SOAK_SAMPLE_SECS", 60));
    let mut carpool = start(dir, &backend, sim, &http).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_mib(carpool.child.id());
    let pid = Arc::new(AtomicU32::new(carpool.child.id()));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = started;
    let mut restarts = 0;
    let mut failed = 0;
    let per_segment = calls.div_ceil(segments);
    for segment in 0..segments {
        let from = segment * per_segment;
        let to = (from + per_segment).min(calls);
        let url = carpool.url.clone();
        let mut stream = futures_util::stream::iter(from..to)
            .map(|i| {
                let http = http.clone();
                let url = url.clone();
                async move {
                    let body = json!({
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": format!("soak {i}")}],
                        "max_tokens": 8,
                    });
                    http.post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(KEY)
                        .header("carpool-mode", "async")
                        .json(&body)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0)
                }
            })
            .buffer_unordered(conns);
        while let Some(status) = stream.next().await {
            if status != 202 {
                failed += 1;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            if Instant::now() >= next_sample {
                next_sample += sample_every;
                let rows = counts(&http, &carpool.url)
                    .await
                    .map_or(0, |c| c["total"].as_u64().unwrap_or(0));
                samples.push(Sample {
                    at: started.elapsed(),
                    sent: sent.load(Ordering::Relaxed),
                    rss: rss_mib(pid.load(Ordering::Relaxed)),
                    store_mib: backend.size().await? as f64 / 1048576.0,
                    rows,
                });
            }
        }
        drop(stream);
        if segment + 1 < segments {
            stop(carpool)?;
            carpool = start(dir, &backend, sim, &http).await?;
            pid.store(carpool.child.id(), Ordering::Relaxed);
            restarts += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // Every request answered, then purged by the TTL.
    let drain = Instant::now();
    loop {
        let c = counts(&http, &carpool.url).await?;
        if open(&c) == 0 {
            failed += c["by_status"]["failed"].as_u64().unwrap_or(0)
                + c["by_status"]["expired"].as_u64().unwrap_or(0);
            break;
        }
        if drain.elapsed() > Duration::from_secs(600) {
            return Err(format!("requests still open after 10 min: {c}").into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut peak_store = samples.iter().map(|s| s.store_mib).fold(0.0, f64::max);
    peak_store = peak_store.max(backend.size().await? as f64 / 1048576.0);
    tokio::time::sleep(Duration::from_secs(
        RESULTS_TTL_SECS + RESULTS_TTL_SECS / 10 + 5,
    ))
    .await;
    let end_rows = counts(&http, &carpool.url).await?["total"]
        .as_u64()
        .unwrap_or(0);
    let end_rss = rss_mib(carpool.child.id());
    let end_store = backend.size().await? as f64 / 1048576.0;
    println!(
        "\n{}: samples (every {} s)",
        backend.name(),
        sample_every.as_secs()
    );
    println!("| at s | calls sent | carpool RSS MiB | store MiB | request rows |");
    println!("|---|---|---|---|---|");
    for s in &samples {
        println!(
            "| {:.0} | {} | {:.1} | {:.1} | {} |",
            s.at.as_secs_f64(),
            s.sent,
            s.rss,
            s.store_mib,
            s.rows
        );
    }
    stop(carpool)?;
    Ok(Figures {
        backend: backend.name(),
        calls,
        restarts,
        secs,
        idle_rss,
        peak_rss: samples.iter().map(|s| s.rss).fold(0.0, f64::max),
        end_rss,
        peak_store,
        end_store,
        end_rows,
        failed,
    })
}

#[tokio::main]
async fn main() -> Res<()> {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let calls: u64 = env_or("CARPOOL_SOAK_CALLS", 1_000_000);
    let segments: u64 = env_or("CARPOOL_SOAK_RESTARTS", 9u64) + 1;
    let stores = std::env::var("CARPOOL_SOAK_STORE").unwrap_or_else(|_| "both".to_owned());
    let sim = carpool::sim::spawn(carpool::sim::SimOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let mut figures = Vec::new();
    if stores != "postgres" {
        let db = dir.path().join("soak.db");
        figures.push(
            soak(
                Backend::Sqlite(db),
                dir.path(),
                &sim.base_url(),
                calls,
                segments,
            )
            .await?,
        );
    }
    if stores != "sqlite" {
        let schema = format!("soak_{}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(PG).await?;
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&mut conn)
            .await?;
        let _ = conn.close().await;
        let result = soak(
            Backend::Postgres(schema.clone()),
            dir.path(),
            &sim.base_url(),
            calls,
            segments,
        )
        .await;
        let mut conn = sqlx::PgConnection::connect(PG).await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&mut conn)
            .await?;
        figures.push(result?);
    }
    println!("\n| store | calls | restarts | calls/s | idle RSS | peak RSS | RSS after purge | peak store | store after purge | rows after purge | failed |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &figures {
        println!(
            "| {} | {} | {} | {:.0} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {} |",
            f.backend,
            f.calls,
            f.restarts,
            f.calls as f64 / f.secs,
            f.idle_rss,
            f.peak_rss,
            f.end_rss,
            f.peak_store,
            f.end_store,
            f.end_rows,
            f.failed
        );
    }
    Ok(())
}
