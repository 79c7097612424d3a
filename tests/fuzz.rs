//! Fuzzing on stable Rust: every parser that reads input from a caller, a
//! provider or an operator gets mutated inputs and must never panic.
//!
//! Each target starts from its seed corpus (`tests/fuzz/corpus/<target>/`,
//! replayed first and every run, so an input that once broke a parser
//! stays a regression test) and runs `CARPOOL_FUZZ_RUNS` mutated inputs
//! (default 3,000 per target: the short form CI runs). The full run:
//!
//! ```sh
//! CARPOOL_FUZZ_RUNS=10000000 cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! Mutations are random (seeded by `CARPOOL_FUZZ_SEED`, printed when a
//! target fails so a failure replays): bit flips, interesting bytes, tokens
//! from the target's dictionary, deleted, repeated and spliced ranges. An
//! input that panics is written to `target/fuzz-found/` and named in the
//! failure; once fixed, copy it into the target's corpus.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use carpool::model::Dialect;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// One fuzz target: a name (its corpus folder), tokens worth splicing in,
/// and the code under test.
struct Target {
    name: &'static str,
    dictionary: &'static [&'static str],
    run: fn(&[u8]),
}

const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "false",
    "-0",
    "1e999",
    "-1",
    "18446744073709551616",
    "0.5",
    "\"\"",
    "{}",
    "[]",
    "\u{feff}",
    "\u{ff}",
];

const KEYS: &[&str] = &[
    "\"model\":",
    "\"stream\":",
    "\"custom_id\":",
    "\"response\":",
    "\"body\":",
    "\"status_code\":",
    "\"error\":",
    "\"usage\":",
    "\"prompt_tokens\":",
    "\"completion_tokens\":",
    "\"input_tokens\":",
    "\"output_tokens\":",
    "\"id\":",
    "\"status\":",
    "\"output_file_id\":",
    "\"error_file_id\":",
    "\"request_counts\":",
    "\"metadata\":",
    "\"data\":",
    "\"has_more\":",
    "\"choices\":",
    "\"result\":",
    "\"type\":",
    "\"message\":",
    "\"content\":",
    "\"processing_status\":",
    "\"results_url\":",
    "\"job\":",
    "\"errors\":",
    "\"line\":",
    "\"filename\":",
    "\"object\":",
    "\"output\":",
    "\"delta\":",
    "\"created_at\":",
    "\"ended_at\":",
];

const HEADER_TOKENS: &[&str] = &[
    "Bearer ",
    "bearer\t",
    "Basic ",
    "respond-async",
    "wait=",
    ",",
    ";",
    "=",
    " ",
    "\t",
    "wait",
    "async",
    "return=minimal",
    "2026-12-07T12:00:00Z",
    "+99:99",
    "1e9",
    "-5",
    "0",
    "99999999999999",
    "18446744073709551615",
    "1.5",
    "NaN",
    "inf",
];

const TOML_TOKENS: &[&str] = &[
    "[[upstreams]]\n",
    "[batching]\n",
    "[server]\n",
    "[store]\n",
    "[prices]\n",
    "[[prices.models]]\n",
    "[[clients]]\n",
    "[[rules]]\n",
    "[webhooks]\n",
    "name = ",
    "dialect = ",
    "base_url = ",
    "api_key_env = ",
    "max_wait = ",
    "\"1h\"",
    "\"0s\"",
    "\"99999999999d\"",
    "= 1e308\n",
    "= -1\n",
    "models = [\"*\"]\n",
    "flex = true\n",
    "completion_window = ",
    "\"openai\"",
    "\"mistral\"",
    "\"anthropic\"",
    "\"http://[::1]:0\"",
    "\n",
    "'''",
    "\"\"\"",
    "#",
];

const ENV_TOKENS: &[&str] = &[
    "CARPOOL_",
    "__",
    "SERVER",
    "LISTEN",
    "BATCHING",
    "MAX_WAIT",
    "UPSTREAMS",
    "0",
    "1",
    "99999",
    "NAME",
    "=",
    "\n",
    "STORE",
    "URL",
    "PRICES",
    "MODELS",
];

