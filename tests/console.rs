//! The operator's side of carpool as operators see it: the page at
//! `GET /admin/` driven in headless Chromium (`tests/console_check.py`,
//! Selenium), the admin API data it shows, `promtool check metrics` on the
//! real `/metrics` after deferred traffic, and the Grafana dashboard in
//! `config/grafana/`, whose every query must name a metric carpool exports.
//!
//! Needs Debian's `chromium`, `chromium-driver` and `prometheus` (for
//! `promtool`) and the virtualenv's `selenium`; `.ci/run` installs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use carpool::sim::{self, Fault, JobOutcome, SimOptions};
use serde_json::{json, Value};
use support::config::SimConfig;
use support::{client, metrics, python, TestApp, CHAT, PATIENCE};

const ADMIN: &str = "console-admin-token-5f1e";

async fn start(sim: &sim::SimHandle) -> TestApp {
    let config = SimConfig::new("openai", sim)
        .server("admin_token_env = \"CARPOOL_TEST_ADMIN\"")
        .batching("max_wait = \"1h\"\nmax_requests = 500")
        .extra(concat!(
            "[[batching.models]]\nmodel = \"gpt-4o-mini\"\n\n",
            "[[batching.models]]\nmodel = \"gpt-4.1-mini\"\nmax_wait = \"30m\"\n\n",
            "[prices]\n[[prices.models]]\nmodel = \"gpt-4o-mini\"\ninput = 0.15\noutput = 0.60\n",
        ))
        .toml();
    TestApp::start(
        &config,
        &[("UPSTREAM_KEY", "sk-up"), ("CARPOOL_TEST_ADMIN", ADMIN)],
    )
    .await
}

