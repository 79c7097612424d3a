//! A finished Message re-emitted as the stream an Anthropic caller asked
//! for (SPEC section 1): `message_start`, per content block
//! `content_block_start` / `content_block_delta`… / `content_block_stop`,
//! `message_delta` (stop reason, output tokens), `message_stop`; what the
//! SDK's `messages.stream()` accumulates back into the same Message. Pure.

use bytes::Bytes;
use serde_json::{json, Value};

use super::sse::split_text;

/// Sent while a streamed wait-mode call is held: Anthropic's own keep-alive,
/// which its SDK skips.
pub const KEEP_ALIVE: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The events that replay an answer as a stream. A successful Message
/// becomes its event sequence; any other answer one `error` event with
/// Anthropic's error body, which the SDK raises as an API error.
pub fn replay(status: u16, body: &[u8]) -> Vec<Bytes> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .filter(|_| (200..300).contains(&status))
        .filter(|v| v.get("type").and_then(Value::as_str) == Some("message"));
    let Some(message) = message else {
        // Anthropic's own error as it is; one of carpool's (OpenAI-shaped)
        // keeps its message, typed by the status.
        let kind = crate::providers::anthropic::error_type_of_status(status);
        let error = match parsed.as_ref() {
            Some(v) if v.get("type").and_then(Value::as_str) == Some("error") => {
                v.get("error").cloned()
            }
            Some(v) => v
                .pointer("/error/message")
                .map(|m| json!({"type": kind, "message": m})),
            None => None,
        }
        .unwrap_or_else(|| json!({"type": kind, "message": format!("upstream answered {status}")}));
        return vec![event("error", &json!({"type": "error", "error": error}))];
    };

    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["stop_sequence"] = Value::Null;
    let mut events = vec![event(
        "message_start",
        &json!({"type": "message_start", "message": start}),
    )];
    let blocks = message
        .get("content")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (index, block) in blocks.iter().enumerate() {
        block_events(index, block, &mut events);
    }
    let output_tokens = message
        .pointer("/usage/output_tokens")
        .cloned()
        .unwrap_or(json!(0));
    events.push(event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {
                "stop_reason": message.get("stop_reason").cloned().unwrap_or(Value::Null),
                "stop_sequence": message.get("stop_sequence").cloned().unwrap_or(Value::Null),
            },
            "usage": {"output_tokens": output_tokens},
        }),
    ));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    events
}

/// One content block: its start (empty of what the deltas carry), deltas,
/// stop. Block types without a delta form start whole.
fn block_events(index: usize, block: &Value, events: &mut Vec<Bytes>) {
    let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
    let delta = |d: Value| {
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": d}),
        )
    };
    let mut start = block.clone();
    let mut deltas = Vec::new();
    match kind {
        "text" => {
            start["text"] = json!("");
            let text = block.get("text").and_then(Value::as_str).unwrap_or("");
            for piece in split_text(text) {
                deltas.push(delta(json!({"type": "text_delta", "text": piece})));
            }
        }
        "thinking" => {
            start["thinking"] = json!("");
            start["signature"] = json!("");
            let text = block.get("thinking").and_then(Value::as_str).unwrap_or("");
            for piece in split_text(text) {
                deltas.push(delta(json!({"type": "thinking_delta", "thinking": piece})));
            }
            if let Some(signature) = block.get("signature").and_then(Value::as_str) {
                deltas.push(delta(
                    json!({"type": "signature_delta", "signature": signature}),
                ));
            }
        }
        "tool_use" | "server_tool_use" => {
            start["input"] = json!({});
            let input = block.get("input").cloned().unwrap_or(json!({}));
            deltas.push(delta(
                json!({"type": "input_json_delta", "partial_json": input.to_string()}),
            ));
        }
        _ => {}
    }
    events.push(event(
        "content_block_start",
        &json!({"type": "content_block_start", "index": index, "content_block": start}),
    ));
    events.extend(deltas);
    events.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": index}),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(events: &[Bytes]) -> Vec<(String, Value)> {
        events
            .iter()
            .map(|e| {
                let text = std::str::from_utf8(e).unwrap();
                let (head, data) = text.trim().split_once('\n').unwrap();
                let name = head.strip_prefix("event: ").unwrap().to_owned();
                let data = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn a_message_replays_as_its_event_sequence() {
        let message = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [
                {"type": "text", "text": "Hello there, streaming world!"},
                {"type": "tool_use", "id": "tu_1", "name": "get", "input": {"q": 1}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 4, "output_tokens": 9},
        });
        let events = parsed(&replay(200, message.to_string().as_bytes()));
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(names.last(), Some(&"message_stop"));
        assert_eq!(names[names.len() - 2], "message_delta");
        let text: String = events
            .iter()
            .filter_map(|(_, d)| d.pointer("/delta/text")?.as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, "Hello there, streaming world!");
        let json: String = events
            .iter()
            .filter_map(|(_, d)| {
                d.pointer("/delta/partial_json")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            json!({"q": 1})
        );
        assert_eq!(events[0].1["message"]["content"], json!([]));
        assert_eq!(
            events[names.len() - 2].1["delta"]["stop_reason"],
            "tool_use"
        );
        assert_eq!(events[names.len() - 2].1["usage"]["output_tokens"], 9);
    }

    #[test]
    fn an_error_replays_as_one_error_event() {
        let body =
            br#"{"type":"error","error":{"type":"not_found_error","message":"no such model"}}"#;
        let events = parsed(&replay(404, body));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, "error");
        assert_eq!(events[0].1["error"]["type"], "not_found_error");
        let events = parsed(&replay(502, b"not json"));
        assert_eq!(events[0].1["error"]["type"], "api_error");
    }
}