const URL_TOKENS: &[&str] = &[
    "http://",
    "https://",
    "://",
    "@",
    ":",
    "[",
    "]",
    "::ffff:",
    "127.0.0.1",
    "0x7f.1",
    "0177.0.0.1",
    "2130706433",
    "%2e",
    "%00",
    "localhost",
    "64:ff9b::",
    "2001::",
    "fe80::1%25eth0",
    "?token=",
    "#",
    "/",
    "\\",
    ".",
    "..",
    ":65536",
    ":0",
];

const SSE_TOKENS: &[&str] = &[
    "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"x\"}}]",
    "\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"x\"}]}]",
    "\"content\":[{\"type\":\"text\",\"text\":\"x\"},{\"type\":\"tool_use\",\"input\":{}}]",
    "\"tool_calls\":[{\"function\":{\"arguments\":\"{\"}}]",
    "\"status\":\"incomplete\"",
];

fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "request_body",
            dictionary: KEYS,
            run: |data| {
                let _ = carpool::proxy::inspect::probe(Bytes::copy_from_slice(data));
                let _ = carpool::pricing::TokenUsage::from_body(data);
            },
        },
        Target {
            name: "headers",
            dictionary: HEADER_TOKENS,
            run: read_headers,
        },
        Target {
            name: "result_line",
            dictionary: KEYS,
            run: |data| {
                let _ = carpool::resolution::reconcile::result_line(data, 1_765_000_000_000);
                let _ = carpool::providers::lines::parse_result_line(data);
            },
        },
        Target {
            name: "anthropic",
            dictionary: KEYS,
            run: |data| {
                let text = String::from_utf8_lossy(data);
                let _ = carpool::providers::anthropic::named_requests(&text);
                let _ = carpool::providers::anthropic::parse_rfc3339(&text);
                if let Ok(v) = serde_json::from_slice::<Value>(data) {
                    let _ = carpool::providers::anthropic::parse_result("req".to_owned(), &v);
                    let _ = carpool::providers::anthropic::parse_batch(&v);
                    let _ = carpool::providers::anthropic::parse_list(&v);
                }
            },
        },
        Target {
            name: "batch_objects",
            dictionary: KEYS,
            run: |data| {
                let text = String::from_utf8_lossy(data);
                let _ = carpool::providers::files::window_of_input(&text);
                for dialect in [Dialect::Openai, Dialect::Mistral, Dialect::Anthropic] {
                    let _ = carpool::providers::jobs::phase_of(dialect, &text);
                }
                let Ok(v) = serde_json::from_slice::<Value>(data) else {
                    return;
                };
                for dialect in [Dialect::Openai, Dialect::Mistral] {
                    let _ = carpool::providers::jobs::parse_job(dialect, &v);
                    let _ = carpool::providers::jobs::parse_list(dialect, &v, Some("b"));
                    let _ = carpool::providers::files::parse_list(dialect, &v, None);
                }
            },
        },
        Target {
            name: "sse_replay",
            dictionary: SSE_TOKENS,
            run: |data| {
                let status = data
                    .first()
                    .map_or(200, |b| if b % 4 == 0 { 400 } else { 200 });
                let _ = carpool::deferral::sse::replay(status, data);
                let _ = carpool::deferral::sse_responses::replay(status, data);
                let _ = carpool::deferral::sse_anthropic::replay(status, data);
            },
        },
        Target {
            name: "config",
            dictionary: TOML_TOKENS,
            run: |data| {
                let vars = BTreeMap::from([("UPSTREAM_KEY".to_owned(), "sk-u".to_owned())]);
                let _ = carpool::config::from_toml_str(&String::from_utf8_lossy(data), &vars);
            },
        },
        Target {
            name: "env_overrides",
            dictionary: ENV_TOKENS,
            run: read_env_overrides,
        },
        Target {
            name: "webhook_url",
            dictionary: URL_TOKENS,
            run: |data| {
                let text = String::from_utf8_lossy(data);
                let allow = ["127.0.0.1".to_owned(), "*.example.net".to_owned()];
                if let Ok(url) = carpool::webhooks::target::check_at_intake(&text, &allow) {
                    let _ = carpool::webhooks::target::host_key(&url);
                }
                let _ = carpool::webhooks::target::check_at_intake(&text, &[]);
            },
        },
    ]
}

