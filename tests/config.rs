//! Config files: the examples in config/ stay valid, and `check-config`
//! names every problem.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use carpool::config;

/// Every `*_env` value in a config, so an example can be loaded with
/// placeholder secrets.
fn env_names(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if k.ends_with("_env") {
                    if let Some(s) = v.as_str() {
                        out.push(s.to_owned());
                    }
                }
                env_names(v, out);
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|v| env_names(v, out)),
        _ => {}
    }
}

#[test]
fn every_example_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut names = Vec::new();
        env_names(
            &text.parse::<toml::Table>().map(toml::Value::Table).unwrap(),
            &mut names,
        );
        let vars: BTreeMap<String, String> = names
            .into_iter()
            .map(|n| {
                let v = if n.contains("WEBHOOK") {
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()
                } else {
                    format!("placeholder-{n}")
                };
                (n, v)
            })
            .collect();
        if let Err(e) = config::load_with_env(&path, &vars) {
            panic!("{} is invalid:\n{e}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 2, "expected example configs in {}", dir.display());
}

fn check_config(text: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("carpool.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carpool"));
    cmd.arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_every_problem_and_exits_non_zero() {
    let text = r#"
[[upstreams]]
name = "mistral"
dialect = "mistral"
base_url = "https://api.mistral.ai"
api_key_env = "MISTRAL_API_KEY"

[[upstreams]]
name = "other"
dialect = "foo"
base_url = "http://127.0.0.1:9"

[batching]
max_wait = "5 parsecs"
"#;
    let (ok, _, stderr) = check_config(text, &[]);
    assert!(!ok, "check-config accepted a bad config");
    for expected in [
        "batching.max_wait: invalid duration \"5 parsecs\"",
        "upstreams[1].dialect: unknown dialect \"foo\", expected mistral|openai|anthropic",
        "upstreams[0].api_key_env: environment variable MISTRAL_API_KEY is not set",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let text = r#"
[server]
admin_token = "admin-secret-value"
[[upstreams]]
name = "mistral"
dialect = "mistral"
base_url = "https://api.mistral.ai"
api_key_env = "MISTRAL_API_KEY"
"#;
    let (ok, stdout, stderr) = check_config(
        text,
        &[
            ("MISTRAL_API_KEY", "sk-live-upstream"),
            ("CARPOOL_SERVER__LISTEN", "0.0.0.0:9999"),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("listen = \"0.0.0.0:9999\""), "{stdout}");
    assert!(stdout.contains("****"));
    assert!(!stdout.contains("sk-live-upstream") && !stdout.contains("admin-secret-value"));
}

#[test]
fn check_config_never_echoes_a_secret_from_the_environment_or_the_store_url() {
    let text = r#"
[store]
url = "postgres://carpool@db.internal/carpool?password=hunter2-store&sslmode=disable"
[[upstreams]]
name = "mistral"
dialect = "mistral"
base_url = "https://api.mistral.ai"
api_key_env = "MISTRAL_API_KEY"
"#;
    let cases: [(&str, &str, &str); 3] = [
        // A numeric admin token used to become an integer and be echoed
        // in the type error; a webhook secret list given as one string
        // was echoed in "expected a sequence".
        ("CARPOOL_SERVER__ADMIN_TOKEN", "73519846201", "73519846201"),
        (
            "CARPOOL_WEBHOOKS__SECRETS",
            "whsec_VE9QU0VDUkVUVE9QU0VDUkVU",
            "VE9QU0VDUkVUVE9QU0VDUkVU",
        ),
        ("CARPOOL_WEBHOOKS__SECRET", "[1, 2]", "[1, 2]"),
    ];
    for (name, value, needle) in cases {
        let (_, stdout, stderr) = check_config(
            text,
            &[("MISTRAL_API_KEY", "sk-live-upstream"), (name, value)],
        );
        for out in [&stdout, &stderr] {
            assert!(!out.contains(needle), "{name}: secret echoed:\n{out}");
            assert!(
                !out.contains("hunter2-store"),
                "store password echoed:\n{out}"
            );
        }
    }
    // Without the env secrets the config is valid and the URL is shown masked.
    let (ok, stdout, stderr) = check_config(text, &[("MISTRAL_API_KEY", "sk-live-upstream")]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("db.internal") && !stdout.contains("hunter2-store"),
        "{stdout}"
    );
}

/// Issue 23's terms, checked: flex and completion windows only where the
/// dialect sells them, one way of naming flex models, discounts that are
/// fractions and prices of upstreams that exist, each named in one run; a
/// 48h window and a batch without discount are accepted and shown.
#[test]
fn check_config_reports_contradicting_batch_terms_and_accepts_honest_ones() {
    let bad = r#"
[[upstreams]]
name = "mistral"
dialect = "mistral"
base_url = "https://api.mistral.ai"
api_key_env = "UPSTREAM_KEY"
flex = true
completion_window = "48h"

[[upstreams]]
name = "openai"
dialect = "openai"
base_url = "https://api.openai.com"
api_key_env = "UPSTREAM_KEY"
flex = true
flex_models = ["gpt-5*"]
completion_window = "30m"

[prices]
flex_discount = 1.5
[[prices.models]]
model = "gpt-5*"
upstream = "azure"
input = 1.0
output = 2.0
batch_discount = -0.1
"#;
    let (ok, _, stderr) = check_config(bad, &[("UPSTREAM_KEY", "sk-u")]);
    assert!(!ok, "check-config accepted contradicting terms");
    for expected in [
        "upstreams[0].flex: flex is a service tier of the openai dialect",
        "upstreams[0].completion_window: only an openai-dialect upstream's batches take a completion_window",
        "upstreams[1].flex_models: contradicts flex = true",
        "upstreams[1].completion_window: invalid window \"30m\", expected a duration from 1h to 7d",
        "prices.flex_discount: invalid discount 1.5, expected a fraction from 0 to 1",
        "prices.models[0].upstream: names no [[upstreams]] entry: \"azure\"",
        "prices.models[0].batch_discount: invalid discount -0.1",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let honest = r#"
[[upstreams]]
name = "compatible"
dialect = "openai"
base_url = "https://llm.example.net"
api_key_env = "UPSTREAM_KEY"
completion_window = "48h"
flex_models = ["gpt-5*"]

[[prices.models]]
model = "gpt-5*"
upstream = "compatible"
input = 1.0
output = 2.0
batch_discount = 0.0
"#;
    let (ok, stdout, stderr) = check_config(honest, &[("UPSTREAM_KEY", "sk-u")]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("completion_window = \"48h\""), "{stdout}");
    assert!(stdout.contains("batch_discount = 0.0"), "{stdout}");
}
