//! The demo's callers: which calls are sent (a pure plan), and how each opt-in
//! style sends one and waits for its answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The endpoint most demo calls go to.
pub const CHAT: &str = "/v1/chat/completions";

/// OpenAI's Responses API: every other block of OpenAI calls is sent as
/// `client.responses.create` would send it.
pub const RESPONSES: &str = "/v1/responses";

/// Anthropic's Messages API: the Anthropic model's calls, as
/// `client.messages.create` sends them (`x-api-key`, `anthropic-version`).
pub const MESSAGES: &str = "/v1/messages";

/// The three models, one per upstream dialect (routed by the config's globs).
pub const MODELS: [(&str, &str); 3] = [
    ("mistral-small-latest", "mistral"),
    ("gpt-4o-mini", "openai"),
    ("claude-haiku-4-5", "anthropic"),
];

/// Bounds on the pause between two polls of a handle, whatever `Retry-After` says.
const MIN_POLL_PAUSE: Duration = Duration::from_millis(100);
const MAX_POLL_PAUSE: Duration = Duration::from_secs(1);

/// How a call opts into deferral.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Style {
    /// `Carpool-Mode: wait`: the connection is held until the answer.
    Wait,
    /// `Prefer: respond-async`: 202 and a handle, then polling its `/result`.
    PreferAsync,
    /// The `/defer/v1/...` base URL: held, like `wait`.
    DeferPrefix,
    /// `Carpool-Mode: wait` with a `Carpool-Deadline` nearer than any
    /// batch could answer: carpool answers at once by the cheapest
    /// synchronous tier, flex on the OpenAI upstream.
    NearDeadline,
}

impl Style {
    /// The styles [`plan`] cycles through; [`Style::NearDeadline`] calls
    /// come from [`near_deadline_calls`].
    pub const ALL: [Style; 3] = [Style::Wait, Style::PreferAsync, Style::DeferPrefix];

    pub fn label(self) -> &'static str {
        match self {
            Style::Wait => "Carpool-Mode: wait (held)",
            Style::PreferAsync => "Prefer: respond-async, then polled",
            Style::DeferPrefix => "/defer/v1 base URL (held)",
            Style::NearDeadline => "Carpool-Deadline: 3 (too near: flex)",
        }
    }
}

/// One call of the plan.
#[derive(Clone, Debug)]
pub struct Call {
    pub model: &'static str,
    pub style: Style,
    /// [`CHAT`] or [`RESPONSES`].
    pub endpoint: &'static str,
    pub body: Value,
}

/// `requests` calls, alternating the models, each model cycling the styles,
/// so every (model, style) pair gets its share. Bodies are all different.
/// The OpenAI model's calls alternate, one round of every style at a time,
/// between chat completions and Responses API bodies.
pub fn plan(requests: usize) -> Vec<Call> {
    let round = MODELS.len() * Style::ALL.len();
    (0..requests)
        .map(|i| {
            let (model, dialect) = MODELS[i % MODELS.len()];
            let style = Style::ALL[(i / MODELS.len()) % Style::ALL.len()];
            let (endpoint, body) = if dialect == "openai" && (i / round) % 2 == 1 {
                (RESPONSES, responses_body(model, i))
            } else if dialect == "anthropic" {
                (MESSAGES, messages_body(model, i))
            } else {
                (CHAT, chat_body(model, i))
            };
            Call {
                model,
                style,
                endpoint,
                body,
            }
        })
        .collect()
}

/// The deadline of a [`Style::NearDeadline`] call, in seconds: less than
/// the demo config's `expected_turnaround` leaves for a batch, and enough
/// for a flex call (carpool gives flex half of what is left, at least 1 s).
pub const NEAR_DEADLINE_SECS: &str = "3";

/// `n` calls to the OpenAI model whose deadline no batch can meet, each
/// body different from every other call's. Sent first, before any job has
/// taught carpool a shorter turnaround than the configured one.
pub fn near_deadline_calls(n: usize) -> Vec<Call> {
    let model = MODELS
        .iter()
        .find(|(_, dialect)| *dialect == "openai")
        .map_or("gpt-4o-mini", |(m, _)| m);
    (0..n)
        .map(|i| Call {
            model,
            style: Style::NearDeadline,
            endpoint: CHAT,
            body: chat_body(model, 90_000 + i),
        })
        .collect()
}

const TOPICS: [&str; 6] = [
    "a delayed parcel that the tracking page says was delivered",
    "being charged twice for the same monthly subscription",
    "a password reset email that never arrives",
    "an app that crashes when exporting a report to PDF",
    "a request to move a booking to the following week",
    "a discount code that is rejected at checkout",
];

fn chat_body(model: &str, i: usize) -> Value {
    let topic = TOPICS[i % TOPICS.len()];
    json!({
        "model": model,
        "max_tokens": 120,
        "messages": [
            {"role": "system", "content": "You triage customer support tickets. Reply with a category, an urgency from 1 to 5 and a one-sentence summary."},
            {"role": "user", "content": format!("Ticket #{:05}: the customer writes about {topic}. They have contacted us before and would like an answer today.", 10_000 + i)},
        ],
    })
}

