//! The fault campaign: three replicas of the real binary on one Postgres
//! store, a steady mix of wait, async and callback calls over two dialects,
//! while a driver kills (SIGKILL) or stops (SIGTERM) a random replica at a
//! random moment and starts it again, cuts every Postgres connection, and
//! injects provider faults (429s and 500s on files and batch calls, failed
//! and expired jobs, slow answers). Then it checks what carpool promises:
//!
//! - every acknowledged request answered, with its own answer (the
//!   simulator's answer to that very body), to its own caller or handle;
//! - no batch line paid twice, and no request paid as a batch line and a
//!   realtime call beyond the double payments the ledger counts;
//! - every webhook delivered, none with a body that is not its request's;
//! - the ledger equal to a recount of the stored answers.
//!
//! It prints the figures. The short form (20 s of traffic) runs with the
//! tests; `CARPOOL_CAMPAIGN_SECS=600 cargo test --test campaign --
//! --nocapture` runs a longer one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use bytes::Bytes;
use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use support::binary::Binary;
use support::{settled, CHAT};
use tokio::time::Instant;

const KEY: &str = "sk-campaign";
const ADMIN: &str = "admin-t";
const REPLICAS: usize = 3;
const MODELS: [&str; 4] = [
    "gpt-4o-mini",
    "gpt-4.1-nano",
    "mistral-small",
    "mistral-large",
];

/// What the driver did, by kind.
#[derive(Default)]
struct Tally {
    kills: AtomicU64,
    terms: AtomicU64,
    pg_cuts: AtomicU64,
    faults: Mutex<BTreeMap<&'static str, u64>>,
}

/// One call whose answer is owed: acknowledged with 202, or answered on
/// its held connection.
struct Owed {
    id: String,
    body: Value,
    kind: &'static str,
}

#[derive(Default)]
struct Calls {
    owed: Mutex<Vec<Owed>>,
    /// Wait-mode answers, checked as they came: (served_by, was it right).
    waited: Mutex<Vec<(String, bool)>>,
    /// Calls cut before an acknowledgement (the replica went away).
    cut: AtomicU64,
    /// Calls refused with a status (e.g. 503 while a replica drains).
    refused: Mutex<BTreeMap<u16, u64>>,
}

/// The webhook receiver: every delivery, as it came.
#[derive(Default)]
struct Hooks {
    got: Mutex<Vec<Value>>,
}

