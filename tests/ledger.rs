//! The savings ledger through the HTTP surface: `GET /admin/savings` agrees
//! to the cent with a hand count from each answer's own usage and the
//! configured prices, by model and by client, as JSON and as CSV; it does
//! not move when the binary is killed with a window half stored and its
//! results file downloaded again after the restart; and a request paid
//! twice (answered realtime at its deadline while its line sat in a live
//! batch, the batch line then paid too) shows its second charge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use carpool::sim::{self, Fault, JobOutcome, SimHandle, SimOptions};
use futures_util::future::join_all;
use serde_json::{json, Value};
use support::binary::Binary;
use support::config::SimConfig;
use support::{client, eventually, metric, metrics, settled, Server, TestApp, CHAT, PATIENCE};

const UPSTREAM_KEY: &str = "sk-upstream";
const ADMIN: &str = "admin-t";
const CLIENTS: [(&str, &str); 2] = [("alice", "sk-alice"), ("bob", "sk-bob")];
const DOWNLOAD: &str = "GET /v1/files/{file_id}/content";

/// USD per million tokens (input, output) and the batch discount of each
/// model, as the config below says.
const PRICES: [(&str, f64, f64, f64); 2] = [
    ("m-small", 1000.0, 3000.0, 0.5),
    ("m-large", 2500.0, 7000.0, 0.4),
];

fn prices_toml() -> String {
    let mut text = "[prices]\n".to_owned();
    for (model, input, output, discount) in PRICES {
        text.push_str(&format!(
            "[[prices.models]]\nmodel = \"{model}\"\ninput = {input:.1}\noutput = {output:.1}\n\
             batch_discount = {discount}\n"
        ));
    }
    text
}

fn price_of(model: &str) -> (f64, f64, f64) {
    let (_, input, output, discount) = PRICES.iter().find(|p| p.0 == model).unwrap();
    (*input, *output, *discount)
}

/// The hand count of one group: requests, tokens, and USD at realtime and
/// as served.
#[derive(Debug, Default)]
struct Hand {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    realtime: f64,
    served: f64,
}

impl Hand {
    /// One answer served by `served_by`, priced from its own usage.
    fn add(&mut self, model: &str, answer: &Value, served_by: &str) {
        let usage = &answer["usage"];
        let (prompt, completion) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        let (input, output, discount) = price_of(model);
        let realtime = prompt as f64 * input / 1e6 + completion as f64 * output / 1e6;
        self.requests += 1;
        self.input_tokens += prompt;
        self.output_tokens += completion;
        self.realtime += realtime;
        self.served += match served_by {
            "batch" => realtime * (1.0 - discount),
            _ => realtime,
        };
    }

    /// The group as the ledger reports it agrees to the cent (and to well
    /// under a micro-dollar: each row is rounded to the nano-dollar).
    fn check(&self, what: &str, requests: u64, tokens: (u64, u64), usd: [f64; 3]) {
        assert_eq!(requests, self.requests, "{what}: requests");
        assert_eq!(
            tokens,
            (self.input_tokens, self.output_tokens),
            "{what}: tokens"
        );
        let expected = [self.realtime, self.served, self.realtime - self.served];
        for (name, (got, want)) in ["realtime", "served", "saved"]
            .iter()
            .zip(usd.iter().zip(expected))
        {
            assert_eq!(
                format!("{got:.2}"),
                format!("{want:.2}"),
                "{what}: {name} to the cent"
            );
            assert!((got - want).abs() < 1e-6, "{what}: {name} {got} vs {want}");
        }
    }
}

