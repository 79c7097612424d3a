//! A day of traffic (issue 19): a realistic day replayed through the
//! release `carpool` binary in front of `carpool sim`, both as processes
//! on 127.0.0.1, time-compressed.
//!
//! ```text
//! cargo bench --bench day              # the whole day (about 10 min)
//! cargo bench --bench day -- --quick   # the same day in 2 min (about 3 min in all)
//! ```
//!
//! Two clocks, said plainly (docs/benchmarks.md has the method):
//! - **Timers** are compressed [`COMPRESSION`] times, all together: SDK
//!   read timeouts (30 s to 600 s), `Carpool-Deadline`s, `max_wait`,
//!   `poll_interval`, `fallback_margin`, `expected_turnaround`,
//!   `flex_timeout`, the sim's job duration and latency. At 10x a 30 s
//!   timeout is 3 s: six polls, and flex still gets the second carpool
//!   needs at least.
//! - **The day's shape** (a morning bump and an afternoon peak, 24 hours)
//!   is squeezed into `CARPOOL_DAY_SECS` (600, or 120 with `--quick`) at a
//!   mean of `CARPOOL_DAY_RATE` calls per second (20).
//!
//! The mix: OpenAI (two models, two `OpenAI-Project`s on one key, chat and
//! Responses) and Mistral (two models); OpenAI-SDK callers declaring their
//! read timeout (`x-stainless-read-timeout`; Mistral SDK callers send the
//! same as `Carpool-Deadline`, their SDK declares nothing), held callers
//! with an explicit deadline, async callers polling their handle, callback
//! callers (a signed webhook to a receiver in this process, verified);
//! about 1% bad lines; an enqueued-token limit (the sim's and carpool's
//! `max_enqueued_tokens`) at `CARPOOL_DAY_QUOTA` (0.6) of the peak offered
//! load; the OpenAI upstream sells flex.
//!
//! It prints per dialect: calls, the share served by batch, flex and
//! realtime, good callers failed, bad lines failed, answers checked against
//! the sim's own answer to that body, the cost as served against the
//! all-realtime cost (from the answers' usage, and from `GET
//! /admin/savings`), and the share served by batch of the calls whose
//! deadline leaves time for a batch. It exits non-zero when a target is
//! missed: >= 97% of those by batch, 0 wrong answers, 0 good callers failed.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use carpool::pricing::TokenUsage;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Every timer of the day runs this many times faster.
const COMPRESSION: f64 = 10.0;

/// Production settings, in production seconds (compressed when used).
const POLL_INTERVAL: f64 = 5.0;
const MAX_WAIT: f64 = 120.0;
const FALLBACK_MARGIN: f64 = 300.0;
const EXPECTED_TURNAROUND: f64 = 20.0;
const FLEX_TIMEOUT: f64 = 900.0;
/// The provider's batch job: 15 s, plus 10 ms a line.
const JOB_DURATION: f64 = 15.0;
const LINE_DURATION: f64 = 0.01;
/// Every sim answer's latency.
const LATENCY: f64 = 0.2;

/// How long an async or callback caller keeps waiting after the day ends
/// when its own deadline is later (production seconds).
const DRAIN: f64 = 1200.0;

const CALLER_KEY: &str = "sk-day-caller";
const UPSTREAM_KEY: &str = "sk-day-upstream";
const ADMIN: &str = "day-admin-token";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const CHAT: &str = "/v1/chat/completions";
const RESPONSES: &str = "/v1/responses";

/// (model, dialect, share of the calls, USD per 1M input, output).
const MODELS: [(&str, Dialect, f64, f64, f64); 4] = [
    ("gpt-4o-mini", Dialect::Openai, 0.385, 0.15, 0.60),
    ("gpt-4.1-mini", Dialect::Openai, 0.165, 0.40, 1.60),
    ("mistral-small-latest", Dialect::Mistral, 0.315, 0.10, 0.30),
    ("mistral-large-latest", Dialect::Mistral, 0.135, 2.00, 6.00),
];

fn scaled(prod_secs: f64) -> Duration {
    Duration::from_secs_f64(prod_secs / COMPRESSION)
}

fn humantime_ms(prod_secs: f64) -> String {
    format!("{}ms", (prod_secs * 1000.0 / COMPRESSION).round() as u64)
}

// ---------------------------------------------------------------- the plan

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Dialect {
    Openai,
    Mistral,
}

impl Dialect {
    fn name(self) -> &'static str {
        match self {
            Dialect::Openai => "openai",
            Dialect::Mistral => "mistral",
        }
    }
}

