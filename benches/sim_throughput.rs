//! How many plain chat calls per second the simulated provider sustains.
//!
//! `cargo bench --bench sim_throughput` (env: `SIM_BENCH_REQUESTS`, default
//! 20000; `SIM_BENCH_CONCURRENCY`, default 64). The simulator runs on its own
//! one-thread runtime and the load generator (reqwest, keep-alive) on
//! another, so on two cores neither starves the other; the figure is what
//! one core of simulator serves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use carpool::sim::{self, SimOptions};
use serde_json::json;
use tokio::sync::Semaphore;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime(name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let requests = env_num("SIM_BENCH_REQUESTS", 20_000);
    let concurrency = env_num("SIM_BENCH_CONCURRENCY", 64);
    let sim_rt = runtime("sim")?;
    let handle = sim_rt.block_on(sim::spawn(SimOptions {
        record_calls: false,
        ..SimOptions::default()
    }))?;
    let url = format!("{}/v1/chat/completions", handle.base_url());
    let load_rt = runtime("load")?;
    let (elapsed, mut latencies, errors) = load_rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()?;
        // Warm up connections.
        fire(&client, &url, concurrency * 4, concurrency).await;
        let start = Instant::now();
        let (latencies, errors) = fire(&client, &url, requests, concurrency).await;
        Ok::<_, reqwest::Error>((start.elapsed(), latencies, errors))
    })?;
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies.get(i).copied().unwrap_or_default()
    };
    println!(
        "sim_throughput: {requests} plain chat calls, concurrency {concurrency}: {:.0} req/s, p50 {:?}, p99 {:?}, errors {errors}",
        requests as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    );
    sim_rt.block_on(handle.shutdown());
    Ok(())
}

async fn fire(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    concurrency: usize,
) -> (Vec<Duration>, usize) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let client = client.clone();
        let url = url.to_owned();
        tasks.spawn(async move {
            let body = json!({
                "model": "sim-small",
                "messages": [{"role": "user", "content": format!("benchmark question {i}")}],
            });
            let t = Instant::now();
            let ok = match client
                .post(&url)
                .bearer_auth("sk-bench")
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            drop(permit);
            (t.elapsed(), ok)
        });
    }
    let mut latencies = Vec::with_capacity(n);
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((d, true)) => latencies.push(d),
            _ => errors += 1,
        }
    }
    (latencies, errors)
}
