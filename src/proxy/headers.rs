//! Which headers cross the proxy. Hop-by-hop headers (RFC 9110 §7.6.1, plus
//! any named in `Connection`) are dropped both ways; so are carpool's own
//! `Carpool-*` request headers and `Host` (set from the upstream URL).

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};

const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
        || listed.iter().any(|l| l.eq_ignore_ascii_case(name.as_str()))
}

/// Header names listed in `Connection`, which are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The caller's headers as they go upstream (authorization handled apart).
pub fn outbound(caller: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(caller);
    let mut out = HeaderMap::with_capacity(caller.len());
    for (name, value) in caller {
        if is_hop_by_hop(name, &listed)
            || name == header::HOST
            || name.as_str().starts_with("carpool-")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Headers [`outbound`] would send that a deferred request does not keep
/// for its realtime call: credentials (carpool sets the key, and secrets are
/// never stored), and the framing and encoding of a body carpool sends and
/// an answer carpool reads and stores itself.
const NOT_REPLAYED: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "content-length",
    "content-type",
    "content-encoding",
    "accept-encoding",
    "expect",
];

/// The caller's end-to-end headers a realtime call made later for a
/// deferred request sends, as a pass-through would have (SPEC section 2):
/// [`outbound`]'s, less [`NOT_REPLAYED`], as `(name, value)` to store. A
/// value that is not UTF-8 text cannot be stored as such and is left out.
pub fn replayable(caller: &HeaderMap) -> Vec<(String, String)> {
    outbound(caller)
        .iter()
        .filter(|(name, _)| !NOT_REPLAYED.contains(&name.as_str()))
        .filter_map(|(name, value)| {
            let text = std::str::from_utf8(value.as_bytes()).ok()?;
            Some((name.as_str().to_owned(), text.to_owned()))
        })
        .collect()
}

/// Stored `(name, value)` pairs back into headers; a pair that is no longer
/// a valid header is skipped.
pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = &'a (String, String)>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.append(name, value);
        }
    }
    out
}

/// The upstream's headers as they go back to the caller.
pub fn inbound(upstream: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !is_hop_by_hop(name, &listed) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::HOST, "carpool".parse().unwrap());
        h.insert("carpool-mode", "now".parse().unwrap());
        h.insert("x-stainless-retry-count", "1".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let out = outbound(&h);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(out.contains_key("x-stainless-retry-count"));
        assert!(out.contains_key(header::CONTENT_TYPE));
        let back = inbound(&h);
        assert!(back.contains_key(header::HOST) && !back.contains_key("x-private"));
    }

    #[test]
    fn replayable_headers_are_the_pass_through_ones_without_credentials_or_framing() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer sk-x".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "12".parse().unwrap());
        h.insert(header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        h.insert(header::HOST, "carpool".parse().unwrap());
        h.insert("carpool-mode", "async".parse().unwrap());
        h.insert("openai-project", "proj_A".parse().unwrap());
        h.insert("x-request-id", "r-1".parse().unwrap());
        let kept = replayable(&h);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let back = from_pairs(&kept);
        assert_eq!(back.get("openai-project").unwrap(), "proj_A");
        assert_eq!(back.get("x-request-id").unwrap(), "r-1");
    }
}