async fn savings_json(server: &impl Server, group_by: &str) -> Value {
    let resp = client()
        .get(server.url(&format!("/admin/savings?group_by={group_by}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn savings_csv(server: &impl Server, group_by: &str) -> String {
    let resp = client()
        .get(server.url(&format!("/admin/savings?group_by={group_by}")))
        .bearer_auth(ADMIN)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// Each JSON group checked against its hand count; no other group.
fn check_json(savings: &Value, hand: &BTreeMap<String, Hand>) {
    let groups = savings["groups"].as_array().unwrap();
    assert_eq!(groups.len(), hand.len(), "{savings}");
    for g in groups {
        let key = g["key"].as_str().unwrap();
        let want = hand.get(key).unwrap_or_else(|| panic!("group {key}"));
        let f = |name: &str| g[name].as_f64().unwrap();
        want.check(
            key,
            g["requests"].as_u64().unwrap(),
            (
                g["input_tokens"].as_u64().unwrap(),
                g["output_tokens"].as_u64().unwrap(),
            ),
            [f("realtime_usd"), f("served_usd"), f("saved_usd")],
        );
    }
}

/// Each CSV row checked against its hand count; no other row.
fn check_csv(name: &str, csv: &str, hand: &BTreeMap<String, Hand>) {
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!(
            "{name},requests,input_tokens,output_tokens,realtime_usd,served_usd,saved_usd,\
             double_paid,double_paid_usd"
        )
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), hand.len(), "{csv}");
    for row in rows {
        let want = hand.get(row[0]).unwrap_or_else(|| panic!("row {}", row[0]));
        let n = |i: usize| row[i].parse::<u64>().unwrap();
        let usd = |i: usize| row[i].parse::<f64>().unwrap();
        want.check(row[0], n(1), (n(2), n(3)), [usd(4), usd(5), usd(6)]);
        assert_eq!((row[7], row[8]), ("0", "0.000000000"), "{csv}");
    }
}

/// One accepted request: who sent it, its model and handle.
struct Sent {
    client: &'static str,
    key: &'static str,
    model: &'static str,
    id: String,
}

async fn send_all(carpool: &Binary, per_client_and_model: usize) -> Vec<Sent> {
    let calls = CLIENTS.iter().flat_map(|(client_name, key)| {
        PRICES.iter().flat_map(move |(model, ..)| {
            (0..per_client_and_model).map(move |i| async move {
                let body = json!({
                    "model": model,
                    "messages": [{"role": "user", "content": format!("ledger {client_name} {model} {i}")}],
                    "max_tokens": 40,
                });
                let resp = client()
                    .post(carpool.url(CHAT))
                    .bearer_auth(key)
                    .header("carpool-mode", "async")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 202);
                let object: Value = resp.json().await.unwrap();
                Sent {
                    client: client_name,
                    key,
                    model,
                    id: object["id"].as_str().unwrap().to_owned(),
                }
            })
        })
    });
    join_all(calls).await
}

/// `carpool_estimated_savings_usd_total`, summed over its series.
async fn saved_usd_metric(server: &impl Server) -> f64 {
    metrics(server)
        .await
        .lines()
        .filter(|l| l.starts_with("carpool_estimated_savings_usd_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn downloads(sim: &SimHandle) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for call in sim.calls() {
        if format!("{} {}", call.method, call.route) == DOWNLOAD {
            *seen.entry(call.path).or_default() += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savings_agree_with_a_hand_count_through_a_kill_and_a_second_download() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::new("openai", &sim)
        .binary(&dir.path().join("carpool.db"))
        .server(&format!("admin_token = \"{ADMIN}\""))
        .batching("max_wait = \"1h\"")
        .batching("poll_interval = \"100ms\"")
        .extra(&prices_toml());
    for (name, key) in CLIENTS {
        config = config.client(name, key);
    }
    let path = config.write(&dir.path().join("carpool.toml"));
    let env = [("UPSTREAM_KEY", UPSTREAM_KEY)];
    let mut carpool = Binary::start(&path, &env).await;
    let sent = send_all(&carpool, 3).await;

    // A window per client and model. One line of each fails (it lands in
    // the error file, without usage); every results download is held, so
    // each window stops first before its output file, then before its
    // error file.
    let windows = CLIENTS.len() * PRICES.len();
    let failing: Vec<&str> = CLIENTS
        .iter()
        .flat_map(|(client_name, _)| {
            PRICES.iter().map(|(model, ..)| {
                sent.iter()
                    .find(|s| s.model == *model && s.client == *client_name)
                    .unwrap()
                    .id
                    .as_str()
            })
        })
        .collect();
    sim.add_fault(Fault::fail_custom_ids(failing.clone(), 500));
    sim.add_fault(Fault::hold_response(DOWNLOAD, 2 * windows as u32));
    let flushed = client()
        .post(carpool.url("/admin/flush"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(flushed.status().is_success());
    if !eventually(PATIENCE, || sim.held_responses() == windows).await {
        let calls: Vec<String> = sim
            .calls()
            .iter()
            .map(|c| format!("{} {} {}", c.method, c.path, c.status))
            .collect();
        panic!(
            "every output file held: {} {calls:#?}",
            sim.held_responses()
        );
    }
    sim.release_held();

    // Every output file stored, every error file held: kill there.
    let good = sent.len() - failing.len();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut succeeded = 0;
        for s in &sent {
            let object = support::request_object(&carpool, s.key, &s.id).await;
            succeeded += usize::from(object["status"] == "succeeded");
        }
        if succeeded == good && sim.held_responses() == windows {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{succeeded} stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = savings_json(&carpool, "model").await;
    // The process that stored them counted the same savings.
    let metric_before = saved_usd_metric(&carpool).await;
    assert_eq!(
        format!("{metric_before:.6}"),
        format!("{:.6}", before["total"]["saved_usd"].as_f64().unwrap())
    );
    carpool.kill();

    // The restart downloads both output files again, then the error files.
    sim.clear_faults();
    let carpool = Binary::start(&path, &env).await;
    let mut by_model: BTreeMap<String, Hand> = BTreeMap::new();
    let mut by_client: BTreeMap<String, Hand> = BTreeMap::new();
    for s in &sent {
        let object = settled(&carpool, s.key, &s.id).await;
        if failing.contains(&s.id.as_str()) {
            assert_eq!(object["status"], "failed", "{object}");
            continue;
        }
        assert_eq!(object["status"], "succeeded", "{object}");
        assert_eq!(object["served_by"], "batch", "{object}");
        let answer = &object["response"]["body"];
        by_model
            .entry(s.model.to_owned())
            .or_default()
            .add(s.model, answer, "batch");
        by_client
            .entry(s.client.to_owned())
            .or_default()
            .add(s.model, answer, "batch");
    }
    let twice = downloads(&sim);
    assert_eq!(
        twice.len(),
        2 * windows,
        "output and error files: {twice:?}"
    );
    assert!(
        twice.values().all(|n| *n == 2),
        "every file downloaded before the kill and again after it: {twice:?}"
    );

    let after = savings_json(&carpool, "model").await;
    assert_eq!(
        after["groups"], before["groups"],
        "the restart moved the ledger"
    );
    assert_eq!(after["total"], before["total"]);
    check_json(&after, &by_model);
    check_json(&savings_json(&carpool, "client").await, &by_client);
    check_csv("model", &savings_csv(&carpool, "model").await, &by_model);
    check_csv("client", &savings_csv(&carpool, "client").await, &by_client);
    let total = &after["total"];
    assert_eq!(total["requests"], good as u64);
    assert_eq!(total["double_paid"], 0);

    // The restarted process downloaded the output files again and counted
    // none of those answers as new savings.
    assert_eq!(saved_usd_metric(&carpool).await, 0.0);
    let saved: f64 = by_model.values().map(|h| h.realtime - h.served).sum();
    assert_eq!(format!("{metric_before:.2}"), format!("{saved:.2}"));
    drop(carpool);
}

/// A request answered realtime at its deadline while its line sat in a
/// stuck batch; the batch then finishes and its line is paid as well. The
/// ledger keeps the realtime answer and adds the batch line's price as a
/// double payment, once, however often the file is read.
#[tokio::test]
async fn a_request_paid_twice_shows_both_charges() {
    let sim = sim::spawn(SimOptions::default()).await.unwrap();
    sim.add_fault(Fault::next_job(JobOutcome::Stuck));
    let config = SimConfig::new("openai", &sim)
        .server(&format!("admin_token = \"{ADMIN}\""))
        .client("alice", "sk-alice")
        .batching("max_wait = \"100ms\"\nfallback_margin = \"1s\"")
        .extra(&prices_toml());
    let app = TestApp::start(&config.toml(), &[("UPSTREAM_KEY", UPSTREAM_KEY)]).await;
    let body =
        json!({"model": "m-small", "messages": [{"role": "user", "content": "pay me twice"}]});
    let resp = client()
        .post(app.url(CHAT))
        .bearer_auth("sk-alice")
        .header("carpool-mode", "async")
        .header("carpool-deadline", "3")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let object = settled(&app, "sk-alice", &id).await;
    assert_eq!(object["status"], "succeeded", "{object}");
    assert_eq!(object["served_by"], "realtime", "{object}");
    let answer = object["response"]["body"].clone();
    let mut realtime = Hand::default();
    realtime.add("m-small", &answer, "realtime");
    let mut batch = Hand::default();
    batch.add("m-small", &sim::expected_response(CHAT, &body), "batch");

    let first = savings_json(&app, "model").await;
    assert_eq!(first["total"]["double_paid"], 0, "{first}");
    realtime.check(
        "before the batch",
        first["total"]["requests"].as_u64().unwrap(),
        (
            first["total"]["input_tokens"].as_u64().unwrap(),
            first["total"]["output_tokens"].as_u64().unwrap(),
        ),
        [
            first["total"]["realtime_usd"].as_f64().unwrap(),
            first["total"]["served_usd"].as_f64().unwrap(),
            first["total"]["saved_usd"].as_f64().unwrap(),
        ],
    );

    // The stuck job finishes: its line comes back and is paid, too.
    sim.clear_faults();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let savings = loop {
        let savings = savings_json(&app, "model").await;
        if savings["total"]["double_paid"] == 1 {
            break savings;
        }
        let calls: Vec<String> = sim
            .calls()
            .iter()
            .map(|c| format!("{} {} {}", c.method, c.path, c.status))
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{savings}\n{calls:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let total = &savings["total"];
    let f = |name: &str| total[name].as_f64().unwrap();
    assert_eq!(total["requests"], 1, "{savings}");
    assert_eq!(
        format!("{:.6}", f("double_paid_usd")),
        format!("{:.6}", batch.served)
    );
    assert_eq!(
        format!("{:.6}", f("served_usd")),
        format!("{:.6}", realtime.served + batch.served)
    );
    assert_eq!(
        format!("{:.6}", f("saved_usd")),
        format!("{:.6}", -batch.served)
    );
    let text = metrics(&app).await;
    assert_eq!(metric(&text, "carpool_double_paid_total{"), 1.0);
    // The request keeps its realtime answer.
    let object = settled(&app, "sk-alice", &id).await;
    assert_eq!(object["served_by"], "realtime");
    app.stop().await.unwrap();
}
