//! The neutral vocabulary every layer shares: ids, request states, dialects
//! and batchable endpoints. Nothing here does I/O.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (0 for a clock set before it).
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `prefix` then `bytes` in lowercase hex. `hex::encode` goes through a
/// char iterator, a few thousand instructions for 32 bytes; this runs
/// several times on every deferred call.
pub fn prefixed_hex(prefix: &str, bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(prefix.len() + 2 * bytes.len());
    out.push_str(prefix);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Bytes of Unix milliseconds at the start of an id (sortable by time).
const TIME_BYTES: usize = 6;
/// Random bytes of an id: 128 bits, so ids cannot be guessed (SPEC section 1).
pub const RANDOM_BYTES: usize = 16;
/// Hex length of ids made before ids had 128 random bits (48 + 80 bits).
const LEGACY_HEX_LEN: usize = 32;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id: the prefix, then 48 bits of Unix milliseconds and
            /// 128 random bits ([`RANDOM_BYTES`]), in hex: 48 characters,
            /// a valid batch `custom_id`. Ids made later sort later, so the
            /// store's unique index on them grows at its end instead of
            /// dirtying a random page for every insert.
            pub fn generate() -> Self {
                Self::made_at(unix_millis())
            }

            fn made_at(millis: u64) -> Self {
                let mut bytes = [0u8; TIME_BYTES + RANDOM_BYTES];
                bytes[..TIME_BYTES].copy_from_slice(&millis.to_be_bytes()[2..]);
                rand::thread_rng().fill_bytes(&mut bytes[TIME_BYTES..]);
                Self(prefixed_hex($prefix, &bytes))
            }

            /// Accepts only ids of this kind's shape, so a caller-supplied
            /// string never reaches the store unchecked: today's, or the
            /// shorter one (80 random bits) of ids stored before.
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix($prefix)?;
                let lengths = [2 * (TIME_BYTES + RANDOM_BYTES), LEGACY_HEX_LEN];
                (lengths.contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| Self(s.to_owned()))
            }

            /// Wraps a value read back from our own store.
            pub fn from_stored(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A deferred request; also the `custom_id` of its batch line.
    RequestId,
    "cpr_"
);
id_type!(
    /// A window: the requests that go into one batch job.
    WindowId,
    "cpw_"
);
id_type!(
    /// A webhook delivery (its `webhook-id`): one per request with a
    /// callback, the same across every attempt and replay.
    DeliveryId,
    "msg_"
);

impl DeliveryId {
    /// The delivery of a request's result: derived from the request id, so
    /// enqueueing it twice finds the same row.
    pub fn for_request(request: &RequestId) -> Self {
        let id = request.as_str();
        Self(format!(
            "msg_{}",
            id.strip_prefix(RequestId::PREFIX).unwrap_or(id)
        ))
    }
}

/// The state of a deferred request as callers see it (SPEC section 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Queued,
    Submitted,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl RequestStatus {
    pub const ALL: [RequestStatus; 6] = [
        Self::Queued,
        Self::Submitted,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Submitted => "submitted",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Finished requests never change again.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Submitted)
    }
}

/// Who produced a request's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServedBy {
    Batch,
    /// A discounted synchronous tier (OpenAI's `service_tier: "flex"`).
    Flex,
    Realtime,
}

impl ServedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Flex => "flex",
            Self::Realtime => "realtime",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "batch" => Some(Self::Batch),
            "flex" => Some(Self::Flex),
            "realtime" => Some(Self::Realtime),
            _ => None,
        }
    }
}

/// The batch API a provider speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Mistral,
    Openai,
    Anthropic,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mistral => "mistral",
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    /// Endpoints this dialect's batch API accepts (SPEC section 1).
    pub fn batchable(self, endpoint: &str) -> bool {
        match self {
            Self::Mistral => matches!(
                endpoint,
                "/v1/chat/completions"
                    | "/v1/embeddings"
                    | "/v1/fim/completions"
                    | "/v1/moderations"
                    | "/v1/chat/moderations"
                    | "/v1/ocr"
                    | "/v1/classifications"
            ),
            Self::Openai => matches!(
                endpoint,
                "/v1/chat/completions"
                    | "/v1/responses"
                    | "/v1/embeddings"
                    | "/v1/completions"
                    | "/v1/moderations"
            ),
            Self::Anthropic => endpoint == "/v1/messages",
        }
    }

    /// The request headers that scope a call to part of its key's account
    /// (SPEC section 2), lowercase. Mistral has none: its keys belong to one
    /// workspace, so headers of that name are only passed along on realtime
    /// calls, like any other end-to-end header.
    pub fn scoping_headers(self) -> &'static [&'static str] {
        match self {
            Self::Mistral => &[],
            Self::Openai => &["openai-organization", "openai-project"],
            Self::Anthropic => &["anthropic-beta", "anthropic-workspace-id"],
        }
    }

    /// Requests per job and bytes per input file the provider accepts
    /// (reference sections A6 and B6: size windows to the smaller figure).
    pub fn limits(self) -> (u64, u64) {
        match self {
            Self::Mistral => (100_000, 512 * 1_000_000),
            Self::Openai => (50_000, 200 * 1_000_000),
            Self::Anthropic => (100_000, 256 * 1_000_000),
        }
    }
}

/// The model a window of `endpoint` is keyed by. Anthropic's Message
/// Batches take several models at once (SPEC section 2), so its windows
/// are not split by model: they all carry [`MIXED_MODELS`]. `/v1/messages`
/// is batchable on the Anthropic dialect only, so the endpoint decides.
pub fn window_model<'a>(endpoint: &str, model: &'a str) -> &'a str {
    if endpoint == "/v1/messages" {
        MIXED_MODELS
    } else {
        model
    }
}

