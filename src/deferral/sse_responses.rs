//! A finished Responses API answer re-emitted as the stream a
//! `stream: true` caller of `/v1/responses` reads (SPEC section 1): the
//! event sequence OpenAI sends, each event an SSE `event:` line naming its
//! `type` and a `data:` line whose JSON carries `type` and a
//! `sequence_number` counted from 0. Pure.
//!
//! `response.created` and `response.in_progress` (the response with no
//! output yet); per output item `response.output_item.added` then
//! `response.output_item.done` with the item; inside a message, per content
//! part `response.content_part.added`, its text as
//! `response.output_text.delta` pieces (`response.refusal.delta` for a
//! refusal), `response.output_text.done` and `response.content_part.done`;
//! inside a function call, its arguments as
//! `response.function_call_arguments.delta` pieces and `.done`. Other items
//! (reasoning and the rest) are announced and finished whole. Last, the
//! answer exactly as the upstream gave it, in `response.completed` (or
//! `response.incomplete` / `response.failed`, by its `status`).

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::sse::split_text;

/// The events built so far, numbered as they are added.
struct Events {
    next: u64,
    out: Vec<Bytes>,
}

impl Events {
    fn push(&mut self, kind: &str, fields: Value) {
        let mut data = Map::new();
        data.insert("type".to_owned(), json!(kind));
        data.insert("sequence_number".to_owned(), json!(self.next));
        if let Value::Object(fields) = fields {
            data.extend(fields);
        }
        self.next += 1;
        self.out.push(Bytes::from(format!(
            "event: {kind}\ndata: {}\n\n",
            Value::Object(data)
        )));
    }
}

/// The events that replay an upstream answer to `/v1/responses` as a stream.
///
/// Any answer that is not a successful response object (an error status,
/// another body) becomes one `error` event carrying the upstream's error
/// both as OpenAI's streamed error fields and as `error`, which the SDKs
/// raise as an API error.
pub fn replay(status: u16, body: &[u8]) -> Vec<Bytes> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let response = parsed
        .as_ref()
        .filter(|_| (200..300).contains(&status))
        .filter(|v| v.get("output").is_some_and(Value::is_array));
    let mut events = Events {
        next: 0,
        out: Vec::new(),
    };
    let Some(response) = response else {
        let error = parsed
            .as_ref()
            .and_then(|v| v.get("error"))
            .filter(|e| e.is_object())
            .cloned()
            .unwrap_or_else(|| json!({"message": format!("upstream answered {status}"), "type": "upstream_error", "code": status}));
        events.push(
            "error",
            json!({
                "code": error.get("code").cloned().unwrap_or(Value::Null),
                "message": error.get("message").cloned().unwrap_or(Value::Null),
                "param": error.get("param").cloned().unwrap_or(Value::Null),
                "error": error,
            }),
        );
        return events.out;
    };

    let mut pending = response.clone();
    if let Some(obj) = pending.as_object_mut() {
        obj.insert("status".to_owned(), json!("in_progress"));
        obj.insert("output".to_owned(), json!([]));
        obj.insert("usage".to_owned(), Value::Null);
        for key in ["completed_at", "error", "incomplete_details"] {
            if obj.contains_key(key) {
                obj.insert(key.to_owned(), Value::Null);
            }
        }
    }
    events.push("response.created", json!({ "response": pending }));
    events.push("response.in_progress", json!({ "response": pending }));

    let items = response
        .get("output")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (index, item) in items.iter().enumerate() {
        let item_id = item
            .get("id")
            .cloned()
            .unwrap_or_else(|| json!(format!("item_{index}")));
        match item.get("type").and_then(Value::as_str) {
            Some("message") => message(&mut events, index, &item_id, item),
            Some("function_call") => function_call(&mut events, index, &item_id, item),
            _ => {
                events.push(
                    "response.output_item.added",
                    json!({ "output_index": index, "item": item }),
                );
            }
        }
        events.push(
            "response.output_item.done",
            json!({ "output_index": index, "item": item }),
        );
    }

    let last = match response.get("status").and_then(Value::as_str) {
        Some("incomplete") => "response.incomplete",
        Some("failed") => "response.failed",
        _ => "response.completed",
    };
    events.push(last, json!({ "response": response }));
    events.out
}

/// A copy of `item` with `fields` replaced.
fn with(item: &Value, fields: Value) -> Value {
    let mut copy = item.clone();
    if let (Some(obj), Value::Object(fields)) = (copy.as_object_mut(), fields) {
        obj.extend(fields);
    }
    copy
}

fn message(events: &mut Events, index: usize, item_id: &Value, item: &Value) {
    events.push(
        "response.output_item.added",
        json!({
            "output_index": index,
            "item": with(item, json!({"status": "in_progress", "content": []})),
        }),
    );
    let parts = item
        .get("content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (content_index, part) in parts.iter().enumerate() {
        let at = json!({
            "item_id": item_id,
            "output_index": index,
            "content_index": content_index,
        });
        let kind = part.get("type").and_then(Value::as_str);
        let (text_key, delta_event, done_event) = match kind {
            Some("output_text") => (
                "text",
                "response.output_text.delta",
                "response.output_text.done",
            ),
            Some("refusal") => ("refusal", "response.refusal.delta", "response.refusal.done"),
            _ => {
                events.push(
                    "response.content_part.added",
                    with(&at, json!({ "part": part })),
                );
                events.push(
                    "response.content_part.done",
                    with(&at, json!({ "part": part })),
                );
                continue;
            }
        };
        let text = part
            .get(text_key)
            .and_then(Value::as_str)
            .unwrap_or_default();
        let empty = if text_key == "text" {
            with(part, json!({"text": "", "annotations": []}))
        } else {
            with(part, json!({"refusal": ""}))
        };
        events.push(
            "response.content_part.added",
            with(&at, json!({ "part": empty })),
        );
        for piece in split_text(text) {
            let delta = if text_key == "text" {
                json!({"delta": piece, "logprobs": []})
            } else {
                json!({ "delta": piece })
            };
            events.push(delta_event, with(&at, delta));
        }
        let done = if text_key == "text" {
            json!({
                "text": text,
                "logprobs": part.get("logprobs").filter(|l| l.is_array()).cloned().unwrap_or(json!([])),
            })
        } else {
            json!({ "refusal": text })
        };
        events.push(done_event, with(&at, done));
        events.push(
            "response.content_part.done",
            with(&at, json!({ "part": part })),
        );
    }
}