async fn hook(State(hooks): State<Arc<Hooks>>, body: Bytes) -> StatusCode {
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => {
            hooks.got.lock().unwrap().push(v);
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

fn config(sim: &SimHandle) -> String {
    let base = sim.base_url();
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_token = "{ADMIN}"
shutdown_grace = "2s"

[[upstreams]]
name = "oa"
dialect = "openai"
base_url = "{base}"
api_key_env = "UPSTREAM_KEY"
models = ["gpt-*"]

[[upstreams]]
name = "mi"
dialect = "mistral"
base_url = "{base}"
api_key_env = "UPSTREAM_KEY"
models = ["mistral-*"]

[batching]
max_wait = "300ms"
poll_interval = "100ms"
delete_files = false

[webhooks]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
allow_hosts = ["127.0.0.1"]
schedule = ["100ms"]
timeout = "2s"
max_attempts = 1000

[prices]
[[prices.models]]
model = "gpt-*"
input = 1000.0
output = 4000.0
[[prices.models]]
model = "mistral-*"
input = 500.0
output = 1500.0
"#
    )
}

/// The replicas' addresses as callers see them: `None` while one is down.
type Addresses = Arc<RwLock<Vec<Option<String>>>>;

fn pick(addresses: &Addresses, rng: &mut StdRng) -> Option<String> {
    let live: Vec<String> = addresses
        .read()
        .unwrap()
        .iter()
        .flatten()
        .cloned()
        .collect();
    (!live.is_empty()).then(|| live[rng.gen_range(0..live.len())].clone())
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// One caller: sends calls until `stop`, recording what is owed.
async fn caller(
    n: u64,
    addresses: Addresses,
    hook_url: String,
    calls: Arc<Calls>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ n);
    let client = http();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let Some(addr) = pick(&addresses, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let model = MODELS[rng.gen_range(0..MODELS.len())];
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("campaign {n} {i}")}],
            "max_tokens": 16,
        });
        let kind = match rng.gen_range(0..10) {
            0..=3 => "async",
            4..=6 => "wait",
            _ => "callback",
        };
        let mut request = client
            .post(format!("http://{addr}{CHAT}"))
            .bearer_auth(KEY)
            .json(&body);
        request = match kind {
            "async" => request.header("carpool-mode", "async"),
            "wait" => request.header("carpool-mode", "wait"),
            _ => request.header("carpool-callback", &hook_url),
        };
        let resp = match request.send().await {
            Ok(resp) => resp,
            Err(_) => {
                calls.cut.fetch_add(1, Ordering::SeqCst);
                continue;
            }
        };
        let status = resp.status().as_u16();
        let served_by = resp
            .headers()
            .get("carpool-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let id = resp
            .headers()
            .get("carpool-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        match (kind, status) {
            ("wait", 200) => {
                let Ok(answer) = resp.json::<Value>().await else {
                    calls.cut.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                let right = answer == sim::expected_response(CHAT, &body);
                calls.waited.lock().unwrap().push((served_by, right));
                calls.owed.lock().unwrap().push(Owed { id, body, kind });
            }
            (_, 202) if kind != "wait" => {
                let Ok(object) = resp.json::<Value>().await else {
                    calls.cut.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                let id = object["id"].as_str().unwrap_or_default().to_owned();
                calls.owed.lock().unwrap().push(Owed { id, body, kind });
            }
            (_, status) => {
                *calls.refused.lock().unwrap().entry(status).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..80))).await;
    }
}

