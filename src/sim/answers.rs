//! Deterministic answers: what every synchronous endpoint returns for a body.
//!
//! Pure functions only. The whole answer (id, created, content, usage) is a
//! function of the endpoint and the canonical request body (keys sorted,
//! `stream` and `stream_options` removed), so a test can compute what any
//! caller should receive, and a batch line's `response.body` equals the
//! synchronous answer for the same body.

use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// Endpoints the simulator answers (synchronously and inside batches).
pub const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fim/completions",
    "/v1/moderations",
    "/v1/chat/moderations",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
];

/// Models `/v1/models` lists. Any model name is accepted everywhere.
pub const MODELS: &[&str] = &[
    "sim-small",
    "sim-large",
    "sim-embed",
    "gpt-4o-mini",
    "text-embedding-3-small",
    "mistral-small-latest",
    "mistral-large-latest",
    "mistral-embed",
    "codestral-latest",
];

const EMBEDDING_DIMS: usize = 8;
const ECHO_CHARS: usize = 80;

/// The deterministic answer for `body` sent to `endpoint`: the success body,
/// or the error envelope the simulator answers with (status 400/404).
pub fn expected_response(endpoint: &str, body: &Value) -> Value {
    match respond(endpoint, body) {
        Ok(answer) => answer,
        Err(err) => err.envelope(),
    }
}

/// The answer for `body`, or the refusal with its status.
pub fn respond(endpoint: &str, body: &Value) -> Result<Value, ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    let digest = Digest32::of(endpoint, obj);
    match endpoint {
        "/v1/chat/completions" => chat(obj, &digest),
        "/v1/embeddings" => embeddings(obj, &digest),
        "/v1/fim/completions" => fim(obj, &digest),
        "/v1/moderations" => moderations(obj, &digest, false),
        "/v1/chat/moderations" => moderations(obj, &digest, true),
        "/v1/completions" => completions(obj, &digest),
        "/v1/responses" => super::responses::answer(obj, &digest),
        "/v1/messages" => super::anthropic::answer(obj, &digest),
        other => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the simulator does not serve {other}"),
        )
        .code("unknown_url")),
    }
}

