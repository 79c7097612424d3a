//! Micro-benchmarks of the deferred path's hot pieces, each beside the naive
//! way it could have been written.
//!
//! `cargo bench --bench micro` (criterion; add `-- --quick` for a short run).
//!
//! - `input_line/*`: one JSONL batch input line from a caller's body.
//!   `raw_writer` is [`carpool::providers::write_input_line`] (members copied
//!   as raw text); `value_roundtrip` parses into a `serde_json::Value`,
//!   edits it and serialises it again.
//! - `result_line/*`: one output line read back.
//!   `borrowed` is [`carpool::providers::parse_result_line`] (borrowed raw
//!   body); `value_tree` parses the whole line into a `Value`.
//! - `store/*`: SQLite (WAL, synchronous=FULL) on a temp file.
//!   `accept_concurrent_256` is 256 acceptances in flight at once (the group
//!   commit shares one fsync among them); `accept_sequential` is one at a
//!   time (one commit each), the figure a writer without grouping would get.
//!   `get` reads one request back by id.

use std::time::{Duration, Instant};

use bytes::Bytes;
use carpool::model::{Dialect, RequestId};
use carpool::providers::{parse_result_line, write_input_line};
use carpool::store::{DeliveryMode, NewRequest, Store, WindowLimits};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Value};

const BODY: &str = r#"{"model":"mistral-small-latest","messages":[{"role":"system","content":"You are a careful assistant that answers in one paragraph."},{"role":"user","content":"Summarise the attached support ticket #48213 in two sentences and name the product it is about."}],"temperature":0.2,"max_tokens":256,"stream":false}"#;

const RESULT: &str = r#"{"id":"batch-req-1","custom_id":"req_01J9Z8Q6M2V5K7T3W4X8Y1Z2A3","response":{"status_code":200,"body":{"id":"cmpl-7f3a","object":"chat.completion","created":1717171717,"model":"mistral-small-latest","choices":[{"index":0,"message":{"role":"assistant","content":"The customer reports that the export button of the reporting dashboard fails with a timeout on large accounts. The product is the Analytics Suite."},"finish_reason":"stop"}],"usage":{"prompt_tokens":61,"completion_tokens":34,"total_tokens":95}}},"error":null}"#;

/// The naive line builder: parse, edit, serialise.
fn input_line_via_value(custom_id: &str, body: &[u8], out: &mut Vec<u8>) -> serde_json::Result<()> {
    let mut body: Value = serde_json::from_slice(body)?;
    if let Some(object) = body.as_object_mut() {
        object.remove("stream");
        object.remove("stream_options");
    }
    serde_json::to_writer(&mut *out, &json!({"custom_id": custom_id, "body": body}))?;
    out.push(b'\n');
    Ok(())
}

/// The naive result reader: the whole line as a tree, then the fields.
fn result_via_value(line: &[u8]) -> Option<(String, u16, Bytes)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let id = v.get("custom_id")?.as_str()?.to_owned();
    let response = v.get("response")?;
    let status = response.get("status_code")?.as_u64()? as u16;
    let body = serde_json::to_vec(response.get("body")?).ok()?;
    Some((id, status, Bytes::from(body)))
}

fn lines(c: &mut Criterion) {
    let mut group = c.benchmark_group("input_line");
    group.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1024);
    group.bench_function("raw_writer", |b| {
        b.iter(|| {
            out.clear();
            write_input_line(
                Dialect::Mistral,
                "req_01J9Z8Q6M2V5K7T3W4X8Y1Z2A3",
                "/v1/chat/completions",
                std::hint::black_box(BODY.as_bytes()),
                &mut out,
            )
        })
    });
    group.bench_function("value_roundtrip", |b| {
        b.iter(|| {
            out.clear();
            input_line_via_value(
                "req_01J9Z8Q6M2V5K7T3W4X8Y1Z2A3",
                std::hint::black_box(BODY.as_bytes()),
                &mut out,
            )
        })
    });
    group.finish();

    let mut group = c.benchmark_group("result_line");
    group.throughput(Throughput::Elements(1));
    group.bench_function("borrowed", |b| {
        b.iter(|| parse_result_line(std::hint::black_box(RESULT.as_bytes())))
    });
    group.bench_function("value_tree", |b| {
        b.iter(|| result_via_value(std::hint::black_box(RESULT.as_bytes())))
    });
    group.finish();
}

fn new_request(n: u64) -> NewRequest {
    let body = Bytes::from_static(BODY.as_bytes());
    NewRequest {
        id: RequestId::generate(),
        credential_hash: "bench".to_owned(),
        upstream: "sim".to_owned(),
        endpoint: "/v1/chat/completions".to_owned(),
        model: format!("bench-{}", n / 50_000),
        scope: carpool::model::Scope::default(),
        forward_headers: Vec::new(),
        body_hash: format!("{n:064x}"),
        body,
        idempotency_key: None,
        sdk_retry: false,
        mode: DeliveryMode::Async,
        deadline: None,
        callback_url: None,
        upstream_key: None,
        limits: WindowLimits {
            max_requests: 100_000,
            max_bytes: 512_000_000,
        },
        now: 1_700_000_000_000,
    }
}

fn store(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        eprintln!("micro: cannot build a runtime; store benches skipped");
        return;
    };
    let Ok(dir) = tempfile::tempdir() else {
        eprintln!("micro: no temp dir; store benches skipped");
        return;
    };
    let url = format!("sqlite://{}", dir.path().join("micro.db").display());
    let store = match rt.block_on(Store::connect(&url)) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("micro: cannot open the store ({err}); store benches skipped");
            return;
        }
    };
    let mut counter = 0u64;
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));

    group.throughput(Throughput::Elements(256));
    group.bench_function("accept_concurrent_256", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batch: Vec<NewRequest> = (0..256)
                    .map(|_| {
                        counter += 1;
                        new_request(counter)
                    })
                    .collect();
                let store = store.clone();
                total += rt.block_on(async move {
                    let start = Instant::now();
                    let mut set = tokio::task::JoinSet::new();
                    for req in batch {
                        let store = store.clone();
                        set.spawn(async move { store.accept(req).await.map(|_| ()) });
                    }
                    while let Some(done) = set.join_next().await {
                        if !matches!(done, Ok(Ok(()))) {
                            panic!("accept failed: {done:?}");
                        }
                    }
                    start.elapsed()
                });
            }
            total
        })
    });

    group.throughput(Throughput::Elements(1));
    group.bench_function("accept_sequential", |b| {
        b.iter_batched(
            || {
                counter += 1;
                new_request(counter)
            },
            |req| rt.block_on(store.accept(req)),
            BatchSize::SmallInput,
        )
    });

    let ids: Vec<RequestId> = rt.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..1_000 {
            counter += 1;
            if let Ok(a) = store.accept(new_request(counter)).await {
                ids.push(a.record.id);
            }
        }
        ids
    });
    let mut i = 0usize;
    group.bench_function("get", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len().max(1);
            rt.block_on(store.get(&ids[i], "bench"))
        })
    });
    group.finish();
    rt.block_on(store.close());
}

criterion_group!(benches, lines, store);
criterion_main!(benches);
