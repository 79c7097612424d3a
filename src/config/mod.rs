//! Configuration: the TOML file plus `CARPOOL_…` environment overrides,
//! parsed into raw structs ([`raw`]) and validated into typed settings
//! ([`Config`]). Owns defaults, units, secrets and every config error; does
//! not own what the settings mean at run time.
//!
//! Loading, in order: read the file → apply env overrides (see [`env`]) →
//! parse each section on its own (so one bad section does not hide problems
//! in the others) → validate. All problems are returned together, each with
//! the key path that causes it.

mod env;
pub mod raw;
mod secret;
mod types;
mod validate;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

pub use env::PREFIX as ENV_PREFIX;
pub use secret::Secret;
pub use types::*;
pub use validate::DEFAULT_SCHEDULE;

/// One problem in the config, at a key path such as `upstreams[1].dialect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid TOML: {message}")]
    Syntax { message: String },
    #[error("{} problem(s) in the config:\n{}", .0.len(), ProblemList(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem as `key: message`, one per entry.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Invalid(p) => p.iter().map(Problem::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// The process environment, captured once.
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

/// Loads `path` with overrides and secrets from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, &process_env())
}

/// Loads `path` with overrides and secrets taken from `vars` only.
pub fn load_with_env(path: &Path, vars: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_toml_str(&text, vars)
}

/// Parses and validates config text; `vars` supplies overrides and secrets.
pub fn from_toml_str(text: &str, vars: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    let mut table: Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        message: e.to_string(),
    })?;
    let mut problems = Vec::new();
    env::apply_overrides(&mut table, vars, &mut problems);
    let mut broken = HashSet::new();
    let raw = parse_sections(table, &mut problems, &mut broken);
    let lookup = |name: &str| vars.get(name).cloned();
    let config = validate::validate(&raw, &broken, &lookup, &mut problems);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

fn parse_sections(
    table: Table,
    problems: &mut Vec<Problem>,
    broken: &mut HashSet<String>,
) -> raw::RawConfig {
    let mut raw = raw::RawConfig::default();
    for (key, value) in table {
        match key.as_str() {
            "server" => raw.server = section(value, &key, problems),
            "store" => raw.store = section(value, &key, problems),
            "batching" => raw.batching = section(value, &key, problems),
            "webhooks" => raw.webhooks = section(value, &key, problems),
            "prices" => raw.prices = section(value, &key, problems),
            "upstreams" => raw.upstreams = array(value, &key, problems, broken),
            "clients" => raw.clients = array(value, &key, problems, broken),
            "rules" => raw.rules = array(value, &key, problems, broken),
            other => problems.push(Problem::new(
                other,
                "unknown key, expected one of server, store, upstreams, clients, batching, rules, webhooks, prices",
            )),
        }
    }
    raw
}

fn section<T: DeserializeOwned + Default>(
    value: Value,
    key: &str,
    problems: &mut Vec<Problem>,
) -> T {
    T::deserialize(value).unwrap_or_else(|e| {
        problems.push(Problem::new(key, without_value(e.message().trim())));
        T::default()
    })
}

/// serde's "invalid type" and "invalid value" messages quote the value they
/// refused, which may be a secret (a webhook secret or admin token set from
/// the environment): the value is dropped, its kind kept.
fn without_value(message: &str) -> String {
    for lead in ["invalid type: ", "invalid value: "] {
        let Some(start) = message.find(lead).map(|i| i + lead.len()) else {
            continue;
        };
        let rest = &message[start..];
        let end = rest.find(", expected").unwrap_or(rest.len());
        let kind = rest[..end].split_whitespace().next().unwrap_or("value");
        return format!("{}{kind}{}", &message[..start], &rest[end..]);
    }
    message.to_owned()
}

fn array<T: DeserializeOwned + Default>(
    value: Value,
    key: &str,
    problems: &mut Vec<Problem>,
    broken: &mut HashSet<String>,
) -> Vec<T> {
    let Value::Array(items) = value else {
        problems.push(Problem::new(
            key,
            format!("expected an array of tables ([[{key}]])"),
        ));
        return Vec::new();
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let path = format!("{key}[{i}]");
            let before = problems.len();
            let parsed = section(item, &path, problems);
            if problems.len() > before {
                broken.insert(path);
            }
            parsed
        })
        .collect()
}

/// The effective config as TOML, secrets masked.
pub fn render_effective(config: &Config) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

/// `carpool check-config`: prints the effective config (secrets masked) and
/// returns success, or prints every problem and returns failure.
pub fn check_cli(path: &Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            println!(
                "# effective config from {} (secrets masked)",
                path.display()
            );
            for w in &config.warnings {
                println!("# warning: {w}");
            }
            print!("{}", render_effective(&config));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("carpool: {} is not valid:", path.display());
            for p in err.problems() {
                eprintln!("  {p}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests;
