//! Who is calling: the presented key (a bearer token, or Anthropic's
//! `x-api-key` when there is no `Authorization`) checked against
//! `[[clients]]` (managed upstreams) or carried upstream as is
//! (passthrough upstreams).
//! The deferral path reuses [`Caller`] to bind handles to credentials.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::config::{AuthMode, ClientConfig, Secret, UpstreamConfig};
use crate::model::prefixed_hex;

pub const ANONYMOUS: &str = "anonymous";

/// An authenticated caller of one upstream.
#[derive(Clone, Debug)]
pub struct Caller {
    /// SHA-256 hex of the presented key, or `"anonymous"` when none was sent.
    /// Never the key itself.
    pub credential_hash: String,
    /// The `[[clients]]` entry the key belongs to, if any.
    pub client_name: Option<String>,
    /// The key to send upstream: carpool's own for managed upstreams; `None`
    /// for passthrough upstreams, where the caller's `Authorization` is sent.
    pub upstream_key: Option<Secret>,
}

impl Caller {
    /// Checks the caller's `Authorization` for `upstream`. A managed upstream
    /// with `[[clients]]` listed refuses any key not listed (401); with none
    /// listed it is open. A passthrough upstream leaves the check to the
    /// upstream.
    pub fn authenticate(
        headers: &HeaderMap,
        upstream: &UpstreamConfig,
        clients: &[ClientConfig],
    ) -> Result<Self, ApiError> {
        let presented = Presented::of(headers);
        let credential_hash = presented.credential_hash();
        let client_name = match presented {
            Presented::Bearer(_) => find_client(&credential_hash, clients),
            _ => None,
        };
        match upstream.auth {
            AuthMode::Managed => {
                if !clients.is_empty() && client_name.is_none() {
                    return Err(ApiError::Unauthorized);
                }
                Ok(Self {
                    credential_hash,
                    client_name,
                    upstream_key: upstream.api_key.clone(),
                })
            }
            AuthMode::Passthrough => Ok(Self {
                credential_hash,
                client_name,
                upstream_key: None,
            }),
        }
    }

    /// The caller as far as its request head tells, before any upstream is
    /// chosen (the body, and so the model, is not read yet): accepted when
    /// at least one upstream could accept it (a passthrough upstream, a
    /// managed one with no `[[clients]]`, or a listed key), else 401. Handle
    /// calls use this too: a handle is bound to the credential that made it,
    /// through whichever upstream, so this credential reads only its own.
    pub fn admissible(
        headers: &HeaderMap,
        upstreams: &[UpstreamConfig],
        clients: &[ClientConfig],
    ) -> Result<Self, ApiError> {
        let mut refused = ApiError::Unauthorized;
        for upstream in upstreams {
            match Self::authenticate(headers, upstream, clients) {
                Ok(caller) => return Ok(caller),
                Err(err) => refused = err,
            }
        }
        Err(refused)
    }
}

/// What a caller's `Authorization` header holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presented<'h> {
    /// No `Authorization` header at all.
    Nothing,
    /// A well-formed `Bearer <key>`.
    Bearer(&'h str),
    /// Something else: another scheme, no key, or bytes that are not text.
    Malformed(&'h [u8]),
}

impl<'h> Presented<'h> {
    pub fn of(headers: &'h HeaderMap) -> Self {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            // Anthropic's SDK sends its key here; the same key is the same
            // credential whichever header carried it.
            return match headers.get(X_API_KEY) {
                None => Self::Nothing,
                Some(value) => match api_key(headers) {
                    Some(key) => Self::Bearer(key),
                    None => Self::Malformed(value.as_bytes()),
                },
            };
        };
        match bearer(headers) {
            Some(key) => Self::Bearer(key),
            None => Self::Malformed(value.as_bytes()),
        }
    }

    /// What handles are bound to: the SHA-256 of the key; for a malformed
    /// header the SHA-256 of the whole header under another domain, so two
    /// different malformed headers never share a credential (nor one with
    /// a key); `"anonymous"` only when nothing was presented.
    pub fn credential_hash(&self) -> String {
        match self {
            Self::Nothing => ANONYMOUS.to_owned(),
            Self::Bearer(key) => prefixed_hex("", &Sha256::digest(key.as_bytes())),
            Self::Malformed(raw) => {
                let mut h = Sha256::new();
                h.update(b"carpool-malformed-authorization\0");
                h.update(raw);
                prefixed_hex("", &h.finalize())
            }
        }
    }
}

/// The token of `Authorization: Bearer <token>`, if well formed: the
/// scheme, case-insensitive, then any run of whitespace, then the token.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && !token.contains(|c: char| c.is_ascii_whitespace()))
    .then_some(token)
}

/// Anthropic's key header.
pub const X_API_KEY: &str = "x-api-key";

