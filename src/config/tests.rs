use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::model::Dialect;

const MINIMAL: &str = r#"
[[upstreams]]
name = "mistral"
dialect = "mistral"
base_url = "https://api.mistral.ai"
api_key_env = "MISTRAL_API_KEY"
"#;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn problems(text: &str, vars: &[(&str, &str)]) -> Vec<String> {
    match from_toml_str(text, &env(vars)) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems(),
    }
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = from_toml_str(MINIMAL, &env(&[("MISTRAL_API_KEY", "k")])).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.max_body, 10_000_000);
    assert_eq!(c.server.defer_prefix, "/defer");
    assert_eq!(c.store.backend, StoreBackend::Sqlite);
    assert_eq!(c.batching.defaults.max_wait, Duration::from_secs(300));
    assert_eq!(c.batching.results_ttl, Duration::from_secs(7 * 86400));
    assert_eq!(c.webhooks.max_attempts, 8);
    assert_eq!(c.upstreams[0].auth, AuthMode::Managed);
    assert_eq!(
        c.upstreams[0].api_key.as_ref().map(Secret::expose),
        Some("k")
    );
    assert!(c.warnings.iter().any(|w| w.contains("no [[clients]]")));
}

#[test]
fn reports_every_problem_with_its_key_path() {
    let text = r#"
[server]
listen = "nowhere"
[[upstreams]]
name = "a"
dialect = "mistral"
base_url = "https://api.mistral.ai"
api_key_env = "MISTRAL_API_KEY"
[[upstreams]]
name = "b"
dialect = "foo"
base_url = "http://h"
[batching]
max_wait = "5 parsecs"
on_batch_failure = "panic"
[[rules]]
client = "ghost"
mode = "later"
"#;
    let p = problems(text, &[]);
    let expect = [
        "server.listen: invalid address \"nowhere\"",
        "upstreams[1].dialect: unknown dialect \"foo\", expected mistral|openai|anthropic",
        "upstreams[0].api_key_env: environment variable MISTRAL_API_KEY is not set",
        "batching.max_wait: invalid duration \"5 parsecs\"",
        "batching.on_batch_failure: unknown policy \"panic\", expected resubmit|realtime|error",
        "rules[0].mode: unknown mode \"later\"",
        "rules[0].client: no [[clients]] entry is named \"ghost\"",
    ];
    for e in expect {
        assert!(
            p.iter().any(|x| x.starts_with(e)),
            "missing {e:?} in {p:#?}"
        );
    }
}

#[test]
fn unknown_keys_are_reported_per_section() {
    let text = format!("{MINIMAL}\n[server]\nlisten_on = \"x\"\n[batching]\nmax_wiat = \"5m\"\n");
    let p = problems(&text, &[("MISTRAL_API_KEY", "k")]);
    assert!(
        p.iter()
            .any(|x| x.starts_with("server:") && x.contains("listen_on")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x.starts_with("batching:") && x.contains("max_wiat")),
        "{p:?}"
    );
}