/// The events of a streamed chat completion: `pieces` content chunks (the
/// first also carries the role) then a final chunk with `finish_reason` and
/// usage. Their contents concatenate to the non-streamed answer's content.
pub fn chat_stream_events(body: &Value, pieces: usize) -> Result<Vec<Value>, ApiError> {
    let answer = respond("/v1/chat/completions", body)?;
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let base = |delta: Value, finish: Value| {
        json!({
            "id": answer["id"],
            "object": "chat.completion.chunk",
            "created": answer["created"],
            "model": answer["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let mut events: Vec<Value> = split_chars(&content, pieces.max(1))
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": piece})
            } else {
                json!({"content": piece})
            };
            base(delta, Value::Null)
        })
        .collect();
    let mut last = base(json!({}), json!("stop"));
    last["usage"] = answer["usage"].clone();
    events.push(last);
    Ok(events)
}

/// A rough token count: about four characters per token, at least one.
pub fn token_estimate(text: &str) -> u64 {
    let chars = text.chars().count() as u64;
    chars.div_ceil(4).max(1)
}

/// Hex SHA-256 of the canonical form of a JSON value (keys sorted).
pub fn canonical_hash(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    hex::encode(Sha256::digest(out.as_bytes()))
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The identity of one request: hash of endpoint + canonical body.
pub(super) struct Digest32 {
    hex: String,
}

impl Digest32 {
    fn of(endpoint: &str, body: &Map<String, Value>) -> Self {
        let mut trimmed = body.clone();
        trimmed.remove("stream");
        trimmed.remove("stream_options");
        // The same answer whichever tier serves it.
        trimmed.remove("service_tier");
        let hex = canonical_hash(&json!({"endpoint": endpoint, "body": trimmed}));
        Self { hex }
    }

    pub(super) fn short(&self) -> &str {
        &self.hex[..16]
    }

    pub(super) fn created(&self) -> u64 {
        let n = u64::from_str_radix(&self.hex[..8], 16).unwrap_or(0);
        1_700_000_000 + n % 10_000_000
    }
}

pub(super) fn required_model(obj: &Map<String, Value>) -> Result<String, ApiError> {
    match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        _ => Err(ApiError::missing("model")),
    }
}

/// Text of a message `content`: a string, or the `text` of its parts.
pub(super) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub(super) fn echo(text: &str) -> String {
    let cut: String = text.chars().take(ECHO_CHARS).collect();
    cut.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub(super) fn split_chars(text: &str, pieces: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(pieces).max(1);
    let mut out: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
    out.resize(pieces, String::new());
    out
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn messages(obj: &Map<String, Value>) -> Result<&Vec<Value>, ApiError> {
    match obj.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => Ok(list),
        Some(Value::Array(_)) => {
            Err(ApiError::invalid("`messages` must not be empty").param("messages"))
        }
        _ => Err(ApiError::missing("messages")),
    }
}

fn chat(obj: &Map<String, Value>, d: &Digest32) -> Result<Value, ApiError> {
    let model = required_model(obj)?;
    let msgs = messages(obj)?;
    let mut prompt_tokens = 0;
    let mut last_user = String::new();
    for msg in msgs {
        let text = content_text(msg.get("content").unwrap_or(&Value::Null));
        prompt_tokens += token_estimate(&text) + 3;
        if msg.get("role").and_then(Value::as_str) == Some("user") {
            last_user = text;
        }
    }
    let content = format!("Simulated answer {} to: {}", d.short(), echo(&last_user));
    let completion_tokens = token_estimate(&content);
    Ok(json!({
        "id": format!("chatcmpl-{}", d.short()),
        "object": "chat.completion",
        "created": d.created(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
            "logprobs": null,
        }],
        "usage": usage(prompt_tokens, completion_tokens),
    }))
}

fn fim(obj: &Map<String, Value>, d: &Digest32) -> Result<Value, ApiError> {
    let model = required_model(obj)?;
    let prompt = match obj.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        _ => return Err(ApiError::missing("prompt")),
    };
    let suffix = obj
        .get("suffix")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let content = format!("Simulated fill {} after: {}", d.short(), echo(&prompt));
    let prompt_tokens = token_estimate(&prompt) + token_estimate(suffix);
    Ok(json!({
        "id": format!("fim-{}", d.short()),
        "object": "chat.completion",
        "created": d.created(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": usage(prompt_tokens, token_estimate(&content)),
    }))
}

fn completions(obj: &Map<String, Value>, d: &Digest32) -> Result<Value, ApiError> {
    let model = required_model(obj)?;
    let prompts = string_inputs(obj.get("prompt"), "prompt")?;
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    let choices: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let text = format!("Simulated completion {} of: {}", d.short(), echo(p));
            prompt_tokens += token_estimate(p);
            completion_tokens += token_estimate(&text);
            json!({"text": text, "index": i, "logprobs": null, "finish_reason": "stop"})
        })
        .collect();
    Ok(json!({
        "id": format!("cmpl-{}", d.short()),
        "object": "text_completion",
        "created": d.created(),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
}

/// `input` as a list of strings: a string, a list of strings, or token
/// arrays (rendered as their JSON text).
fn string_inputs(input: Option<&Value>, name: &str) -> Result<Vec<String>, ApiError> {
    match input {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                return Ok(vec![Value::Array(items.clone()).to_string()]);
            }
            Ok(items
                .iter()
                .map(|item| match item {
                    Value::String(s) => s.clone(),
                    other => content_text(other),
                })
                .collect())
        }
        Some(_) => Err(ApiError::invalid(format!("`{name}` must not be empty")).param(name)),
        None => Err(ApiError::missing(name)),
    }
}

fn embeddings(obj: &Map<String, Value>, d: &Digest32) -> Result<Value, ApiError> {
    let model = required_model(obj)?;
    let inputs = string_inputs(obj.get("input"), "input")?;
    let base64_format = obj.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let mut tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += token_estimate(text);
            let hash = Sha256::digest(format!("{model}\n{text}").as_bytes());
            // Multiples of 1/128 survive f32 -> JSON -> f64 exactly.
            let vector: Vec<f32> = hash[..EMBEDDING_DIMS]
                .iter()
                .map(|b| f32::from(*b) / 128.0 - 1.0)
                .collect();
            let embedding = if base64_format {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "embedding": embedding, "index": i})
        })
        .collect();
    Ok(json!({
        "id": format!("embd-{}", d.short()),
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
    }))
}