/// The model of a window whose batch takes every model ([`window_model`]).
pub const MIXED_MODELS: &str = "*";

/// A call's scoping headers (SPEC section 2): which organization and project
/// of the key the provider bills and limits it under. Part of the window key,
/// so callers of two projects never share a batch, and sent on every files
/// and batch call of the window. Names are lowercase, sorted; an empty scope
/// is a call that sent none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Scope(Vec<(String, String)>);

impl Scope {
    /// From `(name, value)` pairs; names are lowercased and sorted (values of
    /// one name keep their order) so equal scopes compare and store equal.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut pairs: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v))
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Self(pairs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers to send, as `(lowercase name, value)`.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// The stored form: `""` for no scope (what rows stored before scopes
    /// existed hold), else a JSON array of `[name, value]` pairs.
    pub fn to_stored(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        serde_json::to_string(&self.0).unwrap_or_default()
    }

    /// Reads [`Self::to_stored`]'s form back; `None` if it is not that form.
    pub fn from_stored(s: &str) -> Option<Self> {
        if s.is_empty() {
            return Some(Self::default());
        }
        serde_json::from_str(s).ok().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_is_canonical_and_round_trips_through_its_stored_form() {
        let a = Scope::new([
            ("OpenAI-Project".to_owned(), "proj_A".to_owned()),
            ("openai-organization".to_owned(), "org_1".to_owned()),
        ]);
        let b = Scope::new([
            ("openai-organization".to_owned(), "org_1".to_owned()),
            ("openai-project".to_owned(), "proj_A".to_owned()),
        ]);
        assert_eq!(a, b);
        assert_eq!(a.to_stored(), b.to_stored());
        assert_eq!(Scope::from_stored(&a.to_stored()), Some(a));
        assert_eq!(Scope::default().to_stored(), "");
        assert_eq!(Scope::from_stored(""), Some(Scope::default()));
        assert_eq!(Scope::from_stored("not json"), None);
    }

    #[test]
    fn prefixed_hex_is_lowercase_hex_after_the_prefix() {
        let bytes = [0x00, 0x0f, 0xa5, 0xff];
        assert_eq!(
            prefixed_hex("p_", &bytes),
            format!("p_{}", hex::encode(bytes))
        );
        assert_eq!(prefixed_hex("", &[]), "");
    }

    #[test]
    fn generated_ids_round_trip_and_reject_foreign_shapes() {
        let id = RequestId::generate();
        assert_eq!(RequestId::parse(id.as_str()), Some(id.clone()));
        assert!(id.as_str().len() <= 64);
        assert_eq!(RequestId::parse("cpr_123"), None);
        assert_eq!(WindowId::parse(id.as_str()), None);
    }

    #[test]
    fn later_ids_sort_later_whatever_their_random_part() {
        let now = unix_millis();
        for _ in 0..1_000 {
            let earlier = RequestId::made_at(now);
            let later = RequestId::made_at(now + 1);
            assert!(earlier < later, "{earlier} !< {later}");
            assert_eq!(RequestId::parse(later.as_str()), Some(later.clone()));
        }
        // Random bits after the time: two ids of one millisecond differ.
        assert_ne!(RequestId::made_at(now), RequestId::made_at(now));
    }

    #[test]
    fn responses_are_batchable_on_openai_only() {
        assert!(Dialect::Openai.batchable("/v1/responses"));
        assert!(!Dialect::Mistral.batchable("/v1/responses"));
    }

    #[test]
    fn ids_carry_128_random_bits_after_the_time() {
        let now = unix_millis();
        let ids: Vec<String> = (0..256)
            .map(|_| RequestId::made_at(now).as_str().to_owned())
            .collect();
        let time_hex = 2 * TIME_BYTES;
        for id in &ids {
            let hex = id.strip_prefix(RequestId::PREFIX).unwrap();
            assert!(id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            assert_eq!(
                hex.len() - time_hex,
                32,
                "{id}: random part is not 128 bits"
            );
        }
        // Every one of the 128 random bit positions takes both values across
        // 256 ids (a stuck bit would show up here with near certainty).
        let random = |id: &String| {
            u128::from_str_radix(&id[RequestId::PREFIX.len() + time_hex..], 16).unwrap()
        };
        let ones = ids.iter().map(random).fold(0u128, |a, r| a | r);
        let zeros = ids.iter().map(random).fold(0u128, |a, r| a | !r);
        assert_eq!(ones, u128::MAX);
        assert_eq!(zeros, u128::MAX);
    }

    #[test]
    fn ids_stored_before_the_wider_random_part_still_parse() {
        let old = "cpr_01a24e6f1fdc0123456789abcdef0123";
        assert_eq!(old.len(), 4 + 32);
        assert_eq!(
            RequestId::parse(old)
                .map(|i| i.as_str().to_owned())
                .as_deref(),
            Some(old)
        );
        assert_eq!(
            RequestId::parse("cpr_01a24e6f1fdc0123456789abcdef012"),
            None
        );
    }

    #[test]
    fn only_queued_and_submitted_are_open() {
        let open: Vec<_> = RequestStatus::ALL
            .into_iter()
            .filter(|s| !s.is_final())
            .collect();
        assert_eq!(open, vec![RequestStatus::Queued, RequestStatus::Submitted]);
    }
}