/// The input as `name: value` lines, read as the headers a call carries.
fn read_headers(data: &[u8]) {
    let mut map = HeaderMap::new();
    const NAMES: [&str; 7] = [
        "carpool-mode",
        "carpool-deadline",
        "prefer",
        "x-stainless-read-timeout",
        "authorization",
        "x-api-key",
        "x-stainless-retry-count",
    ];
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        let Ok(value) = HeaderValue::from_bytes(line) else {
            continue;
        };
        map.append(HeaderName::from_static(NAMES[i % NAMES.len()]), value);
    }
    let now = SystemTime::now();
    for prefixed in [false, true] {
        if let Ok(carpool::deferral::optin::Decision::Defer(answer)) =
            carpool::deferral::optin::decide(&map, prefixed, None)
        {
            let _ = carpool::deferral::optin::deadline(&map, &answer, now);
        }
    }
    let wait = carpool::deferral::optin::Answer::Wait;
    let _ = carpool::deferral::optin::deadline(&map, &wait, now);
    let _ = carpool::deferral::optin::is_sdk_retry(&map);
    let _ = carpool::server::auth::bearer(&map);
    let _ = carpool::server::auth::caller_key(&map);
    let _ = carpool::server::auth::Presented::of(&map);
}

/// The input as `NAME=value` lines of environment overrides, applied to a
/// valid config.
fn read_env_overrides(data: &[u8]) {
    const BASE: &str = "[[upstreams]]\nname = \"sim\"\ndialect = \"openai\"\n\
                        base_url = \"http://127.0.0.1:9\"\napi_key_env = \"UPSTREAM_KEY\"\n";
    let mut vars = BTreeMap::from([("UPSTREAM_KEY".to_owned(), "sk-u".to_owned())]);
    for line in String::from_utf8_lossy(data).lines() {
        if let Some((name, value)) = line.split_once('=') {
            vars.insert(name.to_owned(), value.to_owned());
        }
    }
    let _ = carpool::config::from_toml_str(BASE, &vars);
}

const INTERESTING: [u8; 12] = [
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'\n', b'\r', b',',
];

/// One to eight random edits of `input`.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, target: &Target, corpus: &[Vec<u8>]) {
    const MAX_LEN: usize = 64 * 1024;
    for _ in 0..rng.gen_range(1..=8) {
        let len = input.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
            }
            2 | 3 => {
                let tokens = if rng.gen_bool(0.7) {
                    target.dictionary
                } else {
                    JSON_TOKENS
                };
                let token = tokens[rng.gen_range(0..tokens.len())].as_bytes();
                let at = rng.gen_range(0..=len);
                input.splice(at..at, token.iter().copied());
            }
            4 if len > 0 => {
                let from = rng.gen_range(0..len);
                let to = rng.gen_range(from..=len.min(from + 32));
                input.drain(from..to);
            }
            5 if len > 0 => {
                let from = rng.gen_range(0..len);
                let to = rng.gen_range(from..=len.min(from + 64));
                let chunk = input[from..to].to_vec();
                let at = rng.gen_range(0..=input.len());
                for _ in 0..rng.gen_range(1..=4) {
                    input.splice(at..at, chunk.iter().copied());
                }
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.gen_range(0..corpus.len())];
                if !other.is_empty() {
                    let from = rng.gen_range(0..other.len());
                    let to = rng.gen_range(from..=other.len());
                    let at = rng.gen_range(0..=len);
                    input.splice(at..at, other[from..to].iter().copied());
                }
            }
            _ if len > 0 => input.truncate(rng.gen_range(0..len)),
            _ => input.push(rng.gen()),
        }
    }
    input.truncate(MAX_LEN);
}