/// The same ticket as `client.messages.create(model=…, max_tokens=…,
/// system=…, messages=…)` sends it.
fn messages_body(model: &str, i: usize) -> Value {
    let topic = TOPICS[i % TOPICS.len()];
    json!({
        "model": model,
        "max_tokens": 120,
        "system": "You triage customer support tickets. Reply with a category, an urgency from 1 to 5 and a one-sentence summary.",
        "messages": [
            {"role": "user", "content": format!("Ticket #{:05}: the customer writes about {topic}. They have contacted us before and would like an answer today.", 10_000 + i)},
        ],
    })
}

/// The same ticket as `client.responses.create(model=…, instructions=…,
/// input=…, max_output_tokens=…)` sends it.
fn responses_body(model: &str, i: usize) -> Value {
    let topic = TOPICS[i % TOPICS.len()];
    json!({
        "model": model,
        "max_output_tokens": 120,
        "instructions": "You triage customer support tickets. Reply with a category, an urgency from 1 to 5 and a one-sentence summary.",
        "input": format!("Ticket #{:05}: the customer writes about {topic}. They have contacted us before and would like an answer today.", 10_000 + i),
    })
}

/// A final answer as the caller saw it.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub served_by: Option<String>,
    /// From acceptance (held styles: sending) to the answer.
    pub turnaround: Duration,
}

/// Why a call got no final answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("HTTP error: {0}")]
    Http(#[from] reqwest::Error),
    #[error("expected 202 and a handle, got {status}")]
    NotAccepted { status: u16 },
    #[error("the 202 carried no Location")]
    NoLocation,
    #[error("no answer before the demo's deadline")]
    Deadline,
}

/// What happened to one call.
#[derive(Debug)]
pub struct Outcome {
    pub call: Call,
    /// carpool's request id (`Carpool-Request-Id`), the batch `custom_id`.
    pub request_id: Option<String>,
    pub answer: Result<Answer, CallError>,
}

/// What every call shares: where carpool is, the connection budgets, the
/// deadline, and a counter of answers for the progress line.
pub struct Caller {
    pub client: reqwest::Client,
    pub base_url: String,
    pub credential: String,
    /// Calls sent and not yet answered (a held call keeps its slot).
    pub in_flight: Semaphore,
    /// Handle polls in flight: a budget of their own, so pollers are not
    /// starved while every call slot is held.
    pub polls: Semaphore,
    pub deadline: Instant,
    pub answered: AtomicUsize,
}

impl Caller {
    /// Sends `call` its way and waits for its final answer.
    pub async fn run(&self, call: Call) -> Outcome {
        let (request_id, answer) = match call.style {
            Style::Wait => {
                self.held(&call, call.endpoint, &[("carpool-mode", "wait")])
                    .await
            }
            Style::NearDeadline => {
                let headers = [
                    ("carpool-mode", "wait"),
                    ("carpool-deadline", NEAR_DEADLINE_SECS),
                ];
                self.held(&call, call.endpoint, &headers).await
            }
            Style::DeferPrefix => {
                self.held(&call, &format!("/defer{}", call.endpoint), &[])
                    .await
            }
            Style::PreferAsync => self.asynchronous(&call).await,
        };
        if answer.is_ok() {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        Outcome {
            call,
            request_id,
            answer,
        }
    }

    /// One slot of `budget`, or `None` once the deadline passed.
    async fn slot<'a>(&self, budget: &'a Semaphore) -> Option<tokio::sync::SemaphorePermit<'a>> {
        tokio::time::timeout_at(self.deadline, budget.acquire())
            .await
            .ok()?
            .ok()
    }

    /// A held call: one request, answered when the batch result is back.
    async fn held(
        &self,
        call: &Call,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Option<String>, Result<Answer, CallError>) {
        let Some(_slot) = self.slot(&self.in_flight).await else {
            return (None, Err(CallError::Deadline));
        };
        let started = Instant::now();
        let mut request = self
            .authed(self.client.post(format!("{}{path}", self.base_url)), call)
            .json(&call.body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        match self.send(request).await {
            Ok(response) => {
                let id = header_str(response.headers(), "carpool-request-id");
                (id, answer_of(response, started).await)
            }
            Err(err) => (None, Err(err)),
        }
    }

    /// `Prefer: respond-async`: 202 and a handle at once (the connection is
    /// given back), then `GET …/result` every `Retry-After` until it is final.
    async fn asynchronous(&self, call: &Call) -> (Option<String>, Result<Answer, CallError>) {
        let accepted = {
            let Some(_slot) = self.slot(&self.in_flight).await else {
                return (None, Err(CallError::Deadline));
            };
            let request = self
                .authed(
                    self.client
                        .post(format!("{}{}", self.base_url, call.endpoint)),
                    call,
                )
                .header("prefer", "respond-async")
                .json(&call.body);
            self.send(request).await
        };
        let response = match accepted {
            Ok(r) => r,
            Err(err) => return (None, Err(err)),
        };
        let accepted_at = Instant::now();
        let id = header_str(response.headers(), "carpool-request-id");
        if response.status() != StatusCode::ACCEPTED {
            let status = response.status().as_u16();
            return (id, Err(CallError::NotAccepted { status }));
        }
        let Some(location) = header_str(response.headers(), LOCATION.as_str()) else {
            return (id, Err(CallError::NoLocation));
        };
        let mut pause = poll_pause(response.headers());
        let url = format!("{}{location}/result", self.base_url);
        loop {
            if Instant::now() + pause > self.deadline {
                return (id, Err(CallError::Deadline));
            }
            tokio::time::sleep(pause).await;
            let Some(_slot) = self.slot(&self.polls).await else {
                return (id, Err(CallError::Deadline));
            };
            let polled = self
                .send(self.client.get(&url).bearer_auth(&self.credential))
                .await;
            match polled {
                Ok(r) if r.status() == StatusCode::ACCEPTED => pause = poll_pause(r.headers()),
                Ok(r) => return (id, answer_of(r, accepted_at).await),
                Err(err) => return (id, Err(err)),
            }
        }
    }

    /// The caller's key as its SDK sends it: Anthropic's in `x-api-key`
    /// with a version, the others as a bearer token.
    fn authed(&self, request: reqwest::RequestBuilder, call: &Call) -> reqwest::RequestBuilder {
        if call.endpoint == MESSAGES {
            request
                .header("x-api-key", &self.credential)
                .header("anthropic-version", "2023-06-01")
        } else {
            request.bearer_auth(&self.credential)
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, CallError> {
        match tokio::time::timeout_at(self.deadline, request.send()).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CallError::Deadline),
        }
    }
}

