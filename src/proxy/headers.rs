//! Which headers cross the proxy. Hop-by-hop headers (RFC 9110 §7.6.1, plus
//! any named in `Connection`) are dropped both ways; so are carpool's own
//! `Carpool-*` request headers and `Host` (set from the upstream URL).

use axum::http::{header, HeaderMap, HeaderName};

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
}
