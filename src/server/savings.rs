//! `GET /admin/savings`: the savings ledger, summed by model, client,
//! upstream or day over a time range, as JSON or (`Accept: text/csv`) CSV.
//! Every figure comes from the ledger rows the store wrote with each
//! deferred request's result (its own usage, priced at realtime and at the
//! tier that served it), so a request counts once, whatever replicas,
//! re-downloads and restarts did.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::admin::authorize;
use super::auth::ANONYMOUS;
use super::error::ApiQuery;
use super::ApiError;
use crate::app::AppState;
use crate::pricing::NANO_PER_USD;
use crate::store::{LedgerGroup, LedgerSum};

const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Deserialize)]
pub struct SavingsQuery {
    group_by: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// One group as shown: the store's sums under the caller-facing key.
/// `served_nusd` is everything paid, second payments included, so a
/// request paid twice shows as a loss in `saved_usd`.
#[derive(Default)]
struct Row {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    realtime_nusd: i64,
    served_nusd: i64,
    double_paid: u64,
    double_paid_nusd: i64,
}

impl Row {
    fn add(&mut self, sum: &LedgerSum) {
        self.requests += sum.requests;
        self.input_tokens += sum.input_tokens;
        self.output_tokens += sum.output_tokens;
        self.realtime_nusd += sum.realtime_nusd;
        self.served_nusd += sum.served_nusd + sum.double_paid_nusd;
        self.double_paid += sum.double_paid;
        self.double_paid_nusd += sum.double_paid_nusd;
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "realtime_usd": usd(self.realtime_nusd),
            "served_usd": usd(self.served_nusd),
            "saved_usd": usd(self.realtime_nusd - self.served_nusd),
            "double_paid": self.double_paid,
            "double_paid_usd": usd(self.double_paid_nusd),
        })
    }
}

fn usd(nusd: i64) -> f64 {
    nusd as f64 / NANO_PER_USD
}

/// `GET /admin/savings?group_by=model|client|upstream|day&from=&to=`.
pub async fn savings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<SavingsQuery>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let (name, by) = match query.group_by.as_deref().unwrap_or("model") {
        "model" => ("model", LedgerGroup::Model),
        "client" => ("client", LedgerGroup::Credential),
        "upstream" => ("upstream", LedgerGroup::Upstream),
        "day" => ("day", LedgerGroup::Day),
        other => {
            return Err(bad_param(
                "group_by",
                format!("unknown group_by {other:?}: expected model, client, upstream or day"),
            ))
        }
    };
    let from = query
        .from
        .as_deref()
        .map(|v| instant_ms("from", v, false))
        .transpose()?;
    let to = query
        .to
        .as_deref()
        .map(|v| instant_ms("to", v, true))
        .transpose()?;
    let sums = state
        .deferral
        .store
        .ledger(by, from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX))
        .await?;
    // Credentials are named here, at the edge: two hashes never share a
    // name, but a group is summed by name all the same.
    let mut groups: BTreeMap<String, Row> = BTreeMap::new();
    let mut total = Row::default();
    for sum in &sums {
        let key = match by {
            LedgerGroup::Credential => client_name(&state, &sum.group),
            LedgerGroup::Day => day_name(&sum.group),
            _ => sum.group.clone(),
        };
        groups.entry(key).or_default().add(sum);
        total.add(sum);
    }
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"));
    if wants_csv {
        return Ok(csv(name, &groups).into_response());
    }
    let data: Vec<Value> = groups
        .iter()
        .map(|(key, row)| {
            let mut v = row.json();
            v["key"] = json!(key);
            v
        })
        .collect();
    Ok(Json(json!({
        "object": "carpool.savings",
        "group_by": name,
        "from": from.map(|ms| ms.div_euclid(1000)),
        "to": to.map(|ms| ms.div_euclid(1000)),
        "currency": "USD",
        "groups": data,
        "total": total.json(),
    }))
    .into_response())
}