#[test]
fn env_overrides_win_over_the_file() {
    let c = from_toml_str(
        MINIMAL,
        &env(&[
            ("MISTRAL_API_KEY", "k"),
            ("CARPOOL_SERVER__LISTEN", "0.0.0.0:9000"),
            ("CARPOOL_SERVER__MAX_BODY", "1MB"),
            ("CARPOOL_UPSTREAMS__0__BASE_URL", "http://127.0.0.1:1"),
            ("CARPOOL_BATCHING__MAX_REQUESTS", "7"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:9000");
    assert_eq!(c.server.max_body, 1_000_000);
    assert_eq!(c.upstreams[0].base_url.as_str(), "http://127.0.0.1:1/");
    assert_eq!(c.batching.defaults.max_requests, 7);
}

#[test]
fn base_url_with_v1_is_refused() {
    let text = MINIMAL.replace("https://api.mistral.ai", "https://api.mistral.ai/v1");
    let p = problems(&text, &[("MISTRAL_API_KEY", "k")]);
    assert!(
        p.iter().any(|x| x.starts_with("upstreams[0].base_url")),
        "{p:?}"
    );
}

#[test]
fn batching_limits_are_capped_at_the_dialect_limits() {
    let text = format!(
        "{MINIMAL}\n[batching]\nmax_requests = 1000000\nmax_bytes = \"1GB\"\n[[batching.models]]\nmodel = \"small-*\"\nmax_requests = 10\n"
    );
    let c = from_toml_str(&text, &env(&[("MISTRAL_API_KEY", "k")])).unwrap();
    let p = c.batching.policy_for("large", Dialect::Openai);
    assert_eq!((p.max_requests, p.max_bytes), Dialect::Openai.limits());
    assert_eq!(
        c.batching
            .policy_for("small-1", Dialect::Mistral)
            .max_requests,
        10
    );
    assert!(c.warnings.iter().any(|w| w.contains("capped")));
}

#[test]
fn routes_by_first_matching_model_glob_else_first_upstream() {
    let text = r#"
[[upstreams]]
name = "first"
dialect = "openai"
base_url = "http://a"
models = ["gpt-*"]
[[upstreams]]
name = "second"
dialect = "mistral"
base_url = "http://b"
models = ["mistral-*", "gpt-4o"]
"#;
    let c = from_toml_str(text, &env(&[])).unwrap();
    assert_eq!(c.route(Some("gpt-4o")).name, "first");
    assert_eq!(c.route(Some("mistral-small")).name, "second");
    assert_eq!(c.route(Some("llama")).name, "first");
    assert_eq!(c.route(None).name, "first");
}

#[test]
fn rendered_config_masks_secrets() {
    let text = format!(
        "{MINIMAL}\n[server]\nadmin_token = \"hunter2-admin\"\n[store]\nurl = \"postgres://u:pw-db@h/db\"\n[webhooks]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
    );
    let c = from_toml_str(&text, &env(&[("MISTRAL_API_KEY", "sk-upstream")])).unwrap();
    let out = render_effective(&c);
    for secret in ["hunter2-admin", "pw-db", "sk-upstream", "MfKQ9r8"] {
        assert!(!out.contains(secret), "{secret} leaked:\n{out}");
    }
    assert!(out.contains("[[upstreams]]"), "{out}");
    assert!(!format!("{c:?}").contains("sk-upstream"));
}

#[test]
fn webhook_secret_must_be_whsec_base64_and_is_not_echoed() {
    let text = format!("{MINIMAL}\n[webhooks]\nsecrets = [\"plain-text-secret\"]\n");
    let p = problems(&text, &[("MISTRAL_API_KEY", "k")]);
    assert!(
        p.iter().any(|x| x.starts_with("webhooks.secrets[0]")),
        "{p:?}"
    );
    assert!(!p.iter().any(|x| x.contains("plain-text-secret")));
}

#[test]
fn intake_ceilings_are_off_by_default_and_validated_with_their_key_path() {
    let vars = [("MISTRAL_API_KEY", "k")];
    let c = from_toml_str(MINIMAL, &env(&vars)).unwrap();
    assert_eq!(c.batching.max_pending, None);
    assert_eq!(c.batching.max_pending_per_client, Some(100_000));
    assert_eq!(c.batching.max_open_windows_per_client, 64);
    let text =
        format!("{MINIMAL}\n[batching]\nmax_pending = 100\nmax_pending_per_client = \"10\"\n");
    let c = from_toml_str(&text, &env(&vars)).unwrap();
    assert_eq!(c.batching.max_pending, Some(100));
    assert_eq!(c.batching.max_pending_per_client, Some(10));
    let text = format!("{MINIMAL}\n[batching]\nmax_pending = 0\n");
    let found = problems(&text, &vars);
    assert!(
        found.iter().any(|p| p.starts_with("batching.max_pending:")),
        "{found:?}"
    );
}

#[test]
fn only_the_error_policy_forbids_realtime_calls() {
    assert!(FailurePolicy::Resubmit.allows_realtime());
    assert!(FailurePolicy::Realtime.allows_realtime());
    assert!(!FailurePolicy::Error.allows_realtime());
}

#[test]
fn upstream_urls_are_the_base_path_then_the_callers_path_and_query() {
    let cases = [
        ("https://api.mistral.ai", "/v1/chat/completions"),
        ("https://api.mistral.ai/", "/v1/models?limit=2&after=x"),
        ("https://gateway.example/openai", "/v1/files/file-1/content"),
        ("https://gateway.example/openai/", "/v1/batches?after=b%201"),
        ("http://127.0.0.1:9090", "/v1/a/../b/./c"),
        ("http://127.0.0.1:9090", "//not-a-host/v1/x"),
        ("http://127.0.0.1:9090/p", "/v1/x?"),
        ("http://127.0.0.1:9090", "/v1/sp ace/%7E?q=a b"),
    ];
    for (base, path) in cases {
        let text = format!(
            "[[upstreams]]\nname = \"u\"\ndialect = \"openai\"\nbase_url = \"{base}\"\nauth = \"passthrough\"\n"
        );
        let c = from_toml_str(&text, &env(&[])).unwrap();
        let built = c.upstreams[0].url_for(path);
        // What parsing the whole concatenated string gives, host included.
        let parsed = url::Url::parse(&format!("{}{path}", base.trim_end_matches('/'))).unwrap();
        assert_eq!(built, parsed, "{base} + {path}");
        assert_eq!(built.host(), parsed.host());
    }
}

#[test]
fn max_enqueued_tokens_is_unset_by_default_overridden_per_model_and_validated() {
    let vars = [("MISTRAL_API_KEY", "k")];
    let c = from_toml_str(MINIMAL, &env(&vars)).unwrap();
    assert_eq!(
        c.batching
            .policy_for("any", Dialect::Mistral)
            .max_enqueued_tokens,
        None
    );
    let text = format!(
        "{MINIMAL}\n[batching]\nmax_enqueued_tokens = 1000\n[[batching.models]]\nmodel = \"big-*\"\nmax_enqueued_tokens = 50\n[[batching.models]]\nmodel = \"other\"\nmax_wait = \"1m\"\n"
    );
    let c = from_toml_str(&text, &env(&vars)).unwrap();
    let cap = |model: &str| {
        c.batching
            .policy_for(model, Dialect::Mistral)
            .max_enqueued_tokens
    };
    assert_eq!(cap("big-1"), Some(50));
    assert_eq!(cap("other"), Some(1000));
    let text = format!("{MINIMAL}\n[[batching.models]]\nmodel = \"m\"\nmax_enqueued_tokens = 0\n");
    let found = problems(&text, &vars);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("batching.models[0].max_enqueued_tokens:")),
        "{found:?}"
    );
}