async fn admin(app: &TestApp, method: reqwest::Method, path: &str) -> reqwest::Response {
    client()
        .request(method, app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

async fn admin_json(app: &TestApp, path: &str) -> Value {
    let resp = admin(app, reqwest::Method::GET, path).await;
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

/// `n` async calls for `model`; returns their handles.
async fn defer(app: &TestApp, model: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let body =
            json!({"model": model, "messages": [{"role": "user", "content": format!("hi {i}")}]});
        let resp = client()
            .post(app.url(CHAT))
            .header("carpool-mode", "async")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let handle: Value = resp.json().await.unwrap();
        ids.push(handle["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// The only open window of `model`, as `/admin/windows` lists it.
async fn open_window(app: &TestApp, model: &str) -> Value {
    let windows = admin_json(app, "/admin/windows").await;
    let found: Vec<&Value> = windows["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["model"] == model)
        .collect();
    assert_eq!(found.len(), 1, "{windows}");
    found[0].clone()
}

/// Waits until `/admin/jobs` lists `window` as submitted.
async fn submitted(app: &TestApp, window: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let jobs = admin_json(app, "/admin/jobs").await;
        if let Some(job) = jobs["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["window"] == window && j["state"] == "submitted")
        {
            return job.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{window} never submitted: {jobs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn origin_of(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    u.origin().ascii_serialization()
}

#[tokio::test]
async fn operator_signs_in_sees_the_window_flushes_it_and_sees_its_job_in_chromium() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    // Both jobs stay at the provider, so the page shows them in flight.
    sim.add_fault(Fault::NextJob {
        outcome: JobOutcome::Stuck,
        count: 2,
    });
    let app = start(&sim).await;
    // One job already in flight, one window filling.
    defer(&app, "gpt-4.1-mini", 2).await;
    let earlier = open_window(&app, "gpt-4.1-mini").await;
    let earlier_id = earlier["id"].as_str().unwrap();
    let flushed = admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/windows/{earlier_id}/flush"),
    )
    .await;
    assert_eq!(flushed.status(), 200);
    submitted(&app, earlier_id).await;
    defer(&app, "gpt-4o-mini", 3).await;
    let window = open_window(&app, "gpt-4o-mini").await;
    let window_id = window["id"].as_str().unwrap().to_owned();

    let shot = match std::env::var_os("CARPOOL_CONSOLE_SCREENSHOT") {
        Some(path) => PathBuf::from(path),
        None => std::env::temp_dir().join(format!("carpool-console-{}.png", std::process::id())),
    };
    let (ok, out) = python::run(
        "console_check.py",
        vec![
            app.url(""),
            ADMIN.to_owned(),
            "gpt-4o-mini".to_owned(),
            "3".to_owned(),
            shot.display().to_string(),
        ],
        Vec::new(),
    )
    .await;
    assert!(ok, "the browser check failed:\n{out}");
    let report: Value =
        serde_json::from_str(out.lines().rev().find(|l| l.starts_with('{')).unwrap())
            .unwrap_or_else(|e| panic!("{e}: {out}"));

    // Signed in with the token kept for the tab only, never in a URL.
    assert_eq!(report["token_in_url"], false);
    assert_eq!(report["token_in_session_storage"], true);
    assert_eq!(report["token_in_local_storage"], false);
    // It showed the window, and its flush button sealed it into a job.
    assert_eq!(report["window"], window_id.as_str());
    assert!(
        report["window_text"].as_str().unwrap().contains("3 / 500"),
        "{report}"
    );
    let job = submitted(&app, &window_id).await;
    assert_eq!(job["flush_reason"], "operator");
    assert_eq!(job["requests"], 3);
    assert!(["sealed", "uploaded", "creating", "submitted"]
        .contains(&report["job_state"].as_str().unwrap()));
    assert!(report["requests_text"].as_str().unwrap().contains("queued"));
    assert!(report["narrow_width"].as_i64().unwrap() <= 600, "{report}");
    assert!(report["narrow_overflow"].as_i64().unwrap() <= 0, "{report}");
    // Savings: the ledger's numbers when it answers, its absence said plainly.
    let ledger = admin(&app, reqwest::Method::GET, "/admin/savings?group_by=model").await;
    let savings = report["savings_text"].as_str().unwrap();
    if ledger.status() == 404 {
        assert!(savings.contains("no ledger yet"), "{savings}");
    } else {
        assert!(savings.contains("saved today"), "{savings}");
    }

    // Every request the page made went to carpool's own origin.
    let origin = origin_of(&app.url("/"));
    let mut seen = Vec::new();
    for list in ["network", "resources", "page_fetches"] {
        let urls = report[list].as_array().unwrap();
        assert!(!urls.is_empty(), "no {list} recorded");
        for url in urls {
            let url = url.as_str().unwrap();
            assert_eq!(origin_of(url), origin, "{list}: {url}");
            assert!(!url.contains(ADMIN), "the token went into a URL: {url}");
            seen.push(url.to_owned());
        }
    }
    let flush_url = app.url(&format!("/admin/windows/{window_id}/flush"));
    assert!(seen.contains(&flush_url), "{seen:?}");
    assert!(seen.contains(&app.url("/admin/jobs")));
    // Nothing was refused by the page's own policy.
    for error in report["console_errors"].as_array().unwrap() {
        let error = error.as_str().unwrap();
        assert!(!error.contains("Content Security Policy"), "{error}");
    }
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_page_is_one_file_with_a_policy_that_allows_only_itself() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let app = start(&sim).await;
    // The page carries no data, so it needs no token; its calls do.
    let resp = client().get(app.url("/admin/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = headers["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "connect-src 'self'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("http"));
    assert_eq!(headers["cache-control"], "no-store");
    let html = resp.text().await.unwrap();
    assert!(html.contains("id=\"token\"") && html.contains("sessionStorage"));
    let bare = client().get(app.url("/admin")).send().await.unwrap();
    assert_eq!(bare.status(), 308);
    assert_eq!(bare.headers()["location"], "/admin/");
    let refused = client()
        .get(app.url("/admin/requests"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn admin_api_shows_window_limits_the_flush_forecast_and_requests_by_state() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let app = start(&sim).await;
    defer(&app, "gpt-4.1-mini", 2).await;
    let w = open_window(&app, "gpt-4.1-mini").await;
    assert_eq!(w["dialect"], "openai");
    assert_eq!(w["requests"], 2);
    assert_eq!(w["max_requests"], 500);
    assert!(w["max_bytes"].as_u64().unwrap() > w["bytes"].as_u64().unwrap());
    // Its own max_wait (30m), not the default (1h), and nothing sooner.
    assert_eq!(w["max_wait_seconds"], 1800.0);
    assert_eq!(w["flush"]["reason"], "max_wait");
    let left = w["flush"]["in_seconds"].as_f64().unwrap();
    assert!(left > 1700.0 && left <= 1800.0, "{w}");

    // A caller with a near deadline: deadline pressure seals it first.
    let resp = client()
        .post(app.url(CHAT))
        .header("carpool-mode", "async")
        .header("carpool-deadline", "600")
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "soon"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let pressed = open_window(&app, "gpt-4o-mini").await;
    assert_eq!(pressed["flush"]["reason"], "deadline", "{pressed}");
    assert!(pressed["flush"]["in_seconds"].as_f64().unwrap() < 600.0);

    let counts = admin_json(&app, "/admin/requests").await;
    assert_eq!(counts["object"], "carpool.request_counts");
    assert_eq!(counts["by_status"]["queued"], 3);
    assert_eq!(counts["by_status"]["succeeded"], 0);
    assert_eq!(counts["total"], 3);
    assert_eq!(counts["by_status"].as_object().unwrap().len(), 6);
    app.stop().await.unwrap();
}

// ---- Prometheus: promtool and the Grafana dashboard -----------------------------

/// A carpool that has served deferred traffic of every kind it counts:
/// async and held calls answered from a batch (tokens, savings, turnaround,
/// answer latency), a pass-through call and an upstream error, flushes by
/// an operator and by deadline pressure.
async fn metrics_after_traffic() -> String {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let app = start(&sim).await;
    let ids = defer(&app, "gpt-4o-mini", 2).await;
    let w = open_window(&app, "gpt-4o-mini").await;
    let flushed = admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/windows/{}/flush", w["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(flushed.status(), 200);
    for id in &ids {
        let url = app.url(&format!("/v1/carpool/requests/{id}"));
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let object: Value = client()
                .get(&url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if object["status"] == "succeeded" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{object}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "now"}]});
    let plain = client()
        .post(app.url(CHAT))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    sim.add_fault(Fault::HttpError {
        route: "POST /v1/chat/completions".to_owned(),
        status: 500,
        count: 1,
        retry_after: None,
        code: None,
        retry_after_raw: None,
    });
    let failed = client()
        .post(app.url(CHAT))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    // A held call with a near deadline: its window seals under deadline
    // pressure and the answer comes on the held connection.
    let held = client()
        .post(app.url(CHAT))
        .header("carpool-mode", "wait")
        .header("carpool-deadline", "2")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let text = metrics(&app).await;
    app.stop().await.unwrap();
    text
}

#[tokio::test]
async fn promtool_check_metrics_is_clean_after_deferred_traffic() {
    let text = metrics_after_traffic().await;
    for family in [
        "carpool_batch_turnaround_seconds_bucket",
        "carpool_tokens_total",
        "carpool_estimated_savings_usd_total",
        "carpool_passthrough_duration_seconds_bucket",
        "carpool_upstream_errors_total",
    ] {
        assert!(text.contains(family), "no {family} in:\n{text}");
    }
    assert!(text.contains("carpool_deferred_answer_seconds_count{mode=\"wait\"} 1"));
    let (ok, report) = promtool(&text).await;
    assert!(ok, "promtool check metrics failed:\n{report}");
    assert!(report.trim().is_empty(), "promtool has remarks:\n{report}");

    // The families that traffic above leaves without samples (so unrendered)
    // are linted too, from a registry where every one has a sample.
    let text = every_family();
    let (ok, report) = promtool(&text).await;
    assert!(
        ok && report.trim().is_empty(),
        "promtool:\n{report}\n{text}"
    );
}

/// The exposition of a fresh registry in which every family has a sample.
fn every_family() -> String {
    let m = carpool::metrics::Metrics::new().unwrap();
    m.requests
        .with_label_values(&["/v1/chat/completions", "wait", "ok"])
        .inc();
    m.passthrough_duration
        .with_label_values(&["/v1/chat/completions", "up"])
        .observe(0.1);
    m.proxy_overhead
        .with_label_values(&["/v1/chat/completions"])
        .observe(0.0001);
    m.upstream_errors
        .with_label_values(&["up", "create", "500"])
        .inc();
    m.deferred_accepted
        .with_label_values(&["wait", "new"])
        .inc();
    m.deferred_answer.with_label_values(&["wait"]).observe(3.0);
    m.window_requests.with_label_values(&["m"]).set(2);
    m.window_bytes.with_label_values(&["m"]).set(200);
    m.window_oldest_age.with_label_values(&["m"]).set(5);
    m.windows_waiting_for_quota
        .with_label_values(&["up", "m"])
        .set(1);
    m.flushes.with_label_values(&["max_wait"]).inc();
    m.batch_jobs
        .with_label_values(&["up", "m", "completed"])
        .inc();
    m.batch_turnaround.observe(60.0);
    m.submit_failures.inc();
    m.replicas_listening.set(1);
    m.results.with_label_values(&["succeeded"]).inc();
    m.tokens
        .with_label_values(&["m", "batch", "input"])
        .inc_by(10);
    m.upstream_retries.with_label_values(&["poll", "503"]).inc();
    m.savings.with_label_values(&["m"]).inc_by(0.01);
    m.fallbacks.with_label_values(&["deadline"]).inc();
    m.double_paid.with_label_values(&["up", "m"]).inc();
    m.resubmissions.with_label_values(&["failed"]).inc();
    m.requests_expired.with_label_values(&["batch"]).inc();
    m.intake_refused.with_label_values(&["global"]).inc();
    m.webhook_deliveries.with_label_values(&["delivered"]).inc();
    m.webhook_attempts.with_label_values(&["success"]).inc();
    m.webhook_outbox_pending.set(3);
    m.webhook_delivery_latency.observe(0.2);
    m.render()
}

/// `promtool check metrics` on `text`: whether it passed, and what it said.
async fn promtool(text: &str) -> (bool, String) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let text = text.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool not found: apt-get install prometheus (.ci/run does)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    })
    .await
    .unwrap()
}

#[test]
fn promtool_is_not_quiet_about_a_bad_exposition() {
    // The check above means something: promtool does complain.
    let bad = "# HELP carpool_thing_milliseconds x\n# TYPE carpool_thing_milliseconds counter\ncarpool_thing_milliseconds 1\n";
    let (ok, said) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(promtool(bad));
    assert!(!ok || !said.trim().is_empty(), "{said}");
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `expr` in the dashboard, wherever it sits (panels, rows, templating).
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `carpool_…` names an expression uses.
fn names(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("carpool_") {
        let boundary = rest[..at]
            .chars()
            .last()
            .map_or(true, |c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if boundary {
            found.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    found
}

/// What carpool exports: the families on a real `/metrics` (with the
/// series names a histogram adds) and every family `src/metrics.rs`
/// registers, with or without samples yet.
fn exported(text: &str) -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    let mut add = |name: &str, histogram: bool| {
        known.insert(name.to_owned());
        if histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                known.insert(format!("{name}{suffix}"));
            }
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                add(name, kind == "histogram");
            }
        }
    }
    let source = std::fs::read_to_string(repo("src/metrics.rs")).unwrap();
    let mut rest = source.as_str();
    while let Some(at) = rest.find("\"carpool_") {
        let tail = &rest[at + 1..];
        let end = tail.find('"').unwrap();
        let before = &rest[..at];
        let histogram = before
            .rfind("::new(")
            .is_some_and(|i| before[..i].ends_with("HistogramOpts"));
        add(&tail[..end], histogram);
        rest = &tail[end..];
    }
    known
}

#[tokio::test]
async fn every_grafana_query_names_a_metric_carpool_exports() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("config/grafana/carpool.json")).unwrap(),
    )
    .unwrap();
    // Importable: a title, panels, and the Prometheus data source asked for on import.
    assert!(dashboard["title"].is_string());
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| p.len() >= 10));
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 12, "{all:?}");

    let known = exported(&metrics_after_traffic().await);
    assert!(exported(&every_family()).is_subset(&known));
    assert!(known.contains("carpool_batch_turnaround_seconds_bucket"));
    assert!(known.contains("carpool_windows_waiting_for_quota"));
    let mut used = BTreeSet::new();
    for expr in &all {
        let named = names(expr);
        assert!(
            !named.is_empty() || expr.starts_with("label_values("),
            "{expr}"
        );
        for name in named {
            assert!(
                known.contains(&name),
                "the dashboard queries {name}, which carpool does not export: {expr}"
            );
            used.insert(name);
        }
    }
    // It covers what an operator watches.
    for family in [
        "carpool_requests_total",
        "carpool_passthrough_duration_seconds_bucket",
        "carpool_window_requests",
        "carpool_window_oldest_age_seconds",
        "carpool_flushes_total",
        "carpool_batch_jobs_total",
        "carpool_batch_turnaround_seconds_bucket",
        "carpool_deferred_answer_seconds_bucket",
        "carpool_fallbacks_total",
        "carpool_webhook_deliveries_total",
        "carpool_upstream_errors_total",
        "carpool_tokens_total",
        "carpool_estimated_savings_usd_total",
    ] {
        assert!(used.contains(family), "no panel queries {family}");
    }
    // And the check itself catches a name carpool does not have.
    assert_eq!(
        names("sum(rate(carpool_made_up_total[5m]))"),
        ["carpool_made_up_total"]
    );
    assert!(!known.contains("carpool_made_up_total"));
    assert!(!known.contains("carpool_requests"));
}
