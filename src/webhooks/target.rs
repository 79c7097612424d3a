//! The SSRF guard: may carpool call this callback URL?
//!
//! Two moments judge a target. At intake ([`check_at_intake`]) only what
//! needs no DNS: the scheme (http or https), an IP literal host, and the
//! `localhost` names (RFC 6761: always loopback). Any other host name is
//! accepted then, because what it resolves to at intake says nothing about
//! what it resolves to later. At delivery ([`vet`]) the host is resolved and
//! refused if ANY address is loopback, private, link-local, unspecified,
//! multicast, broadcast, shared (CGNAT), reserved or a cloud metadata
//! address (IPv4-mapped and other IPv4-embedding IPv6 forms included); the
//! attempt then connects to exactly the addresses vetted, so a second lookup
//! cannot rebind the name. A host listed in `webhooks.allow_hosts` skips the
//! address check (never the scheme check).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use url::{Host, Url};

/// Longest callback URL accepted.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("Carpool-Callback is not a valid absolute URL")]
    Invalid,
    #[error("Carpool-Callback is longer than {MAX_URL_LEN} characters")]
    TooLong,
    #[error("Carpool-Callback must be an http or https URL, not {0}:")]
    Scheme(String),
    #[error("Carpool-Callback has no host")]
    NoHost,
    #[error("callback host {host} is a {kind} address ({addr}); refused unless listed in webhooks.allow_hosts")]
    Refused {
        host: String,
        addr: IpAddr,
        kind: &'static str,
    },
    #[error(
        "callback host {host} is a loopback name; refused unless listed in webhooks.allow_hosts"
    )]
    LocalName { host: String },
    /// DNS did not answer usefully: may be temporary, so retried.
    #[error("cannot resolve callback host {host}: {reason}")]
    Resolve { host: String, reason: String },
}

impl TargetError {
    /// Whether the target itself is refused (a verdict), as opposed to a
    /// lookup that may work next time.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::Resolve { .. })
    }
}

/// The URL's host as `allow_hosts` lists it: lower case, no trailing dot,
/// IPv6 without brackets.
pub fn host_key(url: &Url) -> Option<String> {
    Some(match url.host()? {
        Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
        Host::Ipv4(ip) => ip.to_string(),
        Host::Ipv6(ip) => ip.to_string(),
    })
}

fn allowed(key: &str, allow_hosts: &[String]) -> bool {
    allow_hosts.iter().any(|h| {
        h.trim_matches(|c| c == '[' || c == ']')
            .trim_end_matches('.')
            == key
    })
}

/// Checks a `Carpool-Callback` value before anything is stored.
pub fn check_at_intake(raw: &str, allow_hosts: &[String]) -> Result<Url, TargetError> {
    if raw.len() > MAX_URL_LEN {
        return Err(TargetError::TooLong);
    }
    let url = Url::parse(raw.trim()).map_err(|_| TargetError::Invalid)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Scheme(url.scheme().to_owned()));
    }
    let key = host_key(&url)
        .filter(|k| !k.is_empty())
        .ok_or(TargetError::NoHost)?;
    if allowed(&key, allow_hosts) {
        return Ok(url);
    }
    match url.host() {
        Some(Host::Ipv4(ip)) => refuse_ip(&key, IpAddr::V4(ip))?,
        Some(Host::Ipv6(ip)) => refuse_ip(&key, IpAddr::V6(ip))?,
        Some(Host::Domain(_)) if key == "localhost" || key.ends_with(".localhost") => {
            return Err(TargetError::LocalName { host: key });
        }
        _ => {}
    }
    Ok(url)
}

fn refuse_ip(host: &str, addr: IpAddr) -> Result<(), TargetError> {
    match refusal(addr) {
        Some(kind) => Err(TargetError::Refused {
            host: host.to_owned(),
            addr,
            kind,
        }),
        None => Ok(()),
    }
}

/// Where an attempt may connect: the URL's host name pinned to the vetted
/// addresses (none for an IP literal, which needs no lookup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vetted {
    pub pin: Option<(String, Vec<SocketAddr>)>,
}

