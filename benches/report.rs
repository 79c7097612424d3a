//! The performance report: every figure beside its baseline, measured in one
//! run on this machine, printed as one table.
//!
//! ```text
//! cargo install oha --locked      # the load generator (once)
//! apt-get install wrk             # the intake's closed-loop generator (once)
//! apt-get install nginx           # the reverse-proxy anchor of the pass-through (once)
//! cargo bench --bench report
//! ```
//!
//! What runs where. `carpool sim` and `carpool serve` (the release binary
//! cargo builds for this bench) run as separate processes, each with
//! `TOKIO_WORKER_THREADS=1`. With two or more CPUs and `taskset` present,
//! carpool is pinned to one CPU and the simulator plus the load generator
//! (oha, `--worker-threads 1`) and this
//! driver to the other, so the proxy never competes with the load it is
//! measured under, and the direct baseline runs with the very same pinning
//! (its load generator and simulator on the same single CPU).
//!
//! Sections (`CARPOOL_BENCH_ONLY=passthrough,streams,held,intake,flush,fanout`
//! picks some):
//! 1. passthrough: oha at fixed rates (`-q`, latency corrected for
//!    coordinated omission), then wrk at full speed, against the sim
//!    directly, through carpool and through nginx as a reverse proxy
//!    (pinned like carpool, kept-alive upstream), alternating.
//! 2. streams: streamed completions (sim `chunk_delay`), time to first event
//!    and gap between events, direct and through carpool.
//! 3. held: RSS of carpool holding 10,000 and 50,000 wait-mode callers
//!    (raw loopback sockets from 127.0.0.2-9, windows that never fill).
//! 4. intake: wrk sends async calls as fast as they are answered (two
//!    timed runs, one window each), acceptances/s (each one committed to
//!    SQLite before its 202) with 64 and 256 connections, pinned and then
//!    with carpool and wrk sharing both cores, and RSS once 100,000 or more
//!    are pending.
//! 5. flush: time from the call that fills a window to its job existing,
//!    and the peak RSS growth meanwhile (VmHWM reset through clear_refs),
//!    for a 10,000- and a 50,000-line window.
//! 6. fanout: one 100,000-line job; results resolved per second from the
//!    moment the sim reports it done until carpool has stored every result,
//!    beside the same file downloaded and parsed with nothing stored; with
//!    carpool pinned to one CPU, then free on both (nothing else runs).
//!
//! Tunables: `CARPOOL_BENCH_RUNS` (3; medians are reported),
//! `CARPOOL_BENCH_SECS` (3, per pass-through point), `CARPOOL_BENCH_RATES`
//! (`500,1000,2000,4000,8000,12000,16000,20000`), `CARPOOL_BENCH_INTAKE_CONNS`
//! (`64,256`: the intake's connection counts), `CARPOOL_BENCH_CPUS` (`0,1`: the
//! proxy's CPU, then the load's), `CARPOOL_BENCH_INTAKE_SECS` (3, per timed
//! intake run), `OHA` and `WRK` (paths of the load generators),
//! `CARPOOL_BENCH_LOG` (carpool's `RUST_LOG`, default `warn`),
//! `CARPOOL_BENCH_BIN` (another carpool binary to measure, say an earlier
//! build kept for a before-and-after run; default the one cargo built).
//! The table is printed on stdout; progress goes to stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const KEY: &str = "sk-bench";
const CHAT_BODY: &str = r#"{"model":"sim-small","messages":[{"role":"user","content":"benchmark question: how many lanes does a carpool lane have?"}],"max_tokens":64}"#;

// ---------------------------------------------------------------- settings

struct Settings {
    runs: usize,
    secs: u64,
    rates: Vec<u32>,
    /// Connections the intake section sends with, one row each.
    intake_conns: Vec<usize>,
    /// Seconds of each of the intake's two timed wrk runs.
    intake_secs: u64,
    only: Option<Vec<String>>,
    /// (proxy CPU, load CPU) when pinning is possible.
    cpus: Option<(usize, usize)>,
    /// Set while a section runs carpool and the load unpinned, carpool
    /// with a worker thread per CPU: every core shared by all.
    shared: std::cell::Cell<bool>,
    /// CPUs this process could use at start: where an unpinned child runs.
    all_cpus: Vec<usize>,
    /// Open descriptors this process (and so each child) may have.
    fd_limit: u64,
    oha: Option<PathBuf>,
    /// The closed-loop generator for the intake's maximum rate.
    wrk: Option<PathBuf>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_env() -> Res<Self> {
        let rates = std::env::var("CARPOOL_BENCH_RATES")
            .unwrap_or_else(|_| "500,1000,2000,4000,8000,12000,16000,20000".to_owned())
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        let intake_conns = std::env::var("CARPOOL_BENCH_INTAKE_CONNS")
            .unwrap_or_else(|_| "64,256".to_owned())
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        let only = std::env::var("CARPOOL_BENCH_ONLY")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
        let all_cpus = own_cpus();
        let cpus = pinning(&all_cpus);
        Ok(Self {
            runs: env_or("CARPOOL_BENCH_RUNS", 3usize).max(1),
            secs: env_or("CARPOOL_BENCH_SECS", 3u64).max(1),
            rates,
            intake_conns,
            intake_secs: env_or("CARPOOL_BENCH_INTAKE_SECS", 3u64).max(1),
            only,
            cpus,
            shared: std::cell::Cell::new(false),
            all_cpus,
            fd_limit: raise_fd_limit(120_000),
            oha: find_oha(),
            wrk: find_wrk(),
            bin: std::env::var_os("CARPOOL_BENCH_BIN").map_or_else(
                || PathBuf::from(env!("CARGO_BIN_EXE_carpool")),
                PathBuf::from,
            ),
            dir: tempfile::tempdir()?,
        })
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .map_or(true, |o| o.iter().any(|s| s == section))
    }

    fn proxy_cpu(&self) -> Option<usize> {
        self.cpus.filter(|_| !self.shared.get()).map(|c| c.0)
    }

    fn load_cpu(&self) -> Option<usize> {
        self.cpus.filter(|_| !self.shared.get()).map(|c| c.1)
    }

    /// carpool's worker threads: one on its pinned CPU, else one per CPU.
    fn proxy_threads(&self) -> String {
        match self.proxy_cpu() {
            Some(_) => "1".to_owned(),
            None => self.all_cpus.len().to_string(),
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_oha() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OHA") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    which("oha").or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let p = home.join("bin").join("oha");
        p.is_file().then_some(p)
    })
}

/// A load generator a section needs.
#[derive(Clone, Copy)]
enum Tool {
    /// Fixed rates, latency percentiles, counted sends.
    Oha,
    /// The closed loops: intake, pass-through at full speed (see [`wrk`]).
    Wrk,
}

impl Tool {
    fn found(self, s: &Settings) -> bool {
        match self {
            Tool::Oha => s.oha.is_some(),
            Tool::Wrk => s.wrk.is_some(),
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Tool::Oha => "the load generator oha was not found (install it with `cargo install oha --locked`, or set OHA=/path/to/oha)",
            Tool::Wrk => "the load generator wrk was not found (install Debian's package with `apt-get install wrk`, or set WRK=/path/to/wrk)",
        }
    }
}

fn find_wrk() -> Option<PathBuf> {
    match std::env::var_os("WRK") {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => which("wrk"),
    }
}

