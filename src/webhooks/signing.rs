//! Standard Webhooks signing and the message body (pure).
//!
//! Each configured secret signs `"{webhook-id}.{webhook-timestamp}.{body}"`
//! with HMAC-SHA256; `webhook-signature` lists `v1,<base64>` per secret,
//! space separated, the first configured secret first (receivers rotating
//! keys accept any). The exact body bytes sent are the bytes signed.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::config::WebhookSecret;
use crate::deferral::answer::request_object;
use crate::store::RequestRecord;

/// The `webhook-signature` value for one message.
pub fn signature_header(
    secrets: &[WebhookSecret],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .filter_map(|secret| {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose()).ok()?;
            mac.update(msg_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            Some(format!("v1,{sig}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `{"type":…,"timestamp":<RFC 3339 of when the request finished>,"data":<request object>}`.
/// The same bytes on every attempt: a finished request never changes.
pub fn body(record: &RequestRecord, event: &str, finished_at_ms: i64) -> Vec<u8> {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(finished_at_ms).unwrap_or(0));
    json!({
        "type": event,
        "timestamp": humantime::format_rfc3339_millis(at).to_string(),
        "data": request_object(record),
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml_str;
    use std::collections::BTreeMap;

    fn secrets(webhooks: &str) -> Vec<WebhookSecret> {
        let toml = format!(
            "[[upstreams]]\nname = \"u\"\ndialect = \"openai\"\nbase_url = \"http://h\"\n{webhooks}"
        );
        from_toml_str(&toml, &BTreeMap::new())
            .unwrap()
            .webhooks
            .secrets
    }

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // The spec's libraries' own test vector.
        let s = secrets("[webhooks]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature_header(&s, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn every_secret_signs_first_one_first() {
        let s = secrets(
            "[webhooks]\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\", \"whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"]\n",
        );
        let header = signature_header(
            &s,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(parts[1].starts_with("v1,") && parts[1] != parts[0]);
    }
}