const MODERATION_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// Text containing "flagme" is flagged as violence; everything else is clean.
fn moderations(obj: &Map<String, Value>, d: &Digest32, chat: bool) -> Result<Value, ApiError> {
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("sim-moderation")
        .to_owned();
    let texts: Vec<String> = if chat {
        // One conversation, or a list of conversations.
        match obj.get("input") {
            Some(Value::Array(items)) if items.first().is_some_and(Value::is_array) => items
                .iter()
                .map(|conv| conversation_text(conv.as_array()))
                .collect(),
            Some(Value::Array(items)) if !items.is_empty() => {
                vec![conversation_text(Some(items))]
            }
            _ => return Err(ApiError::missing("input")),
        }
    } else {
        string_inputs(obj.get("input"), "input")?
    };
    let results: Vec<Value> = texts
        .iter()
        .map(|text| {
            let flagged = text.to_lowercase().contains("flagme");
            let mut categories = Map::new();
            let mut scores = Map::new();
            for cat in MODERATION_CATEGORIES {
                let hit = flagged && *cat == "violence";
                categories.insert((*cat).to_owned(), json!(hit));
                scores.insert((*cat).to_owned(), json!(if hit { 0.98 } else { 0.001 }));
            }
            json!({"flagged": flagged, "categories": categories, "category_scores": scores})
        })
        .collect();
    let tokens: u64 = texts.iter().map(|t| token_estimate(t)).sum();
    Ok(json!({
        "id": format!("modr-{}", d.short()),
        "model": model,
        "results": results,
        "usage": usage(tokens, 0),
    }))
}

fn conversation_text(messages: Option<&Vec<Value>>) -> String {
    messages
        .map(|list| {
            list.iter()
                .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// `/v1/models` in a shape both SDKs read.
pub fn model_list() -> Value {
    let data: Vec<Value> = MODELS.iter().map(|m| model_card(m)).collect();
    json!({"object": "list", "data": data})
}

pub fn model_card(id: &str) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "carpool-sim",
        "type": "base",
        "capabilities": {
            "completion_chat": true,
            "completion_fim": id.starts_with("codestral"),
            "function_calling": false,
            "fine_tuning": false,
            "vision": false,
            "classification": false,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chat_body(text: &str) -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": text}]})
    }

    #[test]
    fn same_body_gives_the_same_answer_whatever_the_key_order() {
        let a = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let b = json!({"messages": [{"content": "hi", "role": "user"}], "model": "m"});
        assert_eq!(
            expected_response("/v1/chat/completions", &a),
            expected_response("/v1/chat/completions", &b)
        );
    }

    #[test]
    fn different_bodies_give_different_answers() {
        let a = expected_response("/v1/chat/completions", &chat_body("one"));
        let b = expected_response("/v1/chat/completions", &chat_body("two"));
        assert_ne!(a["id"], b["id"]);
        assert_ne!(
            a["choices"][0]["message"]["content"],
            b["choices"][0]["message"]["content"]
        );
        assert!(a["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .ends_with("one"));
    }

    #[test]
    fn stream_flag_does_not_change_the_answer() {
        let mut body = chat_body("same");
        let plain = expected_response("/v1/chat/completions", &body);
        body["stream"] = json!(true);
        assert_eq!(plain, expected_response("/v1/chat/completions", &body));
    }

    #[test]
    fn stream_events_concatenate_to_the_plain_content() {
        let body = chat_body("a fairly long question about streams");
        let plain = expected_response("/v1/chat/completions", &body);
        let events = chat_stream_events(&body, 5).unwrap();
        assert_eq!(events.len(), 6);
        let joined: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            joined,
            plain["choices"][0]["message"]["content"].as_str().unwrap()
        );
        assert_eq!(events[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[5]["usage"], plain["usage"]);
    }

    #[test]
    fn usage_grows_with_text_length() {
        let short = expected_response("/v1/chat/completions", &chat_body("hi"));
        let long = expected_response("/v1/chat/completions", &chat_body(&"word ".repeat(200)));
        assert!(long["usage"]["prompt_tokens"].as_u64() > short["usage"]["prompt_tokens"].as_u64());
        assert!(long["usage"]["prompt_tokens"].as_u64().unwrap() >= 250);
    }

    #[test]
    fn missing_model_is_a_400_envelope() {
        let err = respond("/v1/chat/completions", &json!({"messages": []})).unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(err.envelope()["error"]["param"], "model");
    }

    #[test]
    fn base64_embeddings_decode_to_the_float_vector() {
        let floats = respond("/v1/embeddings", &json!({"model": "e", "input": "x"})).unwrap();
        let b64 = respond(
            "/v1/embeddings",
            &json!({"model": "e", "input": "x", "encoding_format": "base64"}),
        )
        .unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f64> = bytes
            .chunks(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        let direct: Vec<f64> = floats["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(decoded, direct);
    }
}