/// (proxy CPU, load CPU): `CARPOOL_BENCH_CPUS`, else the first two of
/// `own`; none without taskset or a second CPU.
fn pinning(own: &[usize]) -> Option<(usize, usize)> {
    which("taskset")?;
    if let Ok(v) = std::env::var("CARPOOL_BENCH_CPUS") {
        let mut it = v.split(',').filter_map(|c| c.trim().parse().ok());
        return Some((it.next()?, it.next()?));
    }
    match own {
        [proxy, load, ..] => Some((*proxy, *load)),
        _ => None,
    }
}

/// The CPUs this process may run on (CPU 0 alone if the kernel will not
/// say).
fn own_cpus() -> Vec<usize> {
    let cpus: Vec<usize> = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect()
        })
        .unwrap_or_default();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

impl Settings {
    /// `program` on `cpu`, or on every CPU this run may use when `None`.
    /// The driver pins itself to the load's CPU, and a child inherits its
    /// parent's CPUs: without taskset's list, an unpinned child would
    /// share the driver's one CPU.
    fn command(&self, program: &Path, cpu: Option<usize>) -> Command {
        let cpus = match (cpu, self.cpus) {
            (Some(cpu), _) => Some(cpu.to_string()),
            (None, Some(_)) => Some(
                self.all_cpus
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (None, None) => None,
        };
        match cpus {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(list).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// Lifts the descriptor limit so 50,000 held sockets fit on both ends
/// (children inherit it).
fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

// ---------------------------------------------------------------- processes

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status_kb(&self, field: &str) -> Res<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("{} has no {field}", self.name).into())
    }

    fn rss_mib(&self) -> Res<f64> {
        Ok(self.status_kb("VmRSS")? as f64 / 1024.0)
    }

    fn peak_mib(&self) -> Res<f64> {
        Ok(self.status_kb("VmHWM")? as f64 / 1024.0)
    }

    /// Resets VmHWM to the current RSS.
    fn reset_peak(&self) -> Res<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")?;
        Ok(())
    }
}

/// CPU time (user + system, seconds) a process's threads have used,
/// summed by what the thread is (see [`thread_kind`]). A thread that ended
/// in between takes its time with it, which only tokio's blocking threads
/// do here.
#[derive(Clone, Debug, Default)]
struct ThreadCpu(BTreeMap<&'static str, f64>);

impl ThreadCpu {
    fn of(proc: &Proc) -> Res<Self> {
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
            .ok_or("the clock tick rate is unknown")? as f64;
        let mut by_kind = BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", proc.pid()))? {
            let task = task?;
            let main = task.file_name().to_str() == Some(&proc.pid().to_string());
            // Gone since the listing: nothing to add.
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            // `pid (name) state …`: the name may hold spaces, not `)`+space.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // utime and stime, fields 14 and 15 of the line.
            let ticks: u64 = fields
                .get(11..13)
                .ok_or("a thread's stat line is short")?
                .iter()
                .map(|f| f.parse::<u64>())
                .sum::<Result<u64, _>>()?;
            let kind = if main {
                "main"
            } else {
                thread_kind(&stat[open + 1..close])
            };
            *by_kind.entry(kind).or_default() += ticks as f64 / per_second;
        }
        Ok(Self(by_kind))
    }

    /// Microseconds of CPU per unit of work between `self` and `later`.
    fn per(&self, later: &Self, units: f64) -> Self {
        Self(
            later
                .0
                .iter()
                .map(|(kind, t)| (*kind, 1e6 * (t - self.0.get(kind).unwrap_or(&0.0)) / units))
                .collect(),
        )
    }

    /// Each kind's median over `runs`.
    fn median(runs: &[Self]) -> Self {
        let mut kinds: Vec<&'static str> = runs.iter().flat_map(|r| r.0.keys().copied()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        Self(
            kinds
                .into_iter()
                .map(|k| {
                    let v: Vec<f64> = runs
                        .iter()
                        .map(|r| r.0.get(k).copied().unwrap_or(0.0))
                        .collect();
                    (k, median(&v))
                })
                .collect(),
        )
    }

    /// `runtime 10.2 + writer 13.1 + … = 30.3 µs`, kinds under 0.05 left out.
    fn show(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|(_, t)| **t >= 0.05)
            .map(|(kind, t)| format!("{kind} {t:.1}"))
            .collect();
        format!(
            "{} = {:.1} µs",
            parts.join(" + "),
            self.0.values().sum::<f64>()
        )
    }
}

/// What a thread of carpool's is, from the name the kernel keeps of it
/// (15 bytes); the main thread is told by its id.
fn thread_kind(name: &str) -> &'static str {
    match name {
        n if n.starts_with("tokio-r") => "runtime",
        n if n.starts_with("carpool-sqlite") => "writer",
        n if n.starts_with("sqlx-sqlite") => "sqlx",
        _ => "other",
    }
}