fn function_call(events: &mut Events, index: usize, item_id: &Value, item: &Value) {
    events.push(
        "response.output_item.added",
        json!({
            "output_index": index,
            "item": with(item, json!({"status": "in_progress", "arguments": ""})),
        }),
    );
    let arguments = item
        .get("arguments")
        .and_then(Value::as_str)
        .unwrap_or_default();
    for piece in split_text(arguments) {
        events.push(
            "response.function_call_arguments.delta",
            json!({ "item_id": item_id, "output_index": index, "delta": piece }),
        );
    }
    let mut done = json!({ "item_id": item_id, "output_index": index, "arguments": arguments });
    if let (Some(obj), Some(name)) = (done.as_object_mut(), item.get("name")) {
        obj.insert("name".to_owned(), name.clone());
    }
    events.push("response.function_call_arguments.done", done);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (event name, data) of each event.
    fn parse(events: &[Bytes]) -> Vec<(String, Value)> {
        events
            .iter()
            .map(|e| {
                let text = std::str::from_utf8(e).unwrap();
                assert!(text.ends_with("\n\n"), "{text:?}");
                let mut lines = text.trim_end().lines();
                let name = lines.next().unwrap().strip_prefix("event: ").unwrap();
                let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
                assert!(lines.next().is_none());
                (name.to_owned(), serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    fn response(status: &str) -> Value {
        json!({
            "id": "resp_1", "object": "response", "created_at": 7, "status": status,
            "model": "m", "error": null, "incomplete_details": null,
            "output": [
                {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
                {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "f", "arguments": "{\"city\":\"Lyon and beyond\"}"},
                {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [
                    {"type": "output_text", "text": "Hello there, streaming world of responses!", "annotations": []},
                    {"type": "refusal", "refusal": "no"}
                ]}
            ],
            "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}
        })
    }

    #[test]
    fn a_response_replays_as_numbered_events_that_rebuild_it() {
        let body = response("completed");
        let events = parse(&replay(200, body.to_string().as_bytes()));
        for (n, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], json!(n));
        }
        let types: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(&types[..2], ["response.created", "response.in_progress"]);
        assert_eq!(events[0].1["response"]["output"], json!([]));
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        assert_eq!(events[0].1["response"]["usage"], Value::Null);
        assert_eq!(*types.last().unwrap(), "response.completed");
        assert_eq!(events.last().unwrap().1["response"], body);

        let done: Vec<&Value> = events
            .iter()
            .filter(|(n, _)| n == "response.output_item.done")
            .map(|(_, d)| &d["item"])
            .collect();
        assert_eq!(
            done,
            body["output"]
                .as_array()
                .unwrap()
                .iter()
                .collect::<Vec<_>>()
        );
        let joined = |kind: &str| -> String {
            events
                .iter()
                .filter(|(n, _)| n == kind)
                .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            joined("response.output_text.delta"),
            "Hello there, streaming world of responses!"
        );
        assert_eq!(
            joined("response.function_call_arguments.delta"),
            "{\"city\":\"Lyon and beyond\"}"
        );
        assert_eq!(joined("response.refusal.delta"), "no");
        let added: Vec<&Value> = events
            .iter()
            .filter(|(n, _)| n == "response.output_item.added")
            .map(|(_, d)| &d["item"])
            .collect();
        assert_eq!(added[1]["arguments"], "");
        assert_eq!(added[2]["content"], json!([]));
        let part_added = events
            .iter()
            .find(|(n, _)| n == "response.content_part.added")
            .unwrap();
        assert_eq!(part_added.1["part"]["text"], "");
        assert_eq!(part_added.1["item_id"], "msg_1");
        assert_eq!(part_added.1["output_index"], 2);
    }

    #[test]
    fn the_last_event_follows_the_status() {
        for (status, last) in [
            ("incomplete", "response.incomplete"),
            ("failed", "response.failed"),
        ] {
            let events = parse(&replay(200, response(status).to_string().as_bytes()));
            assert_eq!(events.last().unwrap().0, last);
        }
    }

    #[test]
    fn an_error_answer_replays_as_one_error_event() {
        let events = parse(&replay(
            400,
            br#"{"error":{"message":"bad request","type":"invalid_request_error","param":"input","code":"x"}}"#,
        ));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, "error");
        assert_eq!(events[0].1["message"], "bad request");
        assert_eq!(events[0].1["param"], "input");
        assert_eq!(events[0].1["error"]["message"], "bad request");
        let events = parse(&replay(502, b"not json"));
        assert_eq!(events[0].1["error"]["code"], 502);
    }
}