/// Reads a final response: status, `Carpool-Served-By`, and the JSON body
/// (a body that is not JSON is kept as a string, and will not check out).
async fn answer_of(response: reqwest::Response, since: Instant) -> Result<Answer, CallError> {
    let status = response.status().as_u16();
    let served_by = header_str(response.headers(), "carpool-served-by");
    let bytes = response.bytes().await?;
    let turnaround = since.elapsed();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Answer {
        status,
        body,
        served_by,
        turnaround,
    })
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The pause a polite poller takes: `Retry-After` seconds, kept within bounds.
fn poll_pause(headers: &HeaderMap) -> Duration {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(MAX_POLL_PAUSE, Duration::from_secs)
        .clamp(MIN_POLL_PAUSE, MAX_POLL_PAUSE)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn plan_spreads_calls_evenly_over_models_and_styles() {
        let calls = plan(360);
        let mut per_pair = BTreeMap::<(&str, Style), usize>::new();
        for call in &calls {
            *per_pair.entry((call.model, call.style)).or_default() += 1;
            assert_eq!(call.body["model"], call.model);
        }
        assert_eq!(per_pair.len(), 9);
        assert!(per_pair.values().all(|n| *n == 40), "{per_pair:?}");
    }

    #[test]
    fn plan_gives_every_call_a_different_body() {
        let calls = plan(120);
        let bodies: HashSet<String> = calls.iter().map(|c| c.body.to_string()).collect();
        assert_eq!(bodies.len(), 120);
    }

    #[test]
    fn plan_sends_some_openai_calls_as_responses_in_every_style() {
        let calls = plan(60);
        let responses: Vec<&Call> = calls.iter().filter(|c| c.endpoint == RESPONSES).collect();
        assert_eq!(responses.len(), 9);
        assert!(responses
            .iter()
            .all(|c| c.model == "gpt-4o-mini" && c.body.get("input").is_some()));
        let styles: HashSet<Style> = responses.iter().map(|c| c.style).collect();
        assert_eq!(styles.len(), Style::ALL.len());
    }

    #[test]
    fn plan_sends_the_anthropic_model_as_messages_calls() {
        let calls = plan(30);
        assert!(calls
            .iter()
            .filter(|c| c.model == "claude-haiku-4-5")
            .all(|c| c.endpoint == MESSAGES && c.body["max_tokens"] == 120));
        assert!(calls.iter().any(|c| c.endpoint == MESSAGES));
    }

    #[test]
    fn near_deadline_calls_go_to_the_openai_model_with_bodies_of_their_own() {
        let near = near_deadline_calls(4);
        let planned: HashSet<String> = plan(300).iter().map(|c| c.body.to_string()).collect();
        assert_eq!(near.len(), 4);
        for call in &near {
            assert_eq!(call.model, "gpt-4o-mini");
            assert_eq!(call.style, Style::NearDeadline);
            assert!(!planned.contains(&call.body.to_string()));
        }
        let own: HashSet<String> = near.iter().map(|c| c.body.to_string()).collect();
        assert_eq!(own.len(), 4);
    }

    #[test]
    fn poll_pause_follows_retry_after_within_bounds() {
        let mut h = HeaderMap::new();
        assert_eq!(poll_pause(&h), MAX_POLL_PAUSE);
        h.insert(RETRY_AFTER, HeaderValue::from_static("0"));
        assert_eq!(poll_pause(&h), MIN_POLL_PAUSE);
        h.insert(RETRY_AFTER, HeaderValue::from_static("30"));
        assert_eq!(poll_pause(&h), MAX_POLL_PAUSE);
    }
}
