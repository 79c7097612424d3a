//! Store benchmarks (plain main: `cargo bench --bench store`).
//!
//! 1. Durable accepts per second on SQLite (WAL, synchronous=FULL) with many
//!    concurrent tasks, group commit against the naive baseline of one
//!    transaction per request (`group_commit_max = 1`).
//! 2. RSS of the process with 100,000 pending requests.
//! 3. Streaming a 50,000-request window: lines per second and peak RSS while
//!    streaming (the high-water mark is reset just before).
//! 4. Resolving that window's results, 1,000 per call: results per second.
//!
//! Env: `CARPOOL_BENCH_PENDING` (default 100000), `CARPOOL_BENCH_TASKS`
//! (default 1024: a group holds at most one request per waiting task), `CARPOOL_BENCH_WINDOW` (default 50000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use carpool::model::{RequestId, ServedBy};
use carpool::store::{
    DeliveryMode, FlushReason, NewRequest, Resolution, ResolvedStatus, Store, StoreOptions,
    WindowLimits,
};
use futures_util::StreamExt;

const TWO_CREDS: &[&str] = &["cred-a", "cred-b"];

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A field of /proc/self/status, in kB.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here; 100 Hz.
    (ticks(11) + ticks(12)) / 100.0
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Resets VmHWM to the current RSS (Linux: write 5 to clear_refs).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn request(i: usize, model: &str, cred: &str, max_requests: u64) -> NewRequest {
    let body = format!(
        "{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"system\",\"content\":\"You are a terse assistant.\"}},\
         {{\"role\":\"user\",\"content\":\"Summarise ticket #{i} in one sentence: the customer reports that the export \
         button does nothing on the billing page.\"}}],\"max_tokens\":64}}"
    );
    NewRequest {
        id: RequestId::generate(),
        credential_hash: cred.to_owned(),
        upstream: "main".to_owned(),
        endpoint: "/v1/chat/completions".to_owned(),
        model: model.to_owned(),
        scope: carpool::model::Scope::default(),
        forward_headers: Vec::new(),
        body_hash: format!("{i:064x}"),
        body: Bytes::from(body),
        idempotency_key: None,
        sdk_retry: false,
        mode: DeliveryMode::Async,
        deadline: None,
        callback_url: None,
        upstream_key: None,
        limits: WindowLimits {
            max_requests,
            max_bytes: 200_000_000,
        },
        now: 1_700_000_000_000 + i as i64,
    }
}