fn corpus_of(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(name);
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{}: no seeds", dir.display());
    seeds.into_iter().map(|(_, bytes)| bytes).collect()
}

/// Runs `data` through the target; the panic message if it panicked.
fn panics(target: &Target, data: &[u8]) -> Option<String> {
    panic::catch_unwind(AssertUnwindSafe(|| (target.run)(data)))
        .err()
        .map(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        })
}

fn fuzz(name: &str) {
    let target = targets().into_iter().find(|t| t.name == name).unwrap();
    let runs: u64 = std::env::var("CARPOOL_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let seed: u64 = std::env::var("CARPOOL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    let corpus = corpus_of(name);
    // The corpus first: each seed (and each input once found) as it is.
    for (i, input) in corpus.iter().enumerate() {
        if let Some(message) = panics(&target, input) {
            panic!("{name}: corpus entry {i} panics: {message}");
        }
    }
    let started = Instant::now();
    let found = campaign(&target, &corpus, runs, seed);
    let took = started.elapsed().max(Duration::from_micros(1));
    println!(
        "fuzz {name}: {runs} executions in {:.1} s ({:.0}/s), seed {seed}, {} panics",
        took.as_secs_f64(),
        runs as f64 / took.as_secs_f64(),
        found.len()
    );
    assert!(
        found.is_empty(),
        "{name} panicked (CARPOOL_FUZZ_SEED={seed}): {found:#?}"
    );
}

/// `runs` mutated inputs through `target`; the inputs that panicked (saved
/// under `target/fuzz-found/`) and their messages, at most five.
fn campaign(target: &Target, corpus: &[Vec<u8>], runs: u64, seed: u64) -> Vec<(String, String)> {
    let mut rng = StdRng::seed_from_u64(seed ^ fnv(target.name.as_bytes()));
    let mut found = Vec::new();
    let mut input = Vec::new();
    for _ in 0..runs {
        input.clear();
        input.extend_from_slice(&corpus[rng.gen_range(0..corpus.len())]);
        mutate(&mut rng, &mut input, target, corpus);
        if let Some(message) = panics(target, &input) {
            found.push((save(target.name, &input), message));
            if found.len() >= 5 {
                break;
            }
        }
    }
    found
}

/// The harness itself: a parser that panics on a nested key after a
/// comma, which no seed holds, is caught within the short run.
#[test]
fn the_campaign_finds_a_planted_panic() {
    let planted = Target {
        name: "planted",
        dictionary: KEYS,
        run: |data| {
            let text = String::from_utf8_lossy(data);
            assert!(!text.contains(",\"model\":"), "planted");
        },
    };
    let corpus = vec![br#"{"a":1,"b":2}"#.to_vec()];
    let found = campaign(&planted, &corpus, 3_000, 7);
    assert!(
        !found.is_empty(),
        "the mutator never reached the planted panic"
    );
    assert!(found.iter().all(|(_, message)| message.contains("planted")));
}

/// Writes a panicking input under `target/fuzz-found/`; returns its path.
fn save(name: &str, input: &[u8]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-found");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{:016x}", fnv(input)));
    let _ = std::fs::write(&path, input);
    path.display().to_string()
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

macro_rules! fuzz_targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                fuzz(stringify!($name));
            }
        )*

        #[test]
        fn every_target_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for target in targets() {
                assert!(tested.contains(&target.name), "{} has no test", target.name);
            }
        }
    };
}

fuzz_targets!(
    request_body,
    headers,
    result_line,
    anthropic,
    batch_objects,
    sse_replay,
    config,
    env_overrides,
    webhook_url,
);
