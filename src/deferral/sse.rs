//! A finished chat completion re-emitted as the stream the caller asked for:
//! `chat.completion.chunk` events then `data: [DONE]` (SPEC section 1). Pure.

use bytes::Bytes;
use serde_json::{json, Map, Value};

/// The SSE comment sent while a streamed wait-mode call is held, so load
/// balancers do not cut an idle connection.
pub const KEEP_ALIVE: &[u8] = b": carpool keep-alive\n\n";

/// Pieces each message's content is cut into, at most.
const MAX_PIECES: usize = 8;

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The events that replay an upstream answer as a stream.
///
/// A successful completion becomes a role chunk, content chunks, a final
/// chunk with `finish_reason` and usage, then `[DONE]`. Any other answer
/// (an error status, or a body that is not a completion) becomes one
/// `data: {"error":…}` event, which the SDKs raise as an API error.
pub fn replay(status: u16, body: &[u8]) -> Vec<Bytes> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let completion = parsed
        .as_ref()
        .filter(|_| (200..300).contains(&status))
        .filter(|v| v.get("choices").is_some_and(Value::is_array));
    let Some(completion) = completion else {
        let error = parsed
            .as_ref()
            .and_then(|v| v.get("error").cloned())
            .unwrap_or_else(|| json!({"message": format!("upstream answered {status}"), "type": "upstream_error", "code": status}));
        return vec![
            event(&json!({ "error": error })),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ];
    };

    let base = |choices: Value| {
        let mut chunk = Map::new();
        for key in [
            "id",
            "created",
            "model",
            "system_fingerprint",
            "service_tier",
        ] {
            if let Some(v) = completion.get(key) {
                chunk.insert(key.to_owned(), v.clone());
            }
        }
        chunk.insert("object".to_owned(), json!("chat.completion.chunk"));
        chunk.insert("choices".to_owned(), choices);
        Value::Object(chunk)
    };

    let mut events = Vec::new();
    let choices = completion
        .get("choices")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (pos, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(pos));
        let message = choice.get("message").cloned().unwrap_or(Value::Null);
        let role = message.get("role").cloned().unwrap_or(json!("assistant"));
        events.push(event(&base(json!([{ "index": index, "delta": { "role": role, "content": "" }, "finish_reason": null }]))));
        if let Some(text) = message.get("content").and_then(Value::as_str) {
            for piece in split_text(text) {
                events.push(event(&base(json!([{ "index": index, "delta": { "content": piece }, "finish_reason": null }]))));
            }
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            let indexed: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let mut call = call.clone();
                    if let Some(obj) = call.as_object_mut() {
                        obj.entry("index").or_insert(json!(i));
                    }
                    call
                })
                .collect();
            events.push(event(&base(json!([{ "index": index, "delta": { "tool_calls": indexed }, "finish_reason": null }]))));
        }
        let finish = choice
            .get("finish_reason")
            .cloned()
            .unwrap_or(json!("stop"));
        events.push(event(&base(
            json!([{ "index": index, "delta": {}, "finish_reason": finish }]),
        )));
    }
    if let Some(usage) = completion.get("usage") {
        let mut last = base(json!([]));
        if let Some(obj) = last.as_object_mut() {
            obj.insert("usage".to_owned(), usage.clone());
        }
        events.push(event(&last));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// Cuts text into at most [`MAX_PIECES`] pieces on character boundaries.
pub(super) fn split_text(text: &str) -> Vec<&str> {
    if text.is_empty() {
        return Vec::new();
    }
    let chars = text.chars().count();
    let per = chars.div_ceil(MAX_PIECES).max(1);
    let mut pieces = Vec::new();
    let mut start = 0;
    for (n, (at, _)) in text.char_indices().enumerate() {
        if n > 0 && n % per == 0 {
            pieces.push(&text[start..at]);
            start = at;
        }
    }
    pieces.push(&text[start..]);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(events: &[Bytes]) -> Vec<Value> {
        events
            .iter()
            .map(|e| std::str::from_utf8(e).unwrap())
            .filter(|e| !e.contains("[DONE]"))
            .map(|e| serde_json::from_str(e.trim().strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn completion_replays_as_chunks_whose_content_adds_up() {
        let body = json!({
            "id": "c1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, streaming world!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        });
        let events = replay(200, body.to_string().as_bytes());
        assert_eq!(
            events.last().unwrap(),
            &Bytes::from_static(b"data: [DONE]\n\n")
        );
        let chunks = data(&events);
        assert!(chunks.len() >= 4);
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "c1"));
        let text: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"]
                    .get(0)?
                    .get("delta")?
                    .get("content")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "Hello there, streaming world!");
        assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 8);
        assert!(chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop"));
    }

    #[test]
    fn error_answer_replays_as_one_error_event() {
        let events = replay(
            400,
            br#"{"error":{"message":"bad request","type":"invalid_request_error"}}"#,
        );
        let chunks = data(&events);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0]["error"]["message"], "bad request");
    }

    #[test]
    fn split_text_respects_multibyte_boundaries() {
        let text = "héllo wörld ünïcode ✓✓✓";
        assert_eq!(split_text(text).concat(), text);
        assert!(split_text(text).len() <= MAX_PIECES);
    }
}