impl Proc {
    /// SIGTERM, then wait for the exit (SIGKILL after `grace`).
    fn stop(mut self, grace: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
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

struct Sim {
    proc: Proc,
    url: String,
}

fn start_sim(s: &Settings) -> Res<Sim> {
    let port = free_port()?;
    let mut cmd = s.command(&s.bin, s.load_cpu());
    cmd.arg("sim")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("TOKIO_WORKER_THREADS", "1")
        .env("RUST_LOG", "warn")
        .env(
            "CARPOOL_SIM_OPTIONS",
            json!({"record_calls": false, "max_requests_per_job": 100_000}).to_string(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("sim: no stdout")?;
    let proc = Proc { child, name: "sim" };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("carpool sim listening on ")
        .ok_or_else(|| format!("sim did not start: {line:?}"))?
        .to_owned();
    Ok(Sim { proc, url })
}

struct Carpool {
    proc: Proc,
    url: String,
}

/// Starts `carpool serve` in front of the sim with these batching settings.
async fn start_carpool(
    s: &Settings,
    http: &reqwest::Client,
    sim: &Sim,
    name: &str,
    batching: &str,
) -> Res<Carpool> {
    start_carpool_on(s, http, sim, name, batching, false).await
}

/// `restart`: keep the store a previous instance of `name` left.
async fn start_carpool_on(
    s: &Settings,
    http: &reqwest::Client,
    sim: &Sim,
    name: &str,
    batching: &str,
    restart: bool,
) -> Res<Carpool> {
    let port = free_port()?;
    let config = s.dir.path().join(format!("{name}.toml"));
    let db = s.dir.path().join(format!("{name}.db"));
    if !restart {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
    }
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"1s\"\n\n\
             [store]\nurl = \"sqlite://{}\"\n\n\
             [[upstreams]]\nname = \"sim\"\ndialect = \"mistral\"\nbase_url = \"{}\"\n\
             auth = \"managed\"\napi_key_env = \"CARPOOL_BENCH_SIM_KEY\"\n\n\
             [batching]\n{batching}\n",
            db.display(),
            sim.url
        ),
    )?;
    let log = std::fs::File::create(s.dir.path().join(format!("{name}.log")))?;
    let mut cmd = s.command(&s.bin, s.proxy_cpu());
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .env("TOKIO_WORKER_THREADS", s.proxy_threads())
        .env(
            "RUST_LOG",
            std::env::var("CARPOOL_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .env("CARPOOL_BENCH_SIM_KEY", KEY)
        .stdout(log.try_clone()?)
        .stderr(log);
    let proc = Proc {
        child: cmd.spawn()?,
        name: "carpool",
    };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(format!("carpool did not become healthy; see {name}.log").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Carpool { proc, url })
}

/// Sum of every series of a metric family.
async fn metric(http: &reqwest::Client, base: &str, family: &str, filter: &str) -> Res<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Polls until `family` (filtered) reaches `at_least`, every `every`.
async fn wait_metric(
    http: &reqwest::Client,
    base: &str,
    family: &str,
    filter: &str,
    at_least: f64,
    every: Duration,
    timeout: Duration,
) -> Res<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if metric(http, base, family, filter).await? >= at_least {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!("{family}{{{filter}}} did not reach {at_least}").into());
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------- oha

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    ok: usize,
    n: usize,
}

/// `n` deferred calls (`Carpool-Mode: async`) over `conns` connections;
/// an error unless every one was accepted with a 202.
fn send_async(
    s: &Settings,
    section: &str,
    url: &str,
    body: &str,
    n: usize,
    conns: usize,
) -> Res<Load> {
    let l = oha(
        s,
        url,
        None,
        Some(n),
        conns,
        body,
        &["Carpool-Mode: async"],
        202,
    )?;
    if l.ok != n {
        return Err(format!("{section}: only {} of {n} calls got 202", l.ok).into());
    }
    Ok(l)
}

/// One oha run; `rate` None is full speed, `n` a count instead of the
/// configured duration.
#[allow(clippy::too_many_arguments)]
fn oha(
    s: &Settings,
    url: &str,
    rate: Option<u32>,
    n: Option<usize>,
    conns: usize,
    body: &str,
    headers: &[&str],
    expect: u16,
) -> Res<Load> {
    let oha = s.oha.as_ref().ok_or("oha not found")?;
    let mut cmd = s.command(oha, s.load_cpu());
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "--worker-threads",
        "1",
    ])
    .args(["-c", &conns.to_string(), "-m", "POST", "-d", body])
    .args(["-H", &format!("Authorization: Bearer {KEY}")])
    .args(["-H", "Content-Type: application/json"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    match n {
        Some(n) => cmd.args(["-n", &n.to_string()]),
        None => cmd.args(["-z", &format!("{}s", s.secs), "-w"]),
    };
    if let Some(rate) = rate {
        cmd.args(["-q", &rate.to_string(), "--latency-correction"]);
    }
    cmd.arg(url).stdin(Stdio::null()).stderr(Stdio::null());
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("oha failed: {}", String::from_utf8_lossy(&out.stdout)).into());
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let codes = v["statusCodeDistribution"]
        .as_object()
        .ok_or("oha: no status codes")?;
    let n: usize = codes.values().filter_map(Value::as_u64).sum::<u64>() as usize;
    let ok = codes
        .get(&expect.to_string())
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    Ok(Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: v["latencyPercentiles"]["p50"].as_f64().unwrap_or(f64::NAN) * 1e3,
        p99_ms: v["latencyPercentiles"]["p99"].as_f64().unwrap_or(f64::NAN) * 1e3,
        ok,
        n,
    })
}

// ---------------------------------------------------------------- wrk

/// What one closed-loop run did.
struct Closed {
    /// Calls answered with a status below 400.
    calls: u64,
    secs: f64,
    /// Answers of 400 or more, and connect, read, write or timeout errors.
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Closed {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }

    /// As the pass-through rows read a run.
    fn load(&self) -> Load {
        Load {
            rps: self.rate(),
            p50_ms: self.p50_ms,
            p99_ms: self.p99_ms,
            ok: usize::try_from(self.calls).unwrap_or(usize::MAX),
            n: usize::try_from(self.calls + self.errors).unwrap_or(usize::MAX),
        }
    }
}

/// One wrk run: `conns` connections on one thread for `secs` seconds, each
/// sending its next call as soon as the last is answered (a closed loop),
/// so the rate is whatever the server sustains. oha at full speed is the
/// same loop, but spends twice wrk's CPU per call, taken from carpool
/// wherever the two share a CPU.
fn wrk(
    s: &Settings,
    url: &str,
    secs: u64,
    conns: usize,
    body: &str,
    headers: &[(&str, &str)],
) -> Res<Closed> {
    let wrk = s.wrk.as_ref().ok_or("wrk not found")?;
    if body.contains("]==]") {
        return Err("wrk: the body cannot be quoted as a Lua long string".into());
    }
    let bearer = format!("Bearer {KEY}");
    let mut lua = format!("wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\n");
    for (name, value) in [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ]
    .iter()
    .chain(headers)
    {
        lua += &format!("wrk.headers[\"{name}\"] = \"{value}\"\n");
    }
    // wrk's summary, on one line this driver reads back.
    lua += "done = function(summary, latency, requests)\n\
            \x20 local e = summary.errors\n\
            \x20 io.write(string.format(\"carpool-bench %d %d %d %d %d %d\\n\", summary.requests, \
            summary.duration, e.status, e.connect + e.read + e.write + e.timeout, \
            latency:percentile(50), latency:percentile(99)))\n\
            end\n";
    let script = s.dir.path().join("wrk.lua");
    std::fs::write(&script, lua)?;
    let out = s
        .command(wrk, s.load_cpu())
        .args([
            "-t",
            "1",
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
        ])
        .arg("-s")
        .arg(&script)
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("wrk failed: {stdout}").into());
    }
    let summary: Vec<f64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("carpool-bench "))
        .ok_or_else(|| format!("wrk: no summary in its output: {stdout}"))?
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [requests, micros, refused, broken, p50_us, p99_us] = summary[..] else {
        return Err(format!("wrk: unexpected summary in {stdout}").into());
    };
    // Counts, as wrk printed them with %d.
    let count = |v: f64| v as u64;
    Ok(Closed {
        calls: count(requests).saturating_sub(count(refused)),
        secs: micros / 1e6,
        errors: count(refused) + count(broken),
        p50_ms: p50_us / 1e3,
        p99_ms: p99_us / 1e3,
    })
}

// ---------------------------------------------------------------- table

struct Row {
    section: &'static str,
    measure: String,
    carpool: String,
    baseline: String,
    target: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        section: &'static str,
        measure: impl Into<String>,
        carpool: impl Into<String>,
        baseline: impl Into<String>,
        target: impl Into<String>,
        met: Option<bool>,
    ) {
        let row = Row {
            section,
            measure: measure.into(),
            carpool: carpool.into(),
            baseline: baseline.into(),
            target: target.into(),
            met,
        };
        eprintln!(
            "  {} | {} | {} | {}",
            row.measure, row.carpool, row.baseline, row.target
        );
        self.rows.push(row);
    }

    fn print(&self, s: &Settings) {
        let date = Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let cpus = s.all_cpus.len();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        println!();
        println!(
            "carpool performance report, {date}, {cpus} CPUs, load average at the end {} (other tenants), medians of {} runs, pinning: {}",
            load.join(" "),
            s.runs,
            match s.cpus {
                Some((p, l)) => format!("carpool on CPU {p}, sim + load generator on CPU {l}"),
                None => "none".to_owned(),
            }
        );
        println!();
        println!("| section | measure | carpool | baseline | target | met |");
        println!("|---|---|---|---|---|---|");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                r.section, r.measure, r.carpool, r.baseline, r.target, met
            );
        }
        for n in &self.notes {
            println!("\n{n}");
        }
        let _ = std::io::stdout().flush();
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(v: f64) -> String {
    format!("{v:.3} ms")
}

