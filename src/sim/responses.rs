//! OpenAI's Responses API (`POST /v1/responses`): the deterministic answer
//! (also what a `/v1/responses` batch line gets) and, for `stream: true`,
//! the event stream OpenAI sends.
//!
//! The answer's `output` holds a `reasoning` item when the body asks for
//! `reasoning`, a `function_call` of the first function tool when the body
//! has one, and always an assistant `message` with one `output_text` part;
//! `usage` is in Responses form (`input_tokens`, `output_tokens`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::answers::{
    content_text, echo, required_model, respond, split_chars, token_estimate, Digest32,
};
use super::error::ApiError;
use super::state::Sim;
use super::sync_api::{paced_sse, parse_body};

/// The text of `input`: a string, or the user messages of an item list.
fn input_texts(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match obj.get("input") {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => Ok(items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                other => content_text(other.get("content").unwrap_or(&Value::Null)),
            })
            .collect()),
        Some(Value::Array(_)) => Err(ApiError::invalid("`input` must not be empty").param("input")),
        _ => Err(ApiError::missing("input")),
    }
}

/// The text of the last user turn (or the whole input when it is a string).
fn last_user(obj: &Map<String, Value>) -> String {
    match obj.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .rev()
            .find(|i| i.get("role").and_then(Value::as_str) == Some("user"))
            .map(|i| content_text(i.get("content").unwrap_or(&Value::Null)))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

pub(super) fn answer(obj: &Map<String, Value>, d: &Digest32) -> Result<Value, ApiError> {
    let model = required_model(obj)?;
    let texts = input_texts(obj)?;
    let instructions = obj.get("instructions").and_then(Value::as_str);
    let input_tokens: u64 = texts.iter().map(|t| token_estimate(t) + 3).sum::<u64>()
        + instructions.map_or(0, token_estimate);
    let question = echo(&last_user(obj));
    let mut output = Vec::new();
    let mut output_tokens = 0;
    let mut reasoning_tokens = 0;
    if obj.get("reasoning").is_some_and(Value::is_object) {
        let summary = format!("Simulated reasoning {} about: {question}", d.short());
        reasoning_tokens = token_estimate(&summary);
        output.push(json!({
            "id": format!("rs_{}", d.short()),
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": summary}],
        }));
    }
    let function = obj
        .get("tools")
        .and_then(Value::as_array)
        .and_then(|tools| {
            tools
                .iter()
                .find(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        })
        .and_then(|t| t.get("name").and_then(Value::as_str));
    if let Some(name) = function {
        let arguments = json!({ "query": question }).to_string();
        output_tokens += token_estimate(&arguments);
        output.push(json!({
            "id": format!("fc_{}", d.short()),
            "type": "function_call",
            "status": "completed",
            "call_id": format!("call_{}", d.short()),
            "name": name,
            "arguments": arguments,
        }));
    }
    let text = format!("Simulated response {} to: {question}", d.short());
    output_tokens += token_estimate(&text) + reasoning_tokens;
    output.push(json!({
        "id": format!("msg_{}", d.short()),
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }));
    let get = |key: &str, default: Value| obj.get(key).cloned().unwrap_or(default);
    Ok(json!({
        "id": format!("resp_{}", d.short()),
        "object": "response",
        "created_at": d.created(),
        "status": "completed",
        "background": false,
        "completed_at": d.created() + 1,
        "error": null,
        "incomplete_details": null,
        "instructions": get("instructions", Value::Null),
        "max_output_tokens": get("max_output_tokens", Value::Null),
        "metadata": get("metadata", json!({})),
        "model": model,
        "output": output,
        "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
        "previous_response_id": get("previous_response_id", Value::Null),
        "reasoning": get("reasoning", json!({"effort": null, "summary": null})),
        "service_tier": "default",
        "store": get("store", json!(true)),
        "temperature": get("temperature", json!(1.0)),
        "text": get("text", json!({"format": {"type": "text"}})),
        "tool_choice": get("tool_choice", json!("auto")),
        "tools": get("tools", json!([])),
        "top_p": get("top_p", json!(1.0)),
        "truncation": get("truncation", json!("disabled")),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": get("user", Value::Null),
    }))
}

/// The events of a streamed response, without their numbers: the
/// lifecycle events, each item added and done (a message's text in
/// `pieces` deltas, a function call's arguments in one), then
/// `response.completed` with the full answer.
pub fn stream_events(body: &Value, pieces: usize) -> Result<Vec<Value>, ApiError> {
    let answer = respond("/v1/responses", body)?;
    let mut pending = answer.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    pending["completed_at"] = Value::Null;
    let mut events = vec![
        json!({"type": "response.created", "response": pending}),
        json!({"type": "response.in_progress", "response": pending}),
    ];
    let items = answer["output"].as_array().cloned().unwrap_or_default();
    for (i, item) in items.iter().enumerate() {
        let id = item["id"].clone();
        let mut added = item.clone();
        match item["type"].as_str() {
            Some("message") => {
                added["status"] = json!("in_progress");
                added["content"] = json!([]);
                events.push(
                    json!({"type": "response.output_item.added", "output_index": i, "item": added}),
                );
                let part = &item["content"][0];
                let text = part["text"].as_str().unwrap_or_default();
                let at = |kind: &str| json!({"type": kind, "item_id": id, "output_index": i, "content_index": 0});
                let mut e = at("response.content_part.added");
                e["part"] =
                    json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                events.push(e);
                for piece in split_chars(text, pieces.max(1)) {
                    let mut e = at("response.output_text.delta");
                    e["delta"] = json!(piece);
                    e["logprobs"] = json!([]);
                    events.push(e);
                }
                let mut e = at("response.output_text.done");
                e["text"] = json!(text);
                e["logprobs"] = json!([]);
                events.push(e);
                let mut e = at("response.content_part.done");
                e["part"] = part.clone();
                events.push(e);
            }
            Some("function_call") => {
                added["status"] = json!("in_progress");
                added["arguments"] = json!("");
                events.push(
                    json!({"type": "response.output_item.added", "output_index": i, "item": added}),
                );
                events.push(json!({"type": "response.function_call_arguments.delta", "item_id": id, "output_index": i, "delta": item["arguments"]}));
                events.push(json!({"type": "response.function_call_arguments.done", "item_id": id, "output_index": i, "name": item["name"], "arguments": item["arguments"]}));
            }
            _ => events.push(
                json!({"type": "response.output_item.added", "output_index": i, "item": item}),
            ),
        }
        events.push(json!({"type": "response.output_item.done", "output_index": i, "item": item}));
    }
    events.push(json!({"type": "response.completed", "response": answer}));
    Ok(events)
}

/// `POST /v1/responses`: the answer, or with `stream: true` its events as
/// SSE (`event:` and `data:` lines, numbered from 0), paced like chat.
pub async fn handler(State(sim): State<Arc<Sim>>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let mut answer = respond("/v1/responses", &body)?;
        super::sync_api::serve_tier(&sim, &body, &mut answer).await?;
        return Ok(Json(answer).into_response());
    }
    let pieces = sim.opts().stream_chunks;
    let frames = stream_events(&body, pieces)?
        .into_iter()
        .enumerate()
        .map(|(i, mut event)| {
            event["sequence_number"] = json!(i);
            let kind = event["type"].as_str().unwrap_or("message").to_owned();
            format!("event: {kind}\ndata: {event}\n\n")
        })
        .collect();
    Ok(paced_sse(&sim, frames))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_a_response_with_the_items_the_body_asks_for() {
        let plain = respond("/v1/responses", &json!({"model": "m", "input": "hi there"})).unwrap();
        assert_eq!(plain["object"], "response");
        assert_eq!(plain["output"].as_array().unwrap().len(), 1);
        assert!(plain["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with("hi there"));
        assert!(plain["usage"]["input_tokens"].as_u64().unwrap() > 0);
        let tools = json!({"model": "m", "input": [{"role": "user", "content": "x"}],
            "reasoning": {"effort": "low"},
            "tools": [{"type": "function", "name": "f", "parameters": {}}]});
        let full = respond("/v1/responses", &tools).unwrap();
        let types: Vec<&str> = full["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["reasoning", "function_call", "message"]);
        assert!(respond("/v1/responses", &json!({"model": "m"})).is_err());
    }

    #[test]
    fn stream_events_deltas_make_the_text_and_end_with_the_answer() {
        let body = json!({"model": "m", "input": "a question to stream", "stream": true});
        let events = stream_events(&body, 3).unwrap();
        let answer = respond("/v1/responses", &body).unwrap();
        let text: String = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, answer["output"][0]["content"][0]["text"]);
        assert_eq!(events.last().unwrap()["response"], answer);
        assert_eq!(events[0]["type"], "response.created");
    }
}
