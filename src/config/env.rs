//! `CARPOOL_…` environment overrides, applied to the TOML tree before it is
//! parsed, so an override is validated exactly like a key in the file.
//!
//! Naming: strip `CARPOOL_`, split on `__` (double underscore) for nesting,
//! lower-case each part. `CARPOOL_SERVER__MAX_BODY=20MB` sets
//! `server.max_body`; `CARPOOL_UPSTREAMS__0__BASE_URL=…` sets
//! `upstreams[0].base_url` (an index equal to the array length appends a new
//! table). A value is taken as a string when the key it replaces is a string,
//! else read as a TOML value (`1000`, `true`, `["a","b"]`), else as a string;
//! a comma-separated list is accepted for arrays of strings.
//!
//! Every key lives in a section, so an override always contains `__`;
//! `CARPOOL_…` names without it (e.g. `CARPOOL_ADMIN_TOKEN`) are not
//! overrides and are free for secrets referenced by `*_env` keys.

use toml::{Table, Value};

use super::Problem;

pub const PREFIX: &str = "CARPOOL_";

/// Applies every `CARPOOL_…` variable in `vars` to `table`, in name order so
/// that appending `…__0__…` then `…__1__…` works.
pub fn apply_overrides<'a>(
    table: &mut Table,
    vars: impl IntoIterator<Item = (&'a String, &'a String)>,
    problems: &mut Vec<Problem>,
) {
    let mut vars: Vec<_> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            problems.push(Problem::new(
                format!("env {name}"),
                "empty key segment (use `__` between keys)",
            ));
            continue;
        }
        if let Err(message) = set_path(table, &path, raw) {
            problems.push(Problem::new(format!("env {name}"), message));
        }
    }
}

fn set_path(table: &mut Table, path: &[String], raw: &str) -> Result<(), String> {
    let mut root = Value::Table(std::mem::take(table));
    let result = set_in(&mut root, path, raw);
    if let Value::Table(t) = root {
        *table = t;
    }
    result
}

fn set_in(node: &mut Value, path: &[String], raw: &str) -> Result<(), String> {
    let Some((seg, rest)) = path.split_first() else {
        *node = convert(node, raw);
        return Ok(());
    };
    if rest.is_empty() && is_secret_key(seg) {
        let node = child(node, seg, false)?;
        *node = if seg == "secrets" {
            list_of_strings(raw)
        } else {
            Value::String(raw.to_owned())
        };
        return Ok(());
    }
    let next_is_index = rest.first().is_some_and(|s| s.parse::<usize>().is_ok());
    set_in(child(node, seg, next_is_index)?, rest, raw)
}

/// The child `seg` of `node`, created when missing: an array when the next
/// segment is an index, else an empty table (which `convert` treats as new).
fn child<'v>(node: &'v mut Value, seg: &str, next_is_index: bool) -> Result<&'v mut Value, String> {
    let fresh = || {
        if next_is_index {
            Value::Array(Vec::new())
        } else {
            Value::Table(Table::new())
        }
    };
    match node {
        Value::Table(t) => Ok(t.entry(seg.to_owned()).or_insert_with(fresh)),
        Value::Array(items) => {
            let idx: usize = seg
                .parse()
                .map_err(|_| format!("`{seg}` is not an index into an array"))?;
            if idx == items.len() {
                items.push(fresh());
            }
            let len = items.len();
            items
                .get_mut(idx)
                .ok_or_else(|| format!("index {idx} out of range (array has {len} entries)"))
        }
        _ => Err(format!("cannot descend into `{seg}`: not a table")),
    }
}

/// Keys whose values are secrets: an override of one is always a string,
/// never read as a number or list, so an error about it has no value to echo.
fn is_secret_key(key: &str) -> bool {
    matches!(
        key,
        "admin_token" | "secret" | "secrets" | "api_key" | "password"
    )
}

fn convert(existing: &Value, raw: &str) -> Value {
    let is_new = matches!(existing, Value::Table(t) if t.is_empty());
    match existing {
        Value::String(_) => Value::String(raw.to_owned()),
        Value::Array(_) => match parse_value(raw) {
            Some(v @ Value::Array(_)) => v,
            _ => list_of_strings(raw),
        },
        _ if is_new || !matches!(existing, Value::Table(_)) => {
            parse_value(raw).unwrap_or_else(|| Value::String(raw.to_owned()))
        }
        _ => Value::String(raw.to_owned()),
    }
}

/// A comma-separated list as an array of strings.
fn list_of_strings(raw: &str) -> Value {
    Value::Array(
        raw.split(',')
            .map(|s| Value::String(s.trim().to_owned()))
            .filter(|v| v.as_str() != Some(""))
            .collect(),
    )
}

fn parse_value(raw: &str) -> Option<Value> {
    let doc: Table = toml::from_str(&format!("v = {raw}")).ok()?;
    doc.get("v").cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn apply(toml_text: &str, vars: &[(&str, &str)]) -> (Table, Vec<Problem>) {
        let mut table: Table = toml::from_str(toml_text).unwrap();
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut problems = Vec::new();
        apply_overrides(&mut table, &vars, &mut problems);
        (table, problems)
    }

    #[test]
    fn double_underscore_nests_and_indexes_arrays() {
        let (t, p) = apply(
            "[server]\nlisten = \"a\"\n[[upstreams]]\nname = \"x\"\n",
            &[
                ("CARPOOL_SERVER__LISTEN", "0.0.0.0:1"),
                ("CARPOOL_UPSTREAMS__0__BASE_URL", "http://h"),
                ("CARPOOL_UPSTREAMS__1__NAME", "second"),
                ("CARPOOL_BATCHING__MAX_REQUESTS", "12"),
                ("OTHER", "ignored"),
                ("CARPOOL_ADMIN_TOKEN", "a secret, not an override"),
            ],
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(t["server"]["listen"].as_str(), Some("0.0.0.0:1"));
        assert_eq!(t["upstreams"][0]["base_url"].as_str(), Some("http://h"));
        assert_eq!(t["upstreams"][1]["name"].as_str(), Some("second"));
        assert_eq!(t["batching"]["max_requests"].as_integer(), Some(12));
    }

    #[test]
    fn string_keys_stay_strings_and_lists_split_on_commas() {
        let (t, _) = apply(
            "[server]\nadmin_token = \"x\"\n[[upstreams]]\nmodels = [\"*\"]\n",
            &[
                ("CARPOOL_SERVER__ADMIN_TOKEN", "12345"),
                ("CARPOOL_UPSTREAMS__0__MODELS", "a-*, b"),
            ],
        );
        assert_eq!(t["server"]["admin_token"].as_str(), Some("12345"));
        let models: Vec<_> = t["upstreams"][0]["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(models, vec!["a-*", "b"]);
    }

    #[test]
    fn reports_out_of_range_index_with_variable_name() {
        let (_, p) = apply("", &[("CARPOOL_UPSTREAMS__3__NAME", "x")]);
        assert_eq!(p.len(), 1);
        assert!(p[0].key.contains("CARPOOL_UPSTREAMS__3__NAME"), "{p:?}");
    }
}