/// Cuts every Postgres connection of the replicas (they connect under
/// `application_name`, so no other test's connections are touched).
async fn cut_postgres(application: &str) {
    let mut conn = sqlx::PgConnection::connect(support::pg::PG_URL)
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(application)
    .execute(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
}

/// A provider fault, by kind.
fn fault(rng: &mut StdRng) -> (&'static str, Fault) {
    match rng.gen_range(0..7) {
        0 => (
            "429 on create",
            Fault::rate_limited("POST /v1/batches", 2, 1),
        ),
        1 => (
            "429 on mistral create",
            Fault::rate_limited("POST /v1/batch/jobs", 2, 1),
        ),
        2 => ("500 on upload", Fault::status("POST /v1/files", 500, 1)),
        3 => (
            "500 on poll",
            Fault::status("GET /v1/batches/{batch_id}", 500, 2),
        ),
        4 => ("failed job", Fault::next_job(JobOutcome::Failed)),
        5 => ("expired job", Fault::next_job(JobOutcome::Expired)),
        _ => (
            "500 on download",
            Fault::status("GET /v1/files/{file_id}/content", 500, 1),
        ),
    }
}

/// The custom ids each finished job answered with 200, read from the
/// provider's own output files.
async fn paid_lines(sim: &SimHandle) -> BTreeMap<String, u64> {
    let client = http();
    let mut paid = BTreeMap::new();
    for job in sim.jobs() {
        let Some(file) = job.output_file_id else {
            continue;
        };
        let text = client
            .get(format!("{}/v1/files/{file}/content", sim.base_url()))
            .bearer_auth("sk-upstream")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let ok = v["response"]["status_code"] == 200 || v["response"]["status_code"] == 200.0;
            if let (true, Some(id)) = (ok, v["custom_id"].as_str()) {
                *paid.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    paid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_mid_flight_lose_nothing_and_pay_once() {
    if support::pg::skipped() {
        return;
    }
    let secs: u64 = std::env::var("CARPOOL_CAMPAIGN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CARPOOL_CAMPAIGN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("campaign: {secs} s of traffic, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let schema = support::pg::Schema::create().await;
    let application = format!("campaign_{}", schema.0);
    let url = format!("{}&application_name={application}", schema.url());
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("carpool.toml");
    std::fs::write(&path, config(&sim)).unwrap();
    let env = [
        ("UPSTREAM_KEY", "sk-upstream"),
        ("CARPOOL_STORE__URL", url.as_str()),
    ];

    let hooks = Arc::new(Hooks::default());
    let app = axum::Router::new().fallback(hook).with_state(hooks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut replicas: Vec<Option<Binary>> = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(Some(Binary::start(&path, &env).await));
    }
    let addresses: Addresses = Arc::new(RwLock::new(
        replicas
            .iter()
            .map(|r| r.as_ref().map(|b| b.addr().to_owned()))
            .collect(),
    ));
    let calls = Arc::new(Calls::default());
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|n| {
            tokio::spawn(caller(
                n,
                addresses.clone(),
                hook_url.clone(),
                calls.clone(),
                stop.clone(),
                seed,
            ))
        })
        .collect();

    // The driver: one disruption every 1-3 s until the traffic stops.
    let tally = Tally::default();
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1_000..3_000))).await;
        let (name, f) = fault(&mut rng);
        sim.add_fault(f);
        *tally.faults.lock().unwrap().entry(name).or_default() += 1;
        let r = rng.gen_range(0..REPLICAS);
        match rng.gen_range(0..10) {
            0..=5 => {
                addresses.write().unwrap()[r] = None;
                if let Some(mut b) = replicas[r].take() {
                    b.kill();
                }
                tally.kills.fetch_add(1, Ordering::SeqCst);
            }
            6..=8 => {
                addresses.write().unwrap()[r] = None;
                if let Some(mut b) = replicas[r].take() {
                    b.terminate();
                    b.exited().await;
                }
                tally.terms.fetch_add(1, Ordering::SeqCst);
            }
            _ => {
                cut_postgres(&application).await;
                tally.pg_cuts.fetch_add(1, Ordering::SeqCst);
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1_000))).await;
        if replicas[r].is_none() {
            let b = Binary::start(&path, &env).await;
            addresses.write().unwrap()[r] = Some(b.addr().to_owned());
            replicas[r] = Some(b);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    sim.clear_faults();

    // Every owed answer, from whichever replica, is the caller's own.
    let owed = std::mem::take(&mut *calls.owed.lock().unwrap());
    let any = replicas[0].as_ref().unwrap();
    let mut lost = 0;
    let mut wrong = 0;
    let mut served: HashMap<String, String> = HashMap::new();
    for o in &owed {
        let object = settled(any, KEY, &o.id).await;
        if object["status"] != "succeeded" {
            lost += 1;
            println!("campaign: {} {} ended {}", o.kind, o.id, object);
            continue;
        }
        if object["response"]["body"] != sim::expected_response(CHAT, &o.body) {
            wrong += 1;
        }
        served.insert(
            o.id.clone(),
            object["served_by"].as_str().unwrap_or("").to_owned(),
        );
    }
    let waited = calls.waited.lock().unwrap().clone();
    wrong += waited.iter().filter(|(_, right)| !right).count();

    // Webhooks: each callback request delivered, every body its own.
    let bodies: HashMap<&str, &Value> = owed
        .iter()
        .filter(|o| o.kind == "callback")
        .map(|o| (o.id.as_str(), &o.body))
        .collect();
    let deadline = Instant::now() + support::PATIENCE;
    let got = loop {
        let got = hooks.got.lock().unwrap().clone();
        let delivered: BTreeSet<&str> = got
            .iter()
            .filter_map(|v| v["data"]["id"].as_str())
            .collect();
        if bodies.keys().all(|id| delivered.contains(*id)) || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delivered: BTreeSet<&str> = got
        .iter()
        .filter_map(|v| v["data"]["id"].as_str())
        .collect();
    let undelivered = bodies.keys().filter(|id| !delivered.contains(*id)).count();
    // A callback request whose 202 a kill cut off is still delivered: its
    // body is read from the store.
    let mut pg = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut wrong_hooks = 0;
    for v in &got {
        let id = v["data"]["id"].as_str().unwrap_or_default();
        let body = match bodies.get(id) {
            Some(body) => Some((*body).clone()),
            None => {
                sqlx::query("SELECT body FROM requests WHERE id = $1 AND callback_url IS NOT NULL")
                    .bind(id)
                    .fetch_optional(&mut pg)
                    .await
                    .unwrap()
                    .and_then(|row| serde_json::from_slice(&row.get::<Vec<u8>, _>("body")).ok())
            }
        };
        let right = body.is_some_and(|body| {
            v["data"]["response"]["body"] == sim::expected_response(CHAT, &body)
        });
        if !right {
            wrong_hooks += 1;
            println!("campaign: webhook with a body not its request's: {v}");
        }
    }

    // Paid once: no batch line answered twice, and no request both a paid
    // batch line and answered realtime, beyond what the ledger counts.
    let paid = paid_lines(&sim).await;
    let lines_paid_twice = paid.values().filter(|n| **n > 1).count();
    let batch_and_realtime = served
        .iter()
        .filter(|(id, by)| *by != "batch" && paid.contains_key(id.as_str()))
        .count();

    // The ledger against a recount of the stored answers.
    let rows = sqlx::query(
        "SELECT response_body FROM requests WHERE status = 'succeeded' AND response_body IS NOT NULL",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap();
    let (mut recount, mut input, mut output) = (0u64, 0u64, 0u64);
    for row in &rows {
        let body: Vec<u8> = row.get("response_body");
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let (Some(i), Some(o)) = (
            v["usage"]["prompt_tokens"].as_u64(),
            v["usage"]["completion_tokens"].as_u64(),
        ) {
            recount += 1;
            input += i;
            output += o;
        }
    }
    let _ = pg.close().await;
    let savings: Value = support::client()
        .get(any.url("/admin/savings"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let total = &savings["total"];
    let ledger = (
        total["requests"].as_u64().unwrap_or(0),
        total["input_tokens"].as_u64().unwrap_or(0),
        total["output_tokens"].as_u64().unwrap_or(0),
    );
    let double_paid = total["double_paid"].as_u64().unwrap_or(0) as usize;

    let by_kind = |k: &str| owed.iter().filter(|o| o.kind == k).count();
    println!(
        "campaign: owed {} (async {}, callback {}, wait {}), cut before an answer {}, refused {:?}",
        owed.len(),
        by_kind("async"),
        by_kind("callback"),
        by_kind("wait"),
        calls.cut.load(Ordering::SeqCst),
        calls.refused.lock().unwrap()
    );
    println!(
        "campaign: kills {}, SIGTERMs {}, Postgres cuts {}, provider faults {:?}",
        tally.kills.load(Ordering::SeqCst),
        tally.terms.load(Ordering::SeqCst),
        tally.pg_cuts.load(Ordering::SeqCst),
        tally.faults.lock().unwrap()
    );
    println!(
        "campaign: jobs {}, lines paid {}, served realtime {}",
        sim.jobs().len(),
        paid.len(),
        served.values().filter(|b| *b == "realtime").count()
            + waited.iter().filter(|(b, _)| b == "realtime").count()
    );
    println!(
        "campaign checks (all 0): lost {lost}, wrong answers {wrong}, webhooks undelivered {undelivered}, \
         wrong webhook bodies {wrong_hooks}, batch lines paid twice {lines_paid_twice}, \
         paid batch and realtime beyond the ledger's double payments {}, ledger minus recount {:?}",
        batch_and_realtime.saturating_sub(double_paid),
        (
            ledger.0 as i64 - recount as i64,
            ledger.1 as i64 - input as i64,
            ledger.2 as i64 - output as i64
        )
    );
    assert!(owed.len() > 20, "too little traffic got through");
    assert_eq!(lost, 0);
    assert_eq!(wrong, 0);
    assert_eq!(undelivered, 0);
    assert_eq!(wrong_hooks, 0);
    assert_eq!(lines_paid_twice, 0);
    assert!(batch_and_realtime <= double_paid);
    assert_eq!(ledger, (recount, input, output));
    drop(replicas);
}