/// Accepts requests `first..first + n` from `tasks` concurrent tasks;
/// returns accepts/s.
async fn accept_many(
    store: &Store,
    first: usize,
    n: usize,
    tasks: usize,
    models: &[&'static str],
    creds: &'static [&'static str],
    max_requests: u64,
) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let models: Arc<Vec<&'static str>> = Arc::new(models.to_vec());
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (store, next, models) = (store.clone(), next.clone(), models.clone());
        handles.push(tokio::spawn(async move {
            let cred = creds[t % creds.len()];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let model = models[i % models.len()];
                let r = request(first + i, model, cred, max_requests);
                store.accept(r).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn open(dir: &std::path::Path, name: &str, options: StoreOptions) -> Store {
    let url = format!("sqlite://{}", dir.join(name).display());
    Store::connect_with(&url, options).await.unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let pending = env("CARPOOL_BENCH_PENDING", 100_000);
    let tasks = env("CARPOOL_BENCH_TASKS", 1024);
    let window = env("CARPOOL_BENCH_WINDOW", 50_000);
    // On the working disk, not a tmpfs: the fsyncs are the point.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    println!(
        "store bench in {} (SQLite, WAL, synchronous=FULL)",
        dir.path().display()
    );
    println!("baseline RSS: {:.1} MB", mb(status_kb("VmRSS:")));

    // Naive baseline: one transaction (one fsync) per request.
    let naive_options = StoreOptions {
        group_commit_max: 1,
        ..StoreOptions::default()
    };
    let naive = open(dir.path(), "naive.db", naive_options).await;
    let naive_n = 2_000;
    let rate = accept_many(&naive, 0, naive_n, tasks, &["m1"], TWO_CREDS, 50_000).await;
    println!("accepts/s, one commit per request ({naive_n} reqs, {tasks} tasks): {rate:.0}");
    naive.close().await;
    drop(naive);

    let store = open(dir.path(), "carpool.db", StoreOptions::default()).await;
    let models = ["m1", "m2", "m3", "m4"];
    let cpu = cpu_secs();
    let rate = accept_many(&store, 0, pending, tasks, &models, TWO_CREDS, 50_000).await;
    let cpu_us = (cpu_secs() - cpu) * 1e6 / pending as f64;
    println!(
        "accepts/s, group commit ({pending} reqs, {tasks} tasks): {rate:.0} \
         (process CPU per accept: {cpu_us:.0} us, so about {:.0} accepts per CPU-second)",
        1e6 / cpu_us
    );
    let open_windows = store.open_windows().await.unwrap();
    let held: u64 = open_windows.iter().map(|w| w.count).sum();
    println!(
        "RSS at {held} pending requests in {} open windows: {:.1} MB (peak so far {:.1} MB)",
        open_windows.len(),
        mb(status_kb("VmRSS:")),
        mb(status_kb("VmHWM:"))
    );

    // One window of `window` requests, sealed, then streamed.
    let start = Instant::now();
    let rate = accept_many(
        &store,
        pending,
        window,
        tasks,
        &["big"],
        &["cred-c"],
        window as u64 + 1,
    )
    .await;
    let big = store
        .open_windows()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.key.model == "big")
        .unwrap();
    println!(
        "filled one {}-request window in {:.2} s ({rate:.0} accepts/s)",
        big.count,
        start.elapsed().as_secs_f64()
    );
    assert!(store
        .seal_window(&big.id, FlushReason::Operator, 0)
        .await
        .unwrap());

    reset_peak();
    let before = status_kb("VmRSS:");
    let start = Instant::now();
    let mut lines = store.window_lines(&big.id);
    let (mut count, mut bytes, mut max_rss) = (0u64, 0u64, before);
    let mut ids = Vec::with_capacity(window);
    while let Some(line) = lines.next().await {
        let (id, body) = line.unwrap();
        ids.push(id);
        count += 1;
        bytes += body.len() as u64;
        if count % 5_000 == 0 {
            max_rss = max_rss.max(status_kb("VmRSS:"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(count, big.count);
    println!(
        "streamed {count} lines ({:.1} MB) in {secs:.2} s: {:.0} lines/s; RSS before {:.1} MB, \
         peak sampled while streaming {:.1} MB (VmHWM since reset {:.1} MB)",
        bytes as f64 / 1e6,
        count as f64 / secs,
        mb(before),
        mb(max_rss),
        mb(status_kb("VmHWM:"))
    );

    // Results: the whole window resolved from an output file, in chunks
    // as the reconciler would apply them.
    assert!(store.record_upload(&big.id, "file").await.unwrap());
    assert!(store.mark_creating(&big.id).await.unwrap());
    assert!(store.record_job(&big.id, "job", 1).await.unwrap());
    let answer = Bytes::from_static(
        b"{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\
          \"message\":{\"role\":\"assistant\",\"content\":\"The export button on the billing page \
          does nothing.\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":41,\
          \"completion_tokens\":9,\"total_tokens\":50}}",
    );
    let start = Instant::now();
    let mut resolved = 0;
    for chunk in ids.chunks(1_000) {
        let batch = chunk
            .iter()
            .map(|id| Resolution {
                id: id.clone(),
                status: ResolvedStatus::Succeeded,
                served_by: Some(ServedBy::Batch),
                response_status: Some(200),
                response_body: Some(answer.clone()),
                error_code: None,
                error_message: None,
                completed_at: 2,
                // Every answered line is priced: its ledger row is part of
                // the cost of storing it.
                charge: Some(carpool::pricing::Charge {
                    usage: carpool::pricing::TokenUsage {
                        prompt: 12,
                        completion: 7,
                    },
                    realtime_nusd: 6_000,
                    served_nusd: 3_000,
                }),
            })
            .collect();
        resolved += store.resolve(&big.id, batch).await.unwrap().len();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(resolved, ids.len());
    println!(
        "resolved {resolved} results in chunks of 1000 in {secs:.2} s: {:.0} results/s",
        resolved as f64 / secs
    );
    store.close().await;
}