// ---------------------------------------------------------------- 1. passthrough

/// nginx as a plain reverse proxy to the sim: what an operator would
/// otherwise put in front of an API. Pinned like carpool, one worker per
/// CPU it may use, kept-alive upstream connections, no access log.
struct Nginx {
    proc: Proc,
    url: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too (SIGKILL would
        // orphan them).
        if let Ok(pid) = i32::try_from(self.proc.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.proc.child.wait();
    }
}

fn find_nginx() -> Option<PathBuf> {
    which("nginx").or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.exists()))
}

fn start_nginx(s: &Settings, sim: &Sim) -> Res<Option<Nginx>> {
    let Some(nginx) = find_nginx() else {
        return Ok(None);
    };
    let port = free_port()?;
    let dir = s.dir.path().join("nginx");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let upstream = sim.url.trim_start_matches("http://");
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         upstream sim {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n\
         location / {{\n      proxy_pass http://sim;\n      proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
        workers = s.proxy_threads(),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = s.command(&nginx, s.proxy_cpu());
    cmd.arg("-e")
        .arg(dir.join("error.log"))
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Proc {
        child: cmd.spawn()?,
        name: "nginx",
    };
    let nginx = Nginx {
        proc,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("nginx did not listen; see {d}/error.log").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(nginx))
}

async fn passthrough(
    s: &Settings,
    http: &reqwest::Client,
    sim: &Sim,
    report: &mut Report,
) -> Res<()> {
    eprintln!("== pass-through");
    let carpool = start_carpool(s, http, sim, "passthrough", "max_wait = \"1h\"").await?;
    let direct_url = format!("{}/v1/chat/completions", sim.url);
    let proxy_url = format!("{}/v1/chat/completions", carpool.url);
    let conns = 32;
    let nginx = start_nginx(s, sim)?;
    let nginx_url = nginx
        .as_ref()
        .map(|n| format!("{}/v1/chat/completions", n.url));
    if nginx.is_none() {
        report
            .notes
            .push("pass-through: no nginx-proxy row (apt-get install nginx)".to_owned());
    }
    // Warm both paths (connections, allocator).
    for url in [&direct_url, &proxy_url] {
        oha(s, url, None, Some(5_000), conns, CHAT_BODY, &[], 200)?;
    }
    let mut max_nginx = Vec::new();
    // rate → (direct runs, carpool runs)
    let mut points: BTreeMap<u32, (Vec<Load>, Vec<Load>)> = BTreeMap::new();
    let mut max_direct = Vec::new();
    let mut max_proxy = Vec::new();
    for run in 0..s.runs {
        eprintln!(" run {}/{}", run + 1, s.runs);
        for &rate in &s.rates {
            let d = oha(s, &direct_url, Some(rate), None, conns, CHAT_BODY, &[], 200)?;
            let c = oha(s, &proxy_url, Some(rate), None, conns, CHAT_BODY, &[], 200)?;
            eprintln!(
                "  {rate}/s: direct {:.0}/s p50 {:.3} p99 {:.3} | carpool {:.0}/s p50 {:.3} p99 {:.3}",
                d.rps, d.p50_ms, d.p99_ms, c.rps, c.p50_ms, c.p99_ms
            );
            let e = points.entry(rate).or_default();
            e.0.push(d);
            e.1.push(c);
        }
        // Full speed is a closed loop: wrk, at half oha's cost per call
        // (see `wrk`) on the CPU it shares with the sim.
        let d = wrk(s, &direct_url, s.secs, conns, CHAT_BODY, &[])?.load();
        let c = wrk(s, &proxy_url, s.secs, conns, CHAT_BODY, &[])?.load();
        eprintln!("  max: direct {:.0}/s | carpool {:.0}/s", d.rps, c.rps);
        if let Some(url) = &nginx_url {
            let n = wrk(s, url, s.secs, conns, CHAT_BODY, &[])?.load();
            eprintln!("  max: nginx-proxy {:.0}/s p99 {:.3}", n.rps, n.p99_ms);
            max_nginx.push(n);
        }
        max_direct.push(d);
        max_proxy.push(c);
    }
    let field = |v: &[Load], f: fn(&Load) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let mut sustained: Option<u32> = None;
    let mut broken = false;
    for (rate, (d, c)) in &points {
        let added_p50 = median(
            &d.iter()
                .zip(c)
                .map(|(d, c)| c.p50_ms - d.p50_ms)
                .collect::<Vec<_>>(),
        );
        let added_p99 = median(
            &d.iter()
                .zip(c)
                .map(|(d, c)| c.p99_ms - d.p99_ms)
                .collect::<Vec<_>>(),
        );
        let errors = c.iter().chain(d.iter()).any(|l| l.ok < l.n);
        let c_rps = field(c, |l| l.rps);
        let d_rps = field(d, |l| l.rps);
        let kept_up = c_rps >= 0.95 * f64::from(*rate) && !errors;
        // The highest rate up to which every rate tried held the bound.
        if kept_up && added_p99 < 1.0 {
            if !broken {
                sustained = Some(*rate);
            }
        } else {
            broken = true;
        }
        report.row(
            "pass-through",
            format!("{rate} req/s: throughput"),
            format!("{c_rps:.0}/s"),
            format!("{d_rps:.0}/s"),
            "",
            None,
        );
        report.row(
            "pass-through",
            format!("{rate} req/s: p50 / p99 latency"),
            format!(
                "{} / {}",
                ms(field(c, |l| l.p50_ms)),
                ms(field(c, |l| l.p99_ms))
            ),
            format!(
                "{} / {}",
                ms(field(d, |l| l.p50_ms)),
                ms(field(d, |l| l.p99_ms))
            ),
            "",
            None,
        );
        let at_target = *rate == 2_000;
        report.row(
            "pass-through",
            format!("{rate} req/s: added p50 / p99"),
            format!("{} / {}", ms(added_p50), ms(added_p99)),
            "0",
            if at_target { "p99 < 1 ms" } else { "" },
            at_target.then_some(added_p99 < 1.0 && kept_up),
        );
    }
    let (cm, dm) = (field(&max_proxy, |l| l.rps), field(&max_direct, |l| l.rps));
    // Each run measures direct and then carpool back to back, so a run's
    // ratio compares the two under the same machine speed; the medians of
    // each side may come from different runs (and speeds).
    let ratios: Vec<f64> = max_proxy
        .iter()
        .zip(&max_direct)
        .map(|(c, d)| c.rps / d.rps)
        .collect();
    let ratio = median(&ratios);
    let by_run = ratios
        .iter()
        .map(|r| format!("{:.0}%", 100.0 * r))
        .collect::<Vec<_>>()
        .join(", ");
    report.row(
        "pass-through",
        format!("max throughput ({conns} connections)"),
        format!(
            "{cm:.0}/s; {:.0}% of direct, median of the runs' ratios ({by_run}); medians' ratio {:.0}%",
            100.0 * ratio,
            100.0 * cm / dm
        ),
        format!("{dm:.0}/s"),
        "≥ 80% of direct",
        Some(ratio >= 0.8),
    );
    report.row(
        "pass-through",
        "max throughput: p50 / p99 latency",
        format!(
            "{} / {}",
            ms(field(&max_proxy, |l| l.p50_ms)),
            ms(field(&max_proxy, |l| l.p99_ms))
        ),
        format!(
            "{} / {}",
            ms(field(&max_direct, |l| l.p50_ms)),
            ms(field(&max_direct, |l| l.p99_ms))
        ),
        "",
        None,
    );
    if !max_nginx.is_empty() {
        let nm = field(&max_nginx, |l| l.rps);
        report.row(
            "pass-through",
            format!("nginx reverse proxy, max throughput ({conns} connections): p50 / p99"),
            format!(
                "{nm:.0}/s: {} / {}",
                ms(field(&max_nginx, |l| l.p50_ms)),
                ms(field(&max_nginx, |l| l.p99_ms))
            ),
            format!("{dm:.0}/s direct"),
            "",
            None,
        );
        // Per run, carpool and nginx measured back to back.
        let per_run = |f: fn(&Load) -> f64| {
            median(
                &max_proxy
                    .iter()
                    .zip(&max_nginx)
                    .map(|(c, n)| f(c) / f(n))
                    .collect::<Vec<_>>(),
            )
        };
        let (throughput, p99) = (per_run(|l| l.rps), per_run(|l| l.p99_ms));
        report.row(
            "pass-through",
            "carpool / nginx-proxy: throughput, p99",
            format!("{:.0}%, {p99:.2}x", 100.0 * throughput),
            "nginx-proxy, same run",
            "≥ 90%, p99 ≤ 1.1x",
            Some(throughput >= 0.9 && p99 <= 1.1),
        );
    }
    report.row(
        "pass-through",
        "highest rate with p99 added < 1 ms",
        sustained.map_or("below the lowest rate".to_owned(), |r| format!("{r} req/s")),
        format!("rates tried: {:?}", s.rates),
        "≥ 2000 req/s",
        Some(sustained.is_some_and(|r| r >= 2_000)),
    );
    drop(carpool);
    Ok(())
}

// ---------------------------------------------------------------- 2. streams

/// Time to first event and gaps between events of one streamed completion.
async fn one_stream(http: &reqwest::Client, url: &str) -> Res<(f64, Vec<f64>)> {
    let body = json!({
        "model": "sim-small",
        "stream": true,
        "messages": [{"role": "user", "content": "stream benchmark"}],
    });
    let start = Instant::now();
    let mut resp = http
        .post(url)
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut buf = Vec::new();
    let mut times = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let now = start.elapsed().as_secs_f64() * 1e3;
        let before = count_events(&buf);
        buf.extend_from_slice(&chunk);
        for _ in before..count_events(&buf) {
            times.push(now);
        }
    }
    let first = *times.first().ok_or("stream had no event")?;
    let gaps = times.windows(2).map(|w| w[1] - w[0]).collect();
    Ok((first, gaps))
}

fn count_events(buf: &[u8]) -> usize {
    buf.windows(2).filter(|w| w == b"\n\n").count()
}

async fn streams(s: &Settings, http: &reqwest::Client, sim: &Sim, report: &mut Report) -> Res<()> {
    eprintln!("== streams");
    let chunk_delay_ms = 5;
    http.patch(format!("{}/_sim/options", sim.url))
        .json(&json!({"chunk_delay_ms": chunk_delay_ms, "stream_chunks": 8}))
        .send()
        .await?
        .error_for_status()?;
    let carpool = start_carpool(s, http, sim, "streams", "max_wait = \"1h\"").await?;
    let direct_url = format!("{}/v1/chat/completions", sim.url);
    let proxy_url = format!("{}/v1/chat/completions", carpool.url);
    let per_run = 100;
    let mut ttfe = (Vec::new(), Vec::new());
    let mut gap = (Vec::new(), Vec::new());
    let mut ttfe_added_p50 = Vec::new();
    let mut ttfe_added_p99 = Vec::new();
    let mut gap_added = Vec::new();
    for _ in 0..3 {
        one_stream(http, &direct_url).await?;
        one_stream(http, &proxy_url).await?;
    }
    for run in 0..s.runs {
        let (mut dt, mut ct, mut dg, mut cg) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..per_run {
            let (t, g) = one_stream(http, &direct_url).await?;
            dt.push(t);
            dg.extend(g);
            let (t, g) = one_stream(http, &proxy_url).await?;
            ct.push(t);
            cg.extend(g);
        }
        for v in [&mut dt, &mut ct, &mut dg, &mut cg] {
            v.sort_by(f64::total_cmp);
        }
        eprintln!(
            " run {}/{}: first event direct {:.3} carpool {:.3}; gap direct {:.3} carpool {:.3}",
            run + 1,
            s.runs,
            pct(&dt, 0.5),
            pct(&ct, 0.5),
            pct(&dg, 0.5),
            pct(&cg, 0.5)
        );
        ttfe_added_p50.push(pct(&ct, 0.5) - pct(&dt, 0.5));
        ttfe_added_p99.push(pct(&ct, 0.99) - pct(&dt, 0.99));
        gap_added.push(pct(&cg, 0.5) - pct(&dg, 0.5));
        ttfe.0.push(pct(&dt, 0.5));
        ttfe.1.push(pct(&ct, 0.5));
        gap.0.push(pct(&dg, 0.5));
        gap.1.push(pct(&cg, 0.5));
    }
    report.row(
        "streams",
        "time to first event (p50)",
        ms(median(&ttfe.1)),
        ms(median(&ttfe.0)),
        "",
        None,
    );
    let added = median(&ttfe_added_p50);
    report.row(
        "streams",
        "added to first event p50 / p99",
        format!("{} / {}", ms(added), ms(median(&ttfe_added_p99))),
        "0",
        "< 1 ms",
        Some(added < 1.0),
    );
    report.row(
        "streams",
        format!("gap between events (p50; sim chunk_delay {chunk_delay_ms} ms)"),
        ms(median(&gap.1)),
        ms(median(&gap.0)),
        "",
        None,
    );
    report.row(
        "streams",
        "added to the gap (p50)",
        ms(median(&gap_added)),
        "0",
        "",
        None,
    );
    http.patch(format!("{}/_sim/options", sim.url))
        .json(&json!({"chunk_delay_ms": 0, "stream_chunks": 4}))
        .send()
        .await?;
    drop(carpool);
    Ok(())
}

// ---------------------------------------------------------------- 3. held

async fn hold(target: SocketAddr, from: usize, to: usize) -> Res<Vec<tokio::net::TcpStream>> {
    let mut set = tokio::task::JoinSet::new();
    let mut held = Vec::with_capacity(to - from);
    let mut next = from;
    let parallel = 256;
    while next < to || !set.is_empty() {
        while next < to && set.len() < parallel {
            let i = next;
            next += 1;
            set.spawn(async move {
                let body = format!(
                    r#"{{"model":"sim-held","messages":[{{"role":"user","content":"held caller {i}"}}]}}"#
                );
                let request = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {KEY}\r\n\
                     Content-Type: application/json\r\nCarpool-Mode: wait\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                // Spread callers over 127.0.0.2-9 so no source runs out of ports.
                let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8));
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                let mut stream = socket.connect(target).await?;
                stream.write_all(request.as_bytes()).await?;
                Ok::<_, std::io::Error>(stream)
            });
        }
        if let Some(done) = set.join_next().await {
            held.push(done??);
        }
    }
    Ok(held)
}

