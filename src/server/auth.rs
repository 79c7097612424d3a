//! Who is calling: the presented bearer key checked against `[[clients]]`
//! (managed upstreams) or carried upstream as is (passthrough upstreams).
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
        let presented = bearer(headers);
        let credential_hash = presented
            .map(|key| prefixed_hex("", &Sha256::digest(key.as_bytes())))
            .unwrap_or_else(|| ANONYMOUS.to_owned());
        let client_name = presented.and_then(|_| find_client(&credential_hash, clients));
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
}

/// The token of `Authorization: Bearer <token>`, if well formed.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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
