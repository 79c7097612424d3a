//! A scripted upstream for pass-through tests: echoes calls, answers fixed
//! statuses, streams SSE behind a gate, and can hang. Records every call.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub authorization: Option<String>,
    pub headers: HeaderMap,
    pub body_len: usize,
}

#[derive(Clone)]
struct Shared {
    name: String,
    calls: Arc<Mutex<Vec<Recorded>>>,
    gate: watch::Receiver<bool>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Recorded>>>,
    gate: watch::Sender<bool>,
}

impl Upstream {
    /// Starts an upstream whose answers carry `name` (to check routing).
    pub async fn start(name: &str) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (gate, gate_rx) = watch::channel(true);
        let shared = Shared {
            name: name.to_owned(),
            calls: calls.clone(),
            gate: gate_rx,
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/status/{code}", any(status))
            .route("/hang", any(hang))
            .fallback(echo)
            .with_state(shared);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, calls, gate }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap().clone()
    }

    /// Streams stop after their first event until released.
    pub fn hold_streams(&self) {
        self.gate.send_replace(false);
    }

    pub fn release_streams(&self) {
        self.gate.send_replace(true);
    }
}

fn record(s: &Shared, method: &str, path: String, headers: &HeaderMap, body_len: usize) {
    s.calls.lock().unwrap().push(Recorded {
        method: method.to_owned(),
        path_and_query: path,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        headers: headers.clone(),
        body_len,
    });
}

/// `POST /v1/chat/completions`: a completion naming the upstream, or with
/// `"stream": true` an SSE stream of three chunks, gated after the first.
async fn chat(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    record(
        &s,
        "POST",
        "/v1/chat/completions".into(),
        &headers,
        body.len(),
    );
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = req["model"].as_str().unwrap_or("none").to_owned();
    if req["stream"] == json!(true) {
        let mut gate = s.gate.clone();
        let chunk = move |i: usize, text: &str| {
            let v = json!({"id":"chatcmpl-1","object":"chat.completion.chunk","model":model,
                "choices":[{"index":0,"delta":{"content":text},"finish_reason":null}],"n":i});
            Bytes::from(format!("data: {v}\n\n"))
        };
        let first = chunk(0, "Hel");
        let second = chunk(1, "lo");
        let rest = vec![chunk(2, "!"), Bytes::from_static(b"data: [DONE]\n\n")];
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) })
            .chain(futures_util::stream::once(async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, std::io::Error>(second)
            }))
            .chain(futures_util::stream::iter(rest.into_iter().map(Ok)));
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("x-upstream", s.name.clone())
            .body(Body::from_stream(stream))
            .unwrap();
    }
    (
        [("x-upstream", s.name.clone())],
        Json(json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "upstream": s.name,
            "choices": [{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        })),
    )
        .into_response()
}

/// `ANY /status/{code}`: that status with a provider-style error body.
async fn status(State(s): State<Shared>, Path(code): Path<u16>, req: Request) -> Response {
    record(
        &s,
        req.method().as_str(),
        req.uri().to_string(),
        req.headers(),
        0,
    );
    let status = StatusCode::from_u16(code).unwrap();
    (
        status,
        [
            ("x-upstream", s.name.clone()),
            ("retry-after", "3".to_owned()),
        ],
        format!(
            r#"{{"object":"error","message":"scripted {code}","type":"upstream","code":"{code}"}}"#
        ),
    )
        .into_response()
}

/// `ANY /hang`: never answers.
async fn hang(State(s): State<Shared>, req: Request) -> Response {
    record(
        &s,
        req.method().as_str(),
        req.uri().to_string(),
        req.headers(),
        0,
    );
    std::future::pending::<()>().await;
    StatusCode::OK.into_response()
}

/// Anything else: reads the body as a stream and describes the call.
async fn echo(State(s): State<Shared>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let headers = req.headers().clone();
    let mut stream = req.into_body().into_data_stream();
    let mut len = 0usize;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => len += c.len(),
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    record(&s, &method, path.clone(), &headers, len);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    (
        [("x-upstream", s.name.clone())],
        Json(json!({
            "upstream": s.name,
            "method": method,
            "path": path,
            "body_len": len,
            "content_type": content_type,
        })),
    )
        .into_response()
}