async fn held(s: &Settings, http: &reqwest::Client, sim: &Sim, report: &mut Report) -> Res<()> {
    eprintln!("== held callers");
    // Each end of every held call is a descriptor in its own process; keep
    // some for the store, the listener and the driver's own connections.
    let most = (s.fd_limit.saturating_sub(1_500) / 1_000 * 1_000) as usize;
    let sizes: Vec<usize> = [10_000usize, 50_000.min(most)]
        .into_iter()
        .filter(|&n| n <= most)
        .collect();
    if sizes.is_empty() {
        return Err(format!("descriptor limit {} is too low to hold callers", s.fd_limit).into());
    }
    let mut rss_idle = Vec::new();
    let mut rss = BTreeMap::<usize, Vec<f64>>::new();
    for run in 0..s.runs {
        let carpool = start_carpool(
            s,
            http,
            sim,
            "held",
            "max_requests = 100000\nmax_wait = \"1h\"\npoll_interval = \"1h\"",
        )
        .await?;
        let addr: SocketAddr = carpool.url.trim_start_matches("http://").parse()?;
        rss_idle.push(carpool.proc.rss_mib()?);
        let mut streams = Vec::new();
        let mut have = 0;
        for &n in &sizes {
            streams.extend(hold(addr, have, n).await?);
            have = n;
            wait_metric(
                http,
                &carpool.url,
                "carpool_deferred_accepted_total",
                "mode=\"wait\"",
                n as f64,
                Duration::from_millis(100),
                Duration::from_secs(300),
            )
            .await?;
            let r = carpool.proc.rss_mib()?;
            eprintln!(" run {}/{}: {n} held, RSS {r:.1} MiB", run + 1, s.runs);
            rss.entry(n).or_default().push(r);
        }
        drop(carpool);
        drop(streams);
    }
    let idle = median(&rss_idle);
    let mut each_kib = f64::NAN;
    for (n, v) in &rss {
        let r = median(v);
        each_kib = (r - idle) * 1024.0 / *n as f64;
        let big = *n == 50_000;
        report.row(
            "held callers",
            format!("RSS with {n} wait-mode callers held"),
            format!("{r:.0} MiB ({each_kib:.1} KiB each)"),
            format!("{idle:.0} MiB idle"),
            if big { "< 1 GiB" } else { "" },
            big.then_some(r < 1024.0),
        );
    }
    if !rss.contains_key(&50_000) {
        let projected = idle + 50_000.0 * each_kib / 1024.0;
        report.row(
            "held callers",
            "RSS with 50000 callers, projected (idle + 50,000 × KiB each above)",
            format!("{projected:.0} MiB"),
            format!("{idle:.0} MiB idle"),
            "< 1 GiB",
            Some(projected < 1024.0),
        );
        report.notes.push(format!(
            "held callers: this machine caps open descriptors at {} per process (hard limit, no CAP_SYS_RESOURCE), \
             so at most {most} callers could be held; the 50,000 figure is projected from the per-caller cost.",
            s.fd_limit
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- 4. intake

async fn intake(s: &Settings, http: &reqwest::Client, sim: &Sim, report: &mut Report) -> Res<()> {
    eprintln!("== intake");
    const PENDING: f64 = 100_000.0;
    let mut rss = Vec::new();
    let mut pending = Vec::new();
    let mut idle = Vec::new();
    // Pinned (carpool on one core, wrk on the other: the cost per core),
    // then shared (carpool free on both cores, competing with wrk for them).
    let modes: &[bool] = if s.cpus.is_some() {
        &[false, true]
    } else {
        &[false]
    };
    for (&shared, &conns) in modes
        .iter()
        .flat_map(|m| s.intake_conns.iter().map(move |c| (m, c)))
    {
        s.shared.set(shared);
        let how = match (shared, s.cpus) {
            (true, _) => "carpool and wrk sharing both cores".to_owned(),
            (false, Some((p, _))) => format!("carpool pinned to CPU {p}"),
            (false, None) => "unpinned".to_owned(),
        };
        let mut rate = Vec::new();
        let mut direct = Vec::new();
        let mut cpu = Vec::new();
        for run in 0..s.runs {
            let carpool = start_carpool(
                s,
                http,
                sim,
                "intake",
                "max_requests = 100000\nmax_wait = \"1h\"\npoll_interval = \"1h\"",
            )
            .await?;
            idle.push(carpool.proc.rss_mib()?);
            let url = format!("{}/v1/chat/completions", carpool.url);
            let async_mode = [("Carpool-Mode", "async")];
            // Two windows, as two models' calls would fill (a window holds
            // 100,000 at most: runs are kept short enough not to fill one).
            let mut calls = 0;
            let mut secs = 0.0;
            let cpu_before = ThreadCpu::of(&carpool.proc)?;
            for model in ["sim-a", "sim-b"] {
                let body = CHAT_BODY.replace("sim-small", model);
                let c = wrk(s, &url, s.intake_secs, conns, &body, &async_mode)?;
                if c.errors > 0 {
                    return Err(format!("intake: {} calls failed", c.errors).into());
                }
                calls += c.calls;
                secs += c.secs;
            }
            let cpu_used = cpu_before.per(&ThreadCpu::of(&carpool.proc)?, calls as f64);
            let accepted = |http| {
                metric(
                    http,
                    &carpool.url,
                    "carpool_deferred_accepted_total",
                    "mode=\"async\"",
                )
            };
            let mut stored = accepted(http).await?;
            // Every call wrk counted was answered below 400; each must be
            // one carpool stored (a 200 would be a pass-through).
            if stored < calls as f64 {
                return Err(format!(
                    "intake: wrk counted {calls} answers, carpool stored {stored}"
                )
                .into());
            }
            let r = calls as f64 / secs;
            // Topped up, untimed, to the pending count the RSS row is for;
            // a round that stores nothing ends the run.
            while stored < PENDING {
                let body = CHAT_BODY.replace("sim-small", "sim-c");
                let c = wrk(s, &url, 1, conns, &body, &async_mode)?;
                let before = stored;
                stored = accepted(http).await?;
                if c.errors > 0 || stored <= before {
                    return Err(format!(
                        "intake: topping up stopped at {stored} pending ({} calls failed)",
                        c.errors
                    )
                    .into());
                }
            }
            let m = carpool.proc.rss_mib()?;
            let d = wrk(
                s,
                &format!("{}/v1/chat/completions", sim.url),
                s.intake_secs,
                conns,
                CHAT_BODY,
                &[],
            )?;
            eprintln!(
                " {conns} connections, {how}, run {}/{}: {r:.0} acceptances/s, {stored} pending, RSS {m:.1} MiB; direct {:.0}/s; CPU an acceptance: {}",
                run + 1,
                s.runs,
                d.rate(),
                cpu_used.show()
            );
            cpu.push(cpu_used);
            rate.push(r);
            rss.push(m);
            pending.push(stored);
            direct.push(d.rate());
            drop(carpool);
        }
        let r = median(&rate);
        let d = median(&direct);
        report.row(
            "intake",
            format!("durable async acceptances/s ({conns} connections, {how})"),
            // Beside the machine's own pace: the same load answered by the
            // sim with no store, in the same run.
            format!("{r:.0}/s ({:.0}% of plain calls)", 100.0 * r / d),
            format!("{d:.0}/s plain sim calls"),
            "≥ 20,000/s",
            Some(r >= 20_000.0),
        );
        report.row(
            "intake",
            format!("CPU an acceptance, by carpool thread ({conns} connections, {how})"),
            ThreadCpu::median(&cpu).show(),
            "",
            "",
            None,
        );
    }
    s.shared.set(false);
    let m = median(&rss);
    report.row(
        "intake",
        "RSS at 100,000 pending or more",
        format!(
            "{m:.0} MiB ({:.0}–{:.0} pending)",
            pending.iter().copied().fold(f64::INFINITY, f64::min),
            pending.iter().copied().fold(0.0, f64::max)
        ),
        format!("{:.0} MiB idle", median(&idle)),
        "< 300 MB",
        Some(m * 1.048_576 < 300.0),
    );
    Ok(())
}

// ---------------------------------------------------------------- 5. flush

async fn flush(s: &Settings, http: &reqwest::Client, sim: &Sim, report: &mut Report) -> Res<()> {
    eprintln!("== flush");
    // A window is filled, sealed at shutdown while uploads fail, then a
    // fresh process submits it on start: its peak RSS is the flush's alone,
    // not the intake's (SQLite page caches warmed by writing the window).
    // Jobs stay running: only the flush is measured.
    let stuck = json!({"kind": "next_job", "outcome": "stuck", "count": 0});
    let no_upload =
        json!({"kind": "http_error", "route": "POST /v1/files", "status": 500, "count": 0});
    let batching = "max_requests = 100000\nmax_wait = \"1h\"\npoll_interval = \"1h\"";
    let sizes = [10_000usize, 50_000, 100_000];
    let mut time = BTreeMap::<usize, Vec<f64>>::new();
    let mut peak = BTreeMap::<usize, Vec<f64>>::new();
    let mut idle_peak = Vec::new();
    let mut idle_start = Vec::new();
    for run in 0..s.runs {
        // The baseline: a fresh process with nothing to flush.
        let spawned = Instant::now();
        let carpool = start_carpool(s, http, sim, "flush-idle", batching).await?;
        idle_start.push(spawned.elapsed().as_secs_f64());
        idle_peak.push(carpool.proc.peak_mib()?);
        carpool.proc.stop(Duration::from_secs(5));
        for &w in &sizes {
            let name = format!("flush-{w}");
            http.put(format!("{}/_sim/faults", sim.url))
                .json(&json!([stuck, no_upload]))
                .send()
                .await?
                .error_for_status()?;
            let carpool = start_carpool(s, http, sim, &name, batching).await?;
            let url = format!("{}/v1/chat/completions", carpool.url);
            send_async(s, "flush", &url, CHAT_BODY, w, 64)?;
            carpool.proc.stop(Duration::from_secs(10));
            http.put(format!("{}/_sim/faults", sim.url))
                .json(&json!([stuck]))
                .send()
                .await?
                .error_for_status()?;
            let spawned = Instant::now();
            let carpool = start_carpool_on(s, http, sim, &name, batching, true).await?;
            let done = wait_metric(
                http,
                &carpool.url,
                "carpool_batch_jobs_total",
                "status=\"submitted\"",
                1.0,
                Duration::from_millis(5),
                Duration::from_secs(120),
            )
            .await?;
            let p = carpool.proc.peak_mib()?;
            let t = (done - spawned).as_secs_f64();
            eprintln!(
                " run {}/{}: start → {w}-line window uploaded → job created in {t:.3} s; peak RSS {p:.1} MiB",
                run + 1,
                s.runs
            );
            time.entry(w).or_default().push(t);
            peak.entry(w).or_default().push(p);
            carpool.proc.stop(Duration::from_secs(5));
        }
    }
    let mut line = Vec::new();
    carpool::providers::write_input_line(
        carpool::model::Dialect::Mistral,
        "req_01J9Z8Q6M2V5K7T3W4X8Y1Z2A3",
        "/v1/chat/completions",
        CHAT_BODY.as_bytes(),
        &mut line,
    )?;
    let line_bytes = line.len();
    let (idle_t, idle_p) = (median(&idle_start), median(&idle_peak));
    for &w in &sizes {
        let t = median(&time[&w]);
        report.row(
            "flush",
            format!(
                "{w}-line window (≈ {:.1} MB): start → upload → job created",
                (w * line_bytes) as f64 / 1e6
            ),
            format!(
                "{t:.2} s ({:.0} lines/s after start-up)",
                w as f64 / (t - idle_t).max(1e-3)
            ),
            format!("{idle_t:.2} s start-up, nothing to flush"),
            "",
            None,
        );
        report.row(
            "flush",
            format!("{w}-line window: peak RSS"),
            format!("{:.1} MiB", median(&peak[&w])),
            format!("{idle_p:.1} MiB nothing to flush"),
            "",
            None,
        );
    }
    // SQLite's page caches (writer 32 MiB, readers 2 MiB each) fill while a
    // window is read and marked submitted: bounded, not proportional.
    let (g50, g100) = (
        median(&peak[&50_000]) - idle_p,
        median(&peak[&100_000]) - idle_p,
    );
    let extra_file_mib = (50_000 * line_bytes) as f64 / 1_048_576.0;
    report.row(
        "flush",
        "peak RSS growth for flushing, 100,000 vs 50,000 lines",
        format!("{g100:.1} MiB"),
        format!("{g50:.1} MiB"),
        format!("bounded: < ½ of the {extra_file_mib:.1} MiB the bigger file adds (buffering it would add all)"),
        Some(g100 - g50 < extra_file_mib / 2.0),
    );
    http.delete(format!("{}/_sim/faults", sim.url))
        .send()
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- 6. fanout

async fn fanout(s: &Settings, http: &reqwest::Client, sim: &Sim, report: &mut Report) -> Res<()> {
    eprintln!("== fan-out");
    http.delete(format!("{}/_sim/faults", sim.url))
        .send()
        .await?;
    // Long enough that the driver sees the job before it is done.
    http.patch(format!("{}/_sim/options", sim.url))
        .json(&json!({"job_duration_ms": 3000}))
        .send()
        .await?
        .error_for_status()?;
    // Pinned (carpool on one core: the cost per core), then on both cores
    // (nothing else runs while a result file is applied but the sim
    // serving it, so carpool's parse and its store can run side by side).
    let modes: &[bool] = if s.cpus.is_some() {
        &[false, true]
    } else {
        &[false]
    };
    for &shared in modes {
        s.shared.set(shared);
        let how = match (shared, s.cpus) {
            (true, _) => "carpool on both cores".to_owned(),
            (false, Some((p, _))) => format!("carpool pinned to CPU {p}"),
            (false, None) => "unpinned".to_owned(),
        };
        let result = fanout_runs(s, http, sim, report, &how).await;
        s.shared.set(false);
        result?;
    }
    http.patch(format!("{}/_sim/options", sim.url))
        .json(&json!({"job_duration_ms": 50}))
        .send()
        .await?;
    Ok(())
}

/// The fan-out runs of one placement of carpool, and their rows.
async fn fanout_runs(
    s: &Settings,
    http: &reqwest::Client,
    sim: &Sim,
    report: &mut Report,
    how: &str,
) -> Res<()> {
    let lines = 100_000usize;
    let mut rates = Vec::new();
    let mut growth = Vec::new();
    let mut baseline = Vec::new();
    let mut cpu = Vec::new();
    for run in 0..s.runs {
        let model = format!(
            "sim-fanout-{}-{run}",
            if s.shared.get() { "shared" } else { "pinned" }
        );
        let carpool = start_carpool(
            s,
            http,
            sim,
            "fanout",
            "max_requests = 100000\nmax_wait = \"1h\"\npoll_interval = \"20ms\"",
        )
        .await?;
        let url = format!("{}/v1/chat/completions", carpool.url);
        let body = CHAT_BODY.replace("sim-small", &model);
        send_async(s, "fan-out", &url, &body, lines, 64)?;
        wait_metric(
            http,
            &carpool.url,
            "carpool_batch_jobs_total",
            "status=\"submitted\"",
            1.0,
            Duration::from_millis(10),
            Duration::from_secs(120),
        )
        .await?;
        let jobs: Value = http
            .get(format!("{}/_sim/jobs", sim.url))
            .send()
            .await?
            .json()
            .await?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["model"] == model.as_str()))
            .and_then(|j| j["id"].as_str())
            .ok_or("fan-out: job not found at the sim")?
            .to_owned();
        let before = carpool.proc.rss_mib()?;
        carpool.proc.reset_peak()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let (start, job_view) = loop {
            let v: Value = http
                .get(format!("{}/v1/batch/jobs/{job}", sim.url))
                .bearer_auth(KEY)
                .send()
                .await?
                .json()
                .await?;
            if v["status"] == "SUCCESS" {
                break (Instant::now(), v);
            }
            if Instant::now() > deadline {
                return Err("fan-out: job never finished".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let cpu_before = ThreadCpu::of(&carpool.proc)?;
        let done = wait_metric(
            http,
            &carpool.url,
            "carpool_results_total",
            "",
            lines as f64,
            Duration::from_millis(10),
            Duration::from_secs(300),
        )
        .await?;
        let rate = lines as f64 / (done - start).as_secs_f64();
        let cpu_used = cpu_before.per(&ThreadCpu::of(&carpool.proc)?, lines as f64);
        let peak = carpool.proc.peak_mib()?;
        eprintln!(
            " {how}, run {}/{}: {lines} results in {:.3} s = {rate:.0}/s; RSS {before:.1} → peak {peak:.1} MiB; CPU a result: {}",
            run + 1,
            s.runs,
            (done - start).as_secs_f64(),
            cpu_used.show()
        );
        rates.push(rate);
        cpu.push(cpu_used);
        growth.push(peak - before);
        drop(carpool);
        let file = job_view["output_file"]
            .as_str()
            .ok_or("fan-out: the job has no output file")?;
        let parsed = download_and_parse(http, sim, file).await?;
        eprintln!(" baseline: the same file downloaded and parsed, nothing stored: {parsed:.0}/s");
        baseline.push(parsed);
    }
    let r = median(&rates);
    report.row(
        "fan-out",
        format!("results resolved/s, 100,000-line output file (job done → all stored; {how})"),
        format!("{r:.0}/s"),
        format!(
            "{:.0}/s downloaded and parsed, not stored",
            median(&baseline)
        ),
        "≥ 100,000/s",
        Some(r >= 100_000.0),
    );
    report.row(
        "fan-out",
        format!("CPU a result, by carpool thread ({how})"),
        ThreadCpu::median(&cpu).show(),
        "",
        "",
        None,
    );
    report.row(
        "fan-out",
        format!("peak RSS growth while resolving ({how})"),
        format!("{:.1} MiB", median(&growth)),
        "",
        "",
        None,
    );
    Ok(())
}

/// The floor under fan-out: the same output file streamed from the sim and
/// every line parsed as carpool parses it, with nothing stored.
async fn download_and_parse(http: &reqwest::Client, sim: &Sim, file: &str) -> Res<f64> {
    use futures_util::StreamExt as _;
    let start = Instant::now();
    let response = http
        .get(format!("{}/v1/files/{file}/content", sim.url))
        .bearer_auth(KEY)
        .send()
        .await?
        .error_for_status()?;
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut parsed = 0usize;
    let mut parse = |line: &[u8]| -> Res<()> {
        if !line.iter().all(u8::is_ascii_whitespace) {
            carpool::providers::parse_result_line(line)?;
            parsed += 1;
        }
        Ok(())
    };
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk?);
        let mut from = 0;
        while let Some(n) = pending[from..].iter().position(|b| *b == b'\n') {
            parse(&pending[from..from + n])?;
            from += n + 1;
        }
        pending.drain(..from);
    }
    parse(&pending)?;
    Ok(parsed as f64 / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- main

async fn run(s: &Settings, report: &mut Report) -> Res<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(600))
        .build()?;
    let sim = start_sim(s)?;
    eprintln!("sim at {} (pid {})", sim.url, sim.proc.pid());
    type Section = for<'a> fn(
        &'a Settings,
        &'a reqwest::Client,
        &'a Sim,
        &'a mut Report,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = Res<()>> + 'a>>;
    let sections: [(&str, &[Tool], Section); 6] = [
        ("passthrough", &[Tool::Oha, Tool::Wrk], |s, h, sim, r| {
            Box::pin(passthrough(s, h, sim, r))
        }),
        ("streams", &[], |s, h, sim, r| {
            Box::pin(streams(s, h, sim, r))
        }),
        ("held", &[], |s, h, sim, r| Box::pin(held(s, h, sim, r))),
        ("intake", &[Tool::Wrk], |s, h, sim, r| {
            Box::pin(intake(s, h, sim, r))
        }),
        ("flush", &[Tool::Oha], |s, h, sim, r| {
            Box::pin(flush(s, h, sim, r))
        }),
        ("fanout", &[Tool::Oha], |s, h, sim, r| {
            Box::pin(fanout(s, h, sim, r))
        }),
    ];
    for (name, needs, section) in sections {
        if !s.wants(name) {
            continue;
        }
        if let Some(missing) = needs.iter().find(|t| !t.found(s)) {
            let msg = format!("{name}: skipped, {}", missing.hint());
            eprintln!("{msg}");
            report.notes.push(msg);
            continue;
        }
        if let Err(err) = section(s, &http, &sim, report).await {
            let msg = format!("{name}: failed: {err}");
            eprintln!("{msg}");
            report.notes.push(msg);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; a criterion-style filter is ignored.
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("report: {err}");
            return ExitCode::FAILURE;
        }
    };
    if settings.fd_limit < 52_000 && settings.wants("held") {
        eprintln!(
            "report: the descriptor limit is {}; holding 50,000 callers needs about 52,000 (raise `ulimit -Hn`); a projection is reported instead",
            settings.fd_limit
        );
    }
    if let Some(cpu) = settings.load_cpu() {
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu).is_ok() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("report: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report::default();
    if let Err(err) = rt.block_on(run(&settings, &mut report)) {
        eprintln!("report: {err}");
        report.notes.push(format!("aborted: {err}"));
    }
    report.print(&settings);
    if std::env::var_os("CARPOOL_BENCH_KEEP").is_some() {
        eprintln!(
            "report: logs and configs kept in {}",
            settings.dir.keep().display()
        );
    }
    ExitCode::SUCCESS
}