/// Resolves and judges the target at delivery time.
pub async fn vet(url: &Url, allow_hosts: &[String]) -> Result<Vetted, TargetError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Scheme(url.scheme().to_owned()));
    }
    let key = host_key(url).ok_or(TargetError::NoHost)?;
    let is_allowed = allowed(&key, allow_hosts);
    let domain = match url.host() {
        Some(Host::Domain(d)) => d.to_owned(),
        Some(Host::Ipv4(ip)) if !is_allowed => {
            refuse_ip(&key, IpAddr::V4(ip))?;
            return Ok(Vetted { pin: None });
        }
        Some(Host::Ipv6(ip)) if !is_allowed => {
            refuse_ip(&key, IpAddr::V6(ip))?;
            return Ok(Vetted { pin: None });
        }
        Some(_) => return Ok(Vetted { pin: None }),
        None => return Err(TargetError::NoHost),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((domain.as_str(), port))
        .await
        .map_err(|e| TargetError::Resolve {
            host: key.clone(),
            reason: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TargetError::Resolve {
            host: key,
            reason: "no address".to_owned(),
        });
    }
    if !is_allowed {
        for a in &addrs {
            refuse_ip(&key, a.ip())?;
        }
    }
    Ok(Vetted {
        pin: Some((domain, addrs)),
    })
}

/// Why carpool must not call this address, or `None` when it may.
pub fn refusal(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "cloud metadata",
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_loopback() => "loopback",
        (10, _) | (192, 168) => "private",
        (172, b) if (16..32).contains(&b) => "private",
        (169, 254) => "link-local",
        (100, b) if (64..128).contains(&b) => "shared (CGNAT)",
        // 192.0.0.0/24: IETF protocol assignments (incl. other metadata).
        (192, 0) if c == 0 => "reserved",
        (198, b) if b == 18 || b == 19 => "benchmarking",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_multicast() => "multicast",
        _ if a >= 240 => "reserved",
        _ => return None,
    })
}