fn bad_param(param: &str, message: String) -> ApiError {
    ApiError::BadRequest {
        message,
        param: Some(param.to_owned()),
        code: "invalid_parameter",
    }
}

/// `from` / `to` as Unix ms: Unix seconds, an RFC 3339 time, or a UTC date
/// (`from`: its start; `to`: its end, so `to=2026-12-07` includes that day).
fn instant_ms(param: &str, value: &str, end_of_day: bool) -> Result<i64, ApiError> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| bad_param(param, format!("{param} is out of range")));
    }
    let invalid = || {
        bad_param(
            param,
            format!("invalid {param} {value:?}: expected Unix seconds, an RFC 3339 time or a date (YYYY-MM-DD)"),
        )
    };
    if value.len() == 10 {
        let midnight =
            humantime::parse_rfc3339_weak(&format!("{value}T00:00:00")).map_err(|_| invalid())?;
        let ms = unix_ms(midnight).ok_or_else(invalid)?;
        return Ok(if end_of_day { ms + DAY_MS } else { ms });
    }
    let at = humantime::parse_rfc3339_weak(value).map_err(|_| invalid())?;
    unix_ms(at).ok_or_else(invalid)
}

fn unix_ms(at: std::time::SystemTime) -> Option<i64> {
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// A `[[clients]]` name for a credential hash, else a short fingerprint of
/// the hash (never the key itself).
fn client_name(state: &AppState, credential_hash: &str) -> String {
    if credential_hash == ANONYMOUS {
        return ANONYMOUS.to_owned();
    }
    state
        .config
        .clients
        .iter()
        .find(|c| c.key_sha256 == credential_hash)
        .map(|c| c.name.clone())
        .unwrap_or_else(|| {
            let short = credential_hash.get(..12).unwrap_or(credential_hash);
            format!("key:{short}")
        })
}

/// A day number (days since 1970-01-01) as `YYYY-MM-DD`.
fn day_name(days: &str) -> String {
    let Ok(days) = days.parse::<i64>() else {
        return days.to_owned();
    };
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day number (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The groups as CSV, one row each, USD to the nano-dollar.
fn csv(name: &str, groups: &BTreeMap<String, Row>) -> impl IntoResponse {
    let mut out = format!(
        "{name},requests,input_tokens,output_tokens,realtime_usd,served_usd,saved_usd,\
         double_paid,double_paid_usd\n"
    );
    for (key, row) in groups {
        out.push_str(&format!(
            "{},{},{},{},{:.9},{:.9},{:.9},{},{:.9}\n",
            csv_field(key),
            row.requests,
            row.input_tokens,
            row.output_tokens,
            usd(row.realtime_nusd),
            usd(row.served_nusd),
            usd(row.realtime_nusd - row.served_nusd),
            row.double_paid,
            usd(row.double_paid_nusd),
        ));
    }
    ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out)
}

/// A CSV field, quoted when it holds a separator, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_numbers_are_utc_dates() {
        assert_eq!(day_name("0"), "1970-01-01");
        assert_eq!(day_name("20429"), "2025-12-07");
        assert_eq!(day_name("20794"), "2026-12-07");
        assert_eq!(day_name("-1"), "1969-12-31");
        assert_eq!(day_name("11016"), "2000-02-29");
    }

    #[test]
    fn instants_are_seconds_times_or_dates() {
        assert_eq!(
            instant_ms("from", "1765065600", false).ok(),
            Some(1_765_065_600_000)
        );
        assert_eq!(
            instant_ms("from", "2026-12-07", false).ok(),
            Some(20_794 * DAY_MS)
        );
        assert_eq!(
            instant_ms("to", "2026-12-07", true).ok(),
            Some(20_795 * DAY_MS)
        );
        assert_eq!(
            instant_ms("from", "2026-12-07T12:00:00Z", false).ok(),
            Some(20_794 * DAY_MS + DAY_MS / 2)
        );
        assert!(instant_ms("from", "yesterday", false).is_err());
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