/// How a caller waits, with its times in production seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    /// A held SDK call with this read timeout.
    Sdk(u32),
    /// `Carpool-Mode: wait` with `Carpool-Deadline`.
    WaitDeadline(u32),
    /// `Carpool-Mode: async`, polling its handle; maybe a deadline.
    Async(Option<u32>),
    /// `Carpool-Callback`; maybe a deadline.
    Callback(Option<u32>),
}

impl Kind {
    fn deadline(self) -> Option<u32> {
        match self {
            Kind::Sdk(t) | Kind::WaitDeadline(t) => Some(t),
            Kind::Async(d) | Kind::Callback(d) => d,
        }
    }

    fn label(self) -> String {
        let d = |d: Option<u32>| d.map_or("no deadline".to_owned(), |s| format!("deadline {s} s"));
        match self {
            Kind::Sdk(t) => format!("held, SDK timeout {t} s"),
            Kind::WaitDeadline(t) => format!("held, deadline {t} s"),
            Kind::Async(x) => format!("async, {}", d(x)),
            Kind::Callback(x) => format!("callback, {}", d(x)),
        }
    }
}

/// A line the provider (or carpool's intake on its behalf) refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    /// `messages: []`: reaches the batch; the provider refuses the line.
    EmptyMessages,
    /// `model: ""`: OpenAI's validation would sink the batch; intake refuses.
    EmptyModel,
    /// `background: true` on `/v1/responses`: intake refuses.
    Background,
}

#[derive(Clone, Debug)]
struct Call {
    at: Duration,
    dialect: Dialect,
    model: &'static str,
    endpoint: &'static str,
    project: Option<&'static str>,
    kind: Kind,
    /// Held SDK calls: through the `/defer` prefix instead of the header.
    prefix: bool,
    bad: Option<Bad>,
    body: Value,
}

impl Call {
    /// Whether the deadline leaves time for a batch: its fallback (the
    /// deadline less `fallback_margin`, never more than half the wait) is
    /// at least one job and one poll away, what a batch sealed the instant
    /// the call arrived needs to be back and seen. No deadline: yes.
    fn leaves_time_for_batch(&self) -> bool {
        let Some(d) = self.kind.deadline() else {
            return true;
        };
        let d = f64::from(d);
        let fallback = d - FALLBACK_MARGIN.min(d / 2.0);
        fallback >= JOB_DURATION + POLL_INTERVAL
    }
}

const PHRASES: [&str; 10] = [
    "the parcel tracking page says delivered but nothing arrived",
    "I was charged twice for the same monthly subscription",
    "the password reset email never arrives in my inbox",
    "the app crashes when exporting the quarterly report to PDF",
    "please move my booking to the following week if possible",
    "the discount code from your newsletter is rejected at checkout",
    "my invoice shows the wrong company address and VAT number",
    "two-factor codes arrive several minutes after they expire",
    "the shared calendar stopped syncing with my phone yesterday",
    "I would like to cancel the add-on but keep my main plan",
];

fn pick<T: Copy>(rng: &mut StdRng, items: &[(T, f64)]) -> T {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut u = rng.gen::<f64>() * total;
    for (item, w) in items {
        if u < *w {
            return *item;
        }
        u -= w;
    }
    items[items.len() - 1].0
}

/// Calls per minute of the day, relative: a quiet night, a morning bump,
/// an afternoon peak.
fn shape(hour: f64) -> f64 {
    let bump = |centre: f64, width: f64| (-((hour - centre) / width).powi(2) / 2.0).exp();
    0.15 + 0.85 * bump(14.0, 3.0) + 0.35 * bump(9.5, 1.2)
}