fn refusal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    let low32 = Ipv4Addr::new(
        (seg[6] >> 8) as u8,
        seg[6] as u8,
        (seg[7] >> 8) as u8,
        seg[7] as u8,
    );
    // IPv6 forms that carry an IPv4 address: judge the IPv4 address.
    let embedded = if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if seg[0..6] == [0, 0, 0, 0, 0xffff, 0] {
        // IPv4-translated (SIIT, RFC 2765) ::ffff:0:a.b.c.d
        Some(low32)
    } else if seg[0..2] == [0x2001, 0] {
        // Teredo 2001:0::/32 carries an obfuscated IPv4 address (the
        // client's, the bitwise NOT of the last 32 bits) and reaches it
        // through a relay: no webhook receiver needs one, so all refused.
        return Some("Teredo");
    } else if seg[0..3] == [0x64, 0xff9b, 1] {
        // Local-use NAT64 64:ff9b:1::/48 (RFC 8215): its translator is on
        // the local network and where the IPv4 address sits depends on the
        // prefix length it uses, so the whole prefix is refused.
        return Some("local-use NAT64");
    } else if seg[4] & 0xfdff == 0 && seg[5] == 0x5efe {
        // ISATAP interface identifier (RFC 5214) ::0:5efe:a.b.c.d or
        // ::200:5efe:a.b.c.d under any prefix.
        refusal_v4(low32).map(|_| low32)
    } else if seg[0..6] == [0, 0, 0, 0, 0, 0] && !(seg[6] == 0 && seg[7] <= 1) {
        // IPv4-compatible (deprecated) ::a.b.c.d
        Some(Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        ))
    } else if seg[0..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix 64:ff9b::/96
        Some(Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        ))
    } else if seg[0] == 0x2002 {
        // 6to4 2002:a.b.c.d::/48
        Some(Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        ))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return refusal_v4(v4);
    }
    Some(match seg[0] {
        _ if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => "cloud metadata",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        s if s & 0xfe00 == 0xfc00 => "private (unique local)",
        s if s & 0xffc0 == 0xfe80 => "link-local",
        s if s & 0xffc0 == 0xfec0 => "site-local",
        s if s & 0xff00 == 0xff00 => "multicast",
        // 2001:db8::/32 documentation, 2001:2::/48 benchmarking,
        // 100::/64 discard, and the rest of ::/16 (never routed).
        0x2001 if seg[1] == 0x0db8 => "documentation",
        0x2001 if seg[1..3] == [2, 0] => "benchmarking",
        0x0100 if seg[1..4] == [0, 0, 0] => "discard",
        0 => "reserved",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Option<&'static str> {
        refusal(s.parse().unwrap())
    }

    #[test]
    fn refuses_every_non_public_ipv4_range() {
        for (addr, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.255", "shared (CGNAT)"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("192.0.0.192", "reserved"),
        ] {
            assert_eq!(v4(addr), Some(kind), "{addr}");
        }
    }

    #[test]
    fn accepts_public_ipv4_next_to_the_refused_ranges() {
        for addr in [
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.1.1",
            "192.169.0.1",
            "11.0.0.1",
            "223.255.255.255",
        ] {
            assert_eq!(v4(addr), None, "{addr}");
        }
    }

    #[test]
    fn refuses_non_public_ipv6_and_ipv4_hidden_in_ipv6() {
        for (addr, kind) in [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "private (unique local)"),
            ("fd12:3456::1", "private (unique local)"),
            ("fd00:ec2::254", "cloud metadata"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("::ffff:10.0.0.1", "private"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::192.168.0.1", "private"),
            ("2002:7f00:1::", "loopback"),
            // SIIT / IPv4-translated ::ffff:0:0/96
            ("::ffff:0:7f00:1", "loopback"),
            ("::ffff:0:a00:1", "private"),
            // Local-use NAT64 64:ff9b:1::/48 (RFC 8215), any embedding
            ("64:ff9b:1::a00:1", "local-use NAT64"),
            ("64:ff9b:1:7f00:1::", "local-use NAT64"),
            ("64:ff9b:1::8.8.8.8", "local-use NAT64"),
            // Teredo 2001:0::/32, whatever the client address
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo"),
            ("2001::1", "Teredo"),
            // ISATAP interface identifiers
            ("2606:4700::5efe:7f00:1", "loopback"),
            ("2606:4700::200:5efe:a00:1", "private"),
            // Benchmarking, and the rest of ::/16
            ("2001:2::1", "benchmarking"),
            ("::1:0:0:7f00:1", "reserved"),
        ] {
            assert_eq!(v4(addr), Some(kind), "{addr}");
        }
        for addr in [
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::",
            "64:ff9b::8.8.8.8",
            "::ffff:0:8.8.8.8",
            "2606:4700::5efe:808:808",
            "2001:4860:4860::8888",
            "2001:1::1",
        ] {
            assert_eq!(v4(addr), None, "{addr}");
        }
    }

    #[test]
    fn intake_accepts_only_http_and_https() {
        let none: Vec<String> = vec![];
        assert!(check_at_intake("https://hooks.example.com/x?y=1", &none).is_ok());
        assert!(check_at_intake("http://hooks.example.com:8080/", &none).is_ok());
        assert_eq!(
            check_at_intake("ftp://hooks.example.com/", &none),
            Err(TargetError::Scheme("ftp".into()))
        );
        assert_eq!(
            check_at_intake("file:///etc/passwd", &none),
            Err(TargetError::Scheme("file".into()))
        );
        assert_eq!(
            check_at_intake("/relative", &none),
            Err(TargetError::Invalid)
        );
        assert_eq!(
            check_at_intake("not a url", &none),
            Err(TargetError::Invalid)
        );
        let long = format!("https://h.example/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(check_at_intake(&long, &none), Err(TargetError::TooLong));
    }

    #[test]
    fn intake_refuses_private_literals_and_localhost_unless_allowed() {
        let none: Vec<String> = vec![];
        for url in [
            "http://127.0.0.1:9/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(
                matches!(
                    check_at_intake(url, &none),
                    Err(TargetError::Refused { .. })
                ),
                "{url}"
            );
        }
        for url in [
            "http://localhost:8/",
            "http://LOCALHOST./",
            "http://a.localhost/",
        ] {
            assert!(
                matches!(
                    check_at_intake(url, &none),
                    Err(TargetError::LocalName { .. })
                ),
                "{url}"
            );
        }
        let allow = vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "[::1]".to_owned(),
        ];
        for url in [
            "http://127.0.0.1:9/",
            "http://localhost:8/",
            "http://[::1]:7/",
        ] {
            assert!(check_at_intake(url, &allow).is_ok(), "{url}");
        }
        // A name is judged at delivery, when it is resolved.
        assert!(check_at_intake("http://internal.corp.example/", &none).is_ok());
    }

    #[tokio::test]
    async fn delivery_refuses_a_name_that_resolves_to_loopback() {
        let url = Url::parse("http://localhost:9/hook").unwrap();
        let err = vet(&url, &[]).await.unwrap_err();
        assert!(err.is_refusal());
        assert!(
            matches!(
                err,
                TargetError::Refused {
                    kind: "loopback",
                    ..
                }
            ),
            "{err}"
        );
        let ok = vet(&url, &["localhost".to_owned()]).await.unwrap();
        let (host, addrs) = ok.pin.unwrap();
        assert_eq!(host, "localhost");
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
        let literal = Url::parse("http://127.0.0.1:9/").unwrap();
        assert!(vet(&literal, &[]).await.is_err());
        assert_eq!(
            vet(&literal, &["127.0.0.1".to_owned()]).await,
            Ok(Vetted { pin: None })
        );
    }
}