/// A well-formed `x-api-key`: text, no whitespace inside, not empty.
pub fn api_key(headers: &HeaderMap) -> Option<&str> {
    let key = headers.get(X_API_KEY)?.to_str().ok()?.trim();
    (!key.is_empty() && !key.contains(|c: char| c.is_ascii_whitespace())).then_some(key)
}

/// The caller's key as the upstream would read it: the bearer token, or
/// without an `Authorization` header the `x-api-key`.
pub fn caller_key(headers: &HeaderMap) -> Option<&str> {
    match headers.get(header::AUTHORIZATION) {
        Some(_) => bearer(headers),
        None => api_key(headers),
    }
}

/// Compares against every client, in constant time per comparison and
/// without stopping early, so timing does not reveal which entry matched.
fn find_client(hash_hex: &str, clients: &[ClientConfig]) -> Option<String> {
    let mut found = None;
    for c in clients {
        if bool::from(c.key_sha256.as_bytes().ct_eq(hash_hex.as_bytes())) {
            found = Some(c.name.clone());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml_str;
    use std::collections::BTreeMap;

    fn config(auth: &str, with_client: bool) -> crate::config::Config {
        let client = if with_client {
            format!(
                "[[clients]]\nname = \"app\"\nkey_sha256 = \"{}\"\n",
                hex::encode(Sha256::digest(b"client-key"))
            )
        } else {
            String::new()
        };
        let text = format!(
            "[[upstreams]]\nname = \"u\"\ndialect = \"openai\"\nbase_url = \"http://h\"\napi_key_env = \"K\"\nauth = \"{auth}\"\n{client}"
        );
        let vars = BTreeMap::from([("K".to_owned(), "upstream-key".to_owned())]);
        from_toml_str(&text, &vars).unwrap()
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn managed_accepts_listed_key_and_sends_carpools_key() {
        let c = config("managed", true);
        let caller = Caller::authenticate(
            &headers(Some("Bearer client-key")),
            &c.upstreams[0],
            &c.clients,
        )
        .unwrap();
        assert_eq!(caller.client_name.as_deref(), Some("app"));
        assert_eq!(caller.upstream_key.unwrap().expose(), "upstream-key");
        assert_eq!(caller.credential_hash.len(), 64);
    }

    #[test]
    fn managed_refuses_unlisted_or_missing_key() {
        let c = config("managed", true);
        for h in [
            headers(Some("Bearer nope")),
            headers(None),
            headers(Some("Basic x")),
        ] {
            let r = Caller::authenticate(&h, &c.upstreams[0], &c.clients);
            assert!(matches!(r, Err(ApiError::Unauthorized)));
        }
    }

    #[test]
    fn bearer_takes_any_whitespace_and_refuses_other_schemes() {
        for ok in ["Bearer\tk1", "bearer   k1", " Bearer \t k1 "] {
            assert_eq!(bearer(&headers(Some(ok))), Some("k1"), "{ok:?}");
        }
        for bad in [
            "Basic k1",
            "Token k1",
            "Bearer",
            "Bearer   ",
            "Bearerk1",
            "Bearer a b",
        ] {
            assert_eq!(bearer(&headers(Some(bad))), None, "{bad:?}");
        }
    }

    #[test]
    fn malformed_headers_never_share_a_credential() {
        let a = headers(Some("Basic one"));
        let b = headers(Some("Basic two"));
        let hash = |h: &HeaderMap| Presented::of(h).credential_hash();
        assert_ne!(hash(&a), hash(&b));
        assert_ne!(hash(&a), ANONYMOUS);
        assert_ne!(
            hash(&headers(Some("Bearer one"))),
            hash(&headers(Some("one")))
        );
    }

    #[test]
    fn an_x_api_key_is_the_same_credential_as_that_bearer_key() {
        let mut h = HeaderMap::new();
        h.insert(X_API_KEY, "k1".parse().unwrap());
        assert_eq!(
            Presented::of(&h).credential_hash(),
            Presented::of(&headers(Some("Bearer k1"))).credential_hash()
        );
        assert_eq!(caller_key(&h), Some("k1"));
        h.insert(X_API_KEY, "a b".parse().unwrap());
        assert!(matches!(Presented::of(&h), Presented::Malformed(_)));
        assert_eq!(caller_key(&h), None);
    }

    #[test]
    fn managed_without_clients_is_open() {
        let c = config("managed", false);
        let caller = Caller::authenticate(&headers(None), &c.upstreams[0], &c.clients).unwrap();
        assert_eq!(caller.credential_hash, ANONYMOUS);
    }

    #[test]
    fn passthrough_sends_no_key_of_its_own() {
        let c = config("passthrough", true);
        let caller = Caller::authenticate(
            &headers(Some("Bearer anything")),
            &c.upstreams[0],
            &c.clients,
        )
        .unwrap();
        assert!(caller.upstream_key.is_none());
        assert!(caller.client_name.is_none());
    }
}