fn plan(calls: usize, day: Duration) -> Vec<Call> {
    let mut rng = StdRng::seed_from_u64(19);
    let minutes: Vec<f64> = (0..1440).map(|m| shape(f64::from(m) / 60.0)).collect();
    let mut cumulative = Vec::with_capacity(minutes.len());
    let mut sum = 0.0;
    for w in &minutes {
        sum += w;
        cumulative.push(sum);
    }
    let mut times: Vec<f64> = (0..calls)
        .map(|_| {
            let u = rng.gen::<f64>() * sum;
            let minute = cumulative.partition_point(|c| *c < u);
            (minute as f64 + rng.gen::<f64>()) / 1440.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let models: Vec<(usize, f64)> = MODELS.iter().enumerate().map(|(i, m)| (i, m.2)).collect();
    times
        .into_iter()
        .enumerate()
        .map(|(i, frac)| {
            let (model, dialect, ..) = MODELS[pick(&mut rng, &models)];
            let kind = pick(
                &mut rng,
                &[
                    (Kind::Sdk(30), 0.08),
                    (Kind::Sdk(60), 0.14),
                    (Kind::Sdk(120), 0.14),
                    (Kind::Sdk(300), 0.11),
                    (Kind::Sdk(600), 0.08),
                    (Kind::WaitDeadline(90), 0.05),
                    (Kind::WaitDeadline(1200), 0.05),
                    (Kind::Async(Some(7200)), 0.10),
                    (Kind::Async(None), 0.10),
                    (Kind::Callback(Some(1200)), 0.075),
                    (Kind::Callback(None), 0.075),
                ],
            );
            let endpoint = if dialect == Dialect::Openai && rng.gen::<f64>() < 0.15 {
                RESPONSES
            } else {
                CHAT
            };
            let project = (dialect == Dialect::Openai).then(|| {
                if rng.gen::<f64>() < 0.6 {
                    "proj_support"
                } else {
                    "proj_research"
                }
            });
            let bad = (rng.gen::<f64>() < 0.01).then(|| match (endpoint, rng.gen_range(0..2)) {
                (RESPONSES, 0) => Bad::Background,
                (RESPONSES, _) => Bad::EmptyModel,
                (_, 0) => Bad::EmptyMessages,
                _ => Bad::EmptyModel,
            });
            let text: Vec<&str> = (0..rng.gen_range(1..=8))
                .map(|_| PHRASES[rng.gen_range(0..PHRASES.len())])
                .collect();
            let ticket = format!("Ticket #{:06}: {}.", 100_000 + i, text.join("; "));
            let mut body = if endpoint == RESPONSES {
                json!({"model": model, "instructions": "Triage this support ticket: category, urgency 1-5, one-line summary.", "input": ticket, "max_output_tokens": 200})
            } else {
                json!({"model": model, "max_tokens": 200, "messages": [
                    {"role": "system", "content": "Triage this support ticket: category, urgency 1-5, one-line summary."},
                    {"role": "user", "content": ticket},
                ]})
            };
            match bad {
                Some(Bad::EmptyMessages) => body["messages"] = json!([]),
                Some(Bad::EmptyModel) => body["model"] = json!(""),
                Some(Bad::Background) => body["background"] = json!(true),
                None => {}
            }
            Call {
                at: day.mul_f64(frac),
                dialect,
                model,
                endpoint,
                project,
                kind,
                prefix: i % 2 == 0,
                bad,
                body,
            }
        })
        .collect()
}

/// Estimated input tokens of a body, as carpool and the sim estimate them.
fn tokens(body: &Value) -> u64 {
    (body.to_string().len() as u64).div_ceil(4)
}

/// The enqueued-token limit: `fraction` of what the busiest model must
/// have in unfinished batches to keep up at the day's busiest hour (its
/// input tokens per second then, times one job and one poll).
fn quota(calls: &[Call], day: Duration, fraction: f64) -> u64 {
    let hour = day.as_secs_f64() / 24.0;
    let mut per_hour: HashMap<(&str, usize), u64> = HashMap::new();
    for c in calls.iter().filter(|c| c.bad.is_none()) {
        let h = ((c.at.as_secs_f64() / hour) as usize).min(23);
        *per_hour.entry((c.model, h)).or_default() += tokens(&c.body);
    }
    let peak_per_sec = per_hour.values().copied().max().unwrap_or(0) as f64 / hour;
    let in_flight = peak_per_sec * scaled(JOB_DURATION + POLL_INTERVAL).as_secs_f64();
    ((in_flight * fraction) as u64).max(1)
}

// ---------------------------------------------------------------- processes

/// A child process, killed when dropped.
struct Proc(Child);

impl Proc {
    /// SIGTERM, then wait up to `grace` for the exit.
    fn stop(mut self, grace: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_sim(bin: &PathBuf, limit: u64) -> Res<(Proc, String)> {
    let port = free_port()?;
    let options = json!({
        "latency_ms": (LATENCY * 1000.0 / COMPRESSION) as u64,
        "job_duration_ms": (JOB_DURATION * 1000.0 / COMPRESSION) as u64,
        "line_duration_ms": (LINE_DURATION * 1000.0 / COMPRESSION).ceil() as u64,
        "record_calls": false,
        "max_requests_per_job": 100_000,
        "enqueued_token_limit": limit,
    });
    let mut child = Command::new(bin)
        .args(["sim", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .env("CARPOOL_SIM_OPTIONS", options.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("sim: no stdout")?;
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("carpool sim listening on ")
        .ok_or_else(|| format!("sim did not start: {line:?}"))?
        .to_owned();
    Ok((proc, url))
}

fn config(port: u16, db: &std::path::Path, sim: &str, limit: u64) -> String {
    let mut prices = String::new();
    for (model, _, _, input, output) in MODELS {
        prices.push_str(&format!(
            "[[prices.models]]\nmodel = \"{model}\"\ninput = {input}\noutput = {output}\n\n"
        ));
    }
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_token = "{ADMIN}"
shutdown_grace = "2s"
defer_prefix = "/defer"

[store]
url = "sqlite://{db}"

[[upstreams]]
name = "openai"
dialect = "openai"
base_url = "{sim}"
api_key_env = "DAY_UPSTREAM_KEY"
auth = "managed"
models = ["gpt-*"]
flex = true
flex_timeout = "{flex}"

[[upstreams]]
name = "mistral"
dialect = "mistral"
base_url = "{sim}"
api_key_env = "DAY_UPSTREAM_KEY"
auth = "managed"
models = ["mistral-*"]

[batching]
max_requests = 500
max_wait = "{max_wait}"
poll_interval = "{poll}"
fallback_margin = "{margin}"
expected_turnaround = "{turnaround}"
max_enqueued_tokens = {limit}

[webhooks]
secret = "{SECRET}"
allow_hosts = ["127.0.0.1"]

[prices]
batch_discount = 0.5
flex_discount = 0.5

{prices}"#,
        db = db.display(),
        flex = humantime_ms(FLEX_TIMEOUT),
        max_wait = humantime_ms(MAX_WAIT),
        poll = humantime_ms(POLL_INTERVAL),
        margin = humantime_ms(FALLBACK_MARGIN),
        turnaround = humantime_ms(EXPECTED_TURNAROUND),
    )
}

async fn start_carpool(
    bin: &PathBuf,
    dir: &std::path::Path,
    http: &reqwest::Client,
    sim: &str,
    limit: u64,
) -> Res<(Proc, String)> {
    let port = free_port()?;
    let path = dir.join("day.toml");
    std::fs::write(&path, config(port, &dir.join("day.db"), sim, limit))?;
    let log = std::fs::File::create(dir.join("day.log"))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("CARPOOL_DAY_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .env("DAY_UPSTREAM_KEY", UPSTREAM_KEY)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let proc = Proc(child);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return Ok((proc, url));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("carpool did not become healthy; see {}", dir.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lifts the descriptor limit for the held callers (children inherit it).
fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}

// ---------------------------------------------------------------- webhooks

enum Slot {
    Arrived(Value),
    Waiting(oneshot::Sender<Value>),
}

/// Deliveries by request id; a caller registers before or after its
/// webhook arrives. Bad signatures are counted and refused.
#[derive(Default)]
struct Hooks {
    slots: Mutex<HashMap<String, Slot>>,
    bad_signatures: std::sync::atomic::AtomicUsize,
}

impl Hooks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn deliver(&self, id: String, data: Value) {
        let mut slots = self.lock();
        match slots.remove(&id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(data);
            }
            // A repeat delivery keeps the first.
            Some(Slot::Arrived(first)) => {
                slots.insert(id, Slot::Arrived(first));
            }
            None => {
                slots.insert(id, Slot::Arrived(data));
            }
        }
    }

    fn wait_for(&self, id: &str) -> oneshot::Receiver<Value> {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.lock();
        match slots.remove(id) {
            Some(Slot::Arrived(data)) => {
                let _ = tx.send(data);
            }
            _ => {
                slots.insert(id.to_owned(), Slot::Waiting(tx));
            }
        }
        rx
    }
}

async fn hook(State(hooks): State<Arc<Hooks>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let verified = standardwebhooks::Webhook::new(SECRET)
        .ok()
        .is_some_and(|wh| wh.verify(&body, &headers).is_ok());
    if !verified {
        hooks
            .bad_signatures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let data = event["data"].clone();
    if let Some(id) = data["id"].as_str() {
        hooks.deliver(id.to_owned(), data);
    }
    StatusCode::OK
}

async fn start_receiver(hooks: Arc<Hooks>) -> Res<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(hooks);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

// ---------------------------------------------------------------- callers

/// What one caller ended with.
#[derive(Debug, Default)]
struct Outcome {
    status: Option<u16>,
    body: Option<Value>,
    served_by: Option<String>,
    request_id: Option<String>,
    /// Why there is no final answer, if there is none.
    failure: Option<String>,
}

struct Ctx {
    http: reqwest::Client,
    base: String,
    receiver: String,
    hooks: Arc<Hooks>,
    start: tokio::time::Instant,
    /// When async and callback callers without an earlier deadline give up.
    give_up: tokio::time::Instant,
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn secs(prod: u32) -> String {
    format!("{:.3}", f64::from(prod) / COMPRESSION)
}

async fn run_call(ctx: &Ctx, call: &Call) -> Outcome {
    tokio::time::sleep_until(ctx.start + call.at).await;
    match send(ctx, call).await {
        Ok(o) => o,
        Err(err) => Outcome {
            failure: Some(format!("transport: {err}")),
            ..Outcome::default()
        },
    }
}

async fn send(ctx: &Ctx, call: &Call) -> Res<Outcome> {
    let path = match call.kind {
        Kind::Sdk(_) if call.prefix => format!("/defer{}", call.endpoint),
        _ => call.endpoint.to_owned(),
    };
    let mut req = ctx
        .http
        .post(format!("{}{path}", ctx.base))
        .bearer_auth(CALLER_KEY)
        .header("content-type", "application/json")
        .body(call.body.to_string());
    if let Some(p) = call.project {
        req = req.header("openai-project", p);
    }
    let accepted = tokio::time::Instant::now();
    let mut until = ctx.give_up;
    match call.kind {
        Kind::Sdk(t) => {
            if !call.prefix {
                req = req.header("carpool-mode", "wait");
            }
            req = match call.dialect {
                // The OpenAI SDK declares its read timeout, and gives up then.
                Dialect::Openai => req
                    .header("x-stainless-read-timeout", secs(t))
                    .header("x-stainless-retry-count", "0"),
                // The Mistral SDK declares nothing: the app says it.
                Dialect::Mistral => req.header("carpool-deadline", secs(t)),
            };
            req = req.timeout(scaled(f64::from(t)));
        }
        Kind::WaitDeadline(t) => {
            req = req
                .header("carpool-mode", "wait")
                .header("carpool-deadline", secs(t))
                .timeout(scaled(f64::from(t)) + Duration::from_secs(2));
        }
        Kind::Async(d) | Kind::Callback(d) => {
            req = match call.kind {
                Kind::Callback(_) => req.header("carpool-callback", &ctx.receiver),
                _ => req.header("carpool-mode", "async"),
            };
            if let Some(d) = d {
                req = req.header("carpool-deadline", secs(d));
                until = until.min(accepted + scaled(f64::from(d)) + Duration::from_secs(5));
            }
        }
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Ok(Outcome {
                failure: Some("the caller's timeout passed".to_owned()),
                ..Outcome::default()
            })
        }
        Err(e) => return Err(e.into()),
    };
    let request_id = header(resp.headers(), "carpool-request-id");
    let status = resp.status().as_u16();
    if !matches!(call.kind, Kind::Async(_) | Kind::Callback(_)) || status != 202 {
        let served_by = header(resp.headers(), "carpool-served-by");
        let bytes = resp.bytes().await?;
        return Ok(Outcome {
            status: Some(status),
            body: serde_json::from_slice(&bytes).ok(),
            served_by,
            request_id,
            failure: None,
        });
    }
    let handle: Value = resp.json().await?;
    let id = handle["id"]
        .as_str()
        .or(request_id.as_deref())
        .ok_or("a 202 without a request id")?
        .to_owned();
    let object = if matches!(call.kind, Kind::Callback(_)) {
        match tokio::time::timeout_at(until, ctx.hooks.wait_for(&id)).await {
            Ok(Ok(data)) => Some(data),
            _ => None,
        }
    } else {
        poll(ctx, &id, until).await?
    };
    let Some(object) = object else {
        return Ok(Outcome {
            request_id: Some(id),
            failure: Some("no answer before it gave up".to_owned()),
            ..Outcome::default()
        });
    };
    Ok(Outcome {
        status: object["response"]["status_code"]
            .as_u64()
            .map(|s| s as u16)
            .or_else(|| (object["status"] != "succeeded").then_some(0)),
        body: Some(object["response"]["body"].clone()).filter(|b| !b.is_null()),
        served_by: object["served_by"].as_str().map(str::to_owned),
        request_id: Some(id),
        failure: None,
    })
}

/// Reads the handle every (scaled) poll until it is final or `until`.
async fn poll(ctx: &Ctx, id: &str, until: tokio::time::Instant) -> Res<Option<Value>> {
    loop {
        let pause = scaled(POLL_INTERVAL);
        if tokio::time::Instant::now() + pause > until {
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
        let object: Value = ctx
            .http
            .get(format!("{}/v1/carpool/requests/{id}", ctx.base))
            .bearer_auth(CALLER_KEY)
            .send()
            .await?
            .json()
            .await?;
        if !matches!(object["status"].as_str(), Some("queued" | "submitted")) {
            return Ok(Some(object));
        }
    }
}

// ---------------------------------------------------------------- counting

/// Whether `answer` is the sim's own answer to `body`. A flex answer names
/// its tier (`service_tier: "flex"`) where the standard one names none
/// (chat) or `default` (Responses); the rest must be equal.
fn checks_out(endpoint: &str, body: &Value, answer: &Value, served_by: Option<&str>) -> bool {
    let mut expected = carpool::sim::expected_response(endpoint, body);
    if served_by != Some("flex") {
        return *answer == expected;
    }
    let mut answer = answer.clone();
    if answer["service_tier"] != "flex" {
        return false;
    }
    for v in [&mut answer, &mut expected] {
        if let Some(o) = v.as_object_mut() {
            o.remove("service_tier");
        }
    }
    answer == expected
}

#[derive(Default)]
struct Tally {
    calls: usize,
    good: usize,
    bad: usize,
    by_tier: BTreeMap<String, usize>,
    eligible: usize,
    eligible_batch: usize,
    good_failed: usize,
    failures: BTreeMap<String, usize>,
    bad_failed: usize,
    bad_at_intake: usize,
    bad_answered_ok: usize,
    right: usize,
    wrong: usize,
    realtime_usd: f64,
    served_usd: f64,
}

impl Tally {
    fn add(&mut self, call: &Call, o: &Outcome, price: (f64, f64)) {
        self.calls += 1;
        if call.bad.is_some() {
            self.bad += 1;
            match o.status {
                Some(200) => self.bad_answered_ok += 1,
                _ => {
                    self.bad_failed += 1;
                    if o.request_id.is_none() && o.status.is_some() {
                        self.bad_at_intake += 1;
                    }
                }
            }
            return;
        }
        self.good += 1;
        let eligible = call.leaves_time_for_batch();
        self.eligible += usize::from(eligible);
        let (Some(200), Some(body)) = (o.status, o.body.clone()) else {
            self.good_failed += 1;
            let why = o.failure.clone().unwrap_or_else(|| {
                let code = o
                    .body
                    .as_ref()
                    .map_or(Value::Null, |b| b["error"]["code"].clone());
                format!("HTTP {} {code}", o.status.unwrap_or(0))
            });
            *self.failures.entry(why).or_default() += 1;
            return;
        };
        let tier = o.served_by.clone().unwrap_or_else(|| "(none)".to_owned());
        *self.by_tier.entry(tier.clone()).or_default() += 1;
        if eligible && tier == "batch" {
            self.eligible_batch += 1;
        }
        if checks_out(call.endpoint, &call.body, &body, o.served_by.as_deref()) {
            self.right += 1;
        } else {
            self.wrong += 1;
            if self.wrong <= 3 {
                eprintln!(
                    "day: wrong answer ({} {}, served by {tier}): {body}\n  expected {}",
                    call.endpoint,
                    call.kind.label(),
                    carpool::sim::expected_response(call.endpoint, &call.body)
                );
            }
        }
        if let Some(u) = TokenUsage::from_answer(&body) {
            let realtime = (u.prompt as f64 * price.0 + u.completion as f64 * price.1) / 1e6;
            self.realtime_usd += realtime;
            self.served_usd += if tier == "realtime" {
                realtime
            } else {
                realtime * 0.5
            };
        }
    }

    fn tier(&self, name: &str) -> usize {
        self.by_tier.get(name).copied().unwrap_or(0)
    }

    fn answered(&self) -> usize {
        self.by_tier.values().sum()
    }
}

fn pct(n: usize, of: usize) -> String {
    if of == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / of as f64)
    }
}

/// Sum of every series of a metric family whose line contains `filter`.
fn metric(text: &str, family: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Each series of a family as (labels, value).
fn series(text: &str, family: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------- main

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(err) => {
            eprintln!("day: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(day()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("day: {err}");
            ExitCode::FAILURE
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

async fn day() -> Res<bool> {
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var_os("CARPOOL_DAY_QUICK").is_some();
    let day_secs: f64 = env_or("CARPOOL_DAY_SECS", if quick { 120.0 } else { 600.0 });
    let rate: f64 = env_or("CARPOOL_DAY_RATE", 20.0);
    let fraction: f64 = env_or("CARPOOL_DAY_QUOTA", 0.6);
    let day = Duration::from_secs_f64(day_secs.max(10.0));
    let calls = plan((day.as_secs_f64() * rate) as usize, day);
    let limit = quota(&calls, day, fraction);
    raise_fd_limit(65_536);
    let bin = std::env::var_os("CARPOOL_BENCH_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_carpool")),
        PathBuf::from,
    );
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()?;
    let (sim, sim_url) = start_sim(&bin, limit)?;
    let (carpool, base) = start_carpool(&bin, dir.path(), &http, &sim_url, limit).await?;
    let hooks = Arc::new(Hooks::default());
    let receiver = start_receiver(hooks.clone()).await?;
    eprintln!(
        "day: {} calls over {:.0} s (24 h at 1 h = {:.1} s), timers {COMPRESSION}x faster; enqueued-token limit {limit} per key and model; carpool {base}, sim {sim_url}",
        calls.len(),
        day.as_secs_f64(),
        day.as_secs_f64() / 24.0
    );
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let ctx = Arc::new(Ctx {
        http: http.clone(),
        base: base.clone(),
        receiver,
        hooks: hooks.clone(),
        start,
        give_up: start + day + scaled(DRAIN),
    });
    let calls = Arc::new(calls);
    let mut tasks = Vec::with_capacity(calls.len());
    for i in 0..calls.len() {
        let (ctx, calls) = (ctx.clone(), calls.clone());
        tasks.push(tokio::spawn(async move { run_call(&ctx, &calls[i]).await }));
    }
    // Watch the quota gauge (and show progress) until every caller is done.
    let mut waiting_max = 0.0f64;
    let mut last_note = Instant::now();
    let wall = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(r) = http.get(format!("{base}/metrics")).send().await {
            if let Ok(text) = r.text().await {
                waiting_max =
                    waiting_max.max(metric(&text, "carpool_windows_waiting_for_quota", ""));
            }
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            last_note = Instant::now();
            let done = tasks.iter().filter(|t| t.is_finished()).count();
            eprintln!(
                "day: {:>5.0} s, {done} of {} callers done",
                wall.elapsed().as_secs_f64(),
                tasks.len()
            );
        }
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await?);
    }
    let elapsed = wall.elapsed();

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let savings: Value = http
        .get(format!("{base}/admin/savings?group_by=upstream"))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let jobs: Value = http
        .get(format!("{sim_url}/_sim/jobs"))
        .send()
        .await?
        .json()
        .await?;
    carpool.stop(Duration::from_secs(5));
    sim.stop(Duration::from_secs(2));

    // Requests of two projects never share a job.
    let project_of: HashMap<&str, &str> = calls
        .iter()
        .zip(&outcomes)
        .filter_map(|(c, o)| Some((o.request_id.as_deref()?, c.project?)))
        .collect();
    let jobs = jobs.as_array().cloned().unwrap_or_default();
    let mixed = jobs
        .iter()
        .filter(|j| {
            let mut projects: Vec<&str> = j["custom_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|id| project_of.get(id.as_str()?).copied())
                .collect();
            projects.sort_unstable();
            projects.dedup();
            projects.len() > 1
        })
        .count();

    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut kinds: BTreeMap<Kind, Tally> = BTreeMap::new();
    for (call, o) in calls.iter().zip(&outcomes) {
        let price = MODELS
            .iter()
            .find(|m| m.0 == call.model)
            .map_or((0.0, 0.0), |m| (m.3, m.4));
        tallies
            .entry(call.dialect.name())
            .or_default()
            .add(call, o, price);
        tallies.entry("all").or_default().add(call, o, price);
        kinds.entry(call.kind).or_default().add(call, o, price);
    }
    let ledger = |upstream: &str, field: &str| -> f64 {
        savings["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| upstream == "all" || g["key"] == upstream)
            .filter_map(|g| g[field].as_f64())
            .sum()
    };

    let cols = ["openai", "mistral", "all"];
    let row = |label: &str, f: &dyn Fn(&Tally, &str) -> String| {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| tallies.get(c).map_or("-".to_owned(), |t| f(t, c)))
            .collect();
        println!(
            "  {label:<46} {:>14} {:>14} {:>14}",
            cells[0], cells[1], cells[2]
        );
    };
    println!();
    println!(
        "A day of traffic (cargo bench --bench day{}), release build, {} calls replayed in {:.0} s (whole run {:.0} s)",
        if quick { " -- --quick" } else { "" },
        calls.len(),
        day.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "  timers {COMPRESSION}x faster: SDK timeouts 30-600 s -> 3-60 s, max_wait {MAX_WAIT} s, poll {POLL_INTERVAL} s, job {JOB_DURATION} s, margin {FALLBACK_MARGIN} s (production values shown)"
    );
    println!(
        "  enqueued-token limit {limit} per key and model (sim and max_enqueued_tokens): {fraction} of the busiest model's peak"
    );
    println!();
    println!(
        "  {:<46} {:>14} {:>14} {:>14}",
        "", cols[0], cols[1], cols[2]
    );
    row("calls (good + bad lines)", &|t, _| {
        format!("{} + {}", t.good, t.bad)
    });
    row("good calls answered 200", &|t, _| t.answered().to_string());
    for tier in ["batch", "flex", "realtime"] {
        row(&format!("  served by {tier}"), &|t, _| {
            pct(t.tier(tier), t.answered())
        });
    }
    row("deadline leaves time for a batch", &|t, _| {
        t.eligible.to_string()
    });
    row("  of them served by batch (target >= 97%)", &|t, _| {
        pct(t.eligible_batch, t.eligible)
    });
    row("good callers failed (target 0)", &|t, _| {
        t.good_failed.to_string()
    });
    row("bad lines failed (of them at intake)", &|t, _| {
        format!("{}/{} ({})", t.bad_failed, t.bad, t.bad_at_intake)
    });
    row("answers checked: right / wrong (target 0)", &|t, _| {
        format!("{} / {}", t.right, t.wrong)
    });
    row("cost all-realtime, USD (answers' usage)", &|t, _| {
        format!("{:.4}", t.realtime_usd)
    });
    row("cost as served, USD (answers' usage)", &|t, _| {
        format!("{:.4}", t.served_usd)
    });
    row("  the ledger: all-realtime, USD", &|_, c| {
        format!("{:.4}", ledger(c, "realtime_usd"))
    });
    row("  the ledger: as served, USD", &|_, c| {
        format!("{:.4}", ledger(c, "served_usd"))
    });
    row("saved against all-realtime (ledger)", &|_, c| {
        let rt = ledger(c, "realtime_usd");
        if rt > 0.0 {
            format!("{:.1}%", 100.0 * (rt - ledger(c, "served_usd")) / rt)
        } else {
            "-".to_owned()
        }
    });
    println!();
    println!(
        "  {:<34} {:>6} {:>9} {:>8} {:>8} {:>9} {:>7}",
        "by caller (good calls)", "calls", "in time", "batch", "flex", "realtime", "failed"
    );
    for (kind, t) in &kinds {
        println!(
            "  {:<34} {:>6} {:>9} {:>8} {:>8} {:>9} {:>7}",
            kind.label(),
            t.good,
            if t.eligible == t.good {
                "yes"
            } else if t.eligible == 0 {
                "no"
            } else {
                "some"
            },
            pct(t.tier("batch"), t.answered()),
            pct(t.tier("flex"), t.answered()),
            pct(t.tier("realtime"), t.answered()),
            t.good_failed
        );
    }
    let all = tallies.get("all").ok_or("no calls")?;
    println!();
    for (why, n) in &all.failures {
        println!("  good caller failed: {n} x {why}");
    }
    let flex: Vec<String> = series(&metrics, "carpool_flex_calls_total")
        .into_iter()
        .map(|(l, v)| format!("{l} {v}"))
        .collect();
    let flushes: Vec<String> = series(&metrics, "carpool_flushes_total")
        .into_iter()
        .map(|(l, v)| format!("{l} {v}"))
        .collect();
    println!(
        "  batch jobs at the sim {}; jobs mixing two projects {mixed}; double-paid {:.0}; windows waiting for quota at most {waiting_max:.0}",
        jobs.len(),
        metric(&metrics, "carpool_double_paid_total", "").abs()
    );
    println!("  flex calls: {}", flex.join(", "));
    println!("  flushes: {}", flushes.join(", "));
    let bad_sigs = hooks
        .bad_signatures
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("  webhooks with a bad signature: {bad_sigs}");
    let met = all.eligible_batch as f64 >= 0.97 * all.eligible as f64
        && all.wrong == 0
        && all.good_failed == 0
        && all.bad_answered_ok == 0
        && mixed == 0
        && bad_sigs == 0;
    println!(
        "  targets: {}",
        if met { "met" } else { "MISSED (see above)" }
    );
    Ok(met)
}
