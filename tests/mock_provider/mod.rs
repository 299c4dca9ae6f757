//! A scriptable mock of the OpenAI chat completions and Anthropic messages APIs, listening on
//! 127.0.0.1, that records every request it receives.
//!
//! Each request takes the next queued `Script`, or a default answer when the queue is empty.
//! Routes are `/v1/chat/completions` (OpenAI) and `/v1/messages` (Anthropic), so `base_url`
//! ends in `/v1`. A request whose JSON body sets `"stream": true` gets server-sent events.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use tierd::providers::{ChatStream, ProviderError, StreamEvent};

/// Pause between body chunks, so that each chunk reaches the client as its own read.
const CHUNK_PAUSE: Duration = Duration::from_millis(5);

/// Interval of the SSE comments that a stalled stream sends. Writing them makes the server
/// notice a closed connection and drop the body, which `closed_early` counts.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(50);

/// How long `HangBeforeHeaders` waits before it gives up and responds.
const HANG: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Answer {
    pub deltas: Vec<String>,
    /// Stop reason in the wire format's own vocabulary (`stop` or `end_turn`, ...).
    pub stop_reason: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Leaves usage out of an OpenAI stream, as servers that ignore
    /// `stream_options.include_usage` do.
    pub omit_usage: bool,
}

impl Answer {
    pub fn new(deltas: &[&str], stop_reason: &str, input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            deltas: deltas.iter().map(|delta| delta.to_string()).collect(),
            stop_reason: stop_reason.to_string(),
            input_tokens,
            output_tokens,
            omit_usage: false,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Script {
    /// A complete answer, as JSON or as a stream.
    Answer(Answer),
    /// A status other than 2xx with `body`, and `Retry-After` when given.
    Status {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
    /// Sends no response head for `HANG`.
    HangBeforeHeaders,
    /// Streams `chunks` deltas, then only SSE comments until the client disconnects.
    StallAfter { chunks: usize },
    /// Streams `chunks` deltas, then ends the body without the terminal event.
    CutAfter { chunks: usize },
    /// Answers 200 with a body that is not valid JSON; in a stream, a `data:` line after one delta.
    MalformedBody,
    /// Streams `chunks` deltas, then an error event of type `kind`.
    ErrorEventAfter {
        chunks: usize,
        kind: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub path: String,
    /// Header names in lower case; a repeated header keeps its last value.
    pub headers: BTreeMap<String, String>,
    /// The JSON body, or `Value::Null` when the body is not JSON.
    pub body: Value,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
}

#[derive(Default)]
struct MockState {
    scripts: Mutex<VecDeque<Script>>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Response bodies and pending handlers that were dropped before they finished.
    closed_early: AtomicUsize,
}

pub struct MockProvider {
    pub base_url: String,
    state: Arc<MockState>,
    server: tokio::task::JoinHandle<()>,
}

impl MockProvider {
    pub async fn start() -> Self {
        let state = Arc::new(MockState::default());
        let router = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .with_state(state.clone());

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the mock provider to 127.0.0.1");
        let address = listener.local_addr().expect("mock provider address");
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("mock provider serves");
        });

        Self {
            base_url: format!("http://{address}/v1"),
            state,
            server,
        }
    }

    /// Starts a mock on a runtime of its own that lives as long as the test binary, for a mock
    /// shared by tests that each run on their own runtime.
    pub fn start_shared() -> Result<Self, String> {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        let runtime = RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("build the mock's runtime")
        });
        let handle = runtime.handle().clone();
        std::thread::spawn(move || handle.block_on(Self::start()))
            .join()
            .map_err(|_| "the mock provider failed to start".to_string())
    }

    /// Queues `script` for the next request that finds the queue empty before it.
    pub fn push(&self, script: Script) {
        lock(&self.state.scripts).push_back(script);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// Returns the only recorded request, failing the test if there is not exactly one.
    pub fn single_request(&self) -> RecordedRequest {
        let requests = self.requests();
        assert_eq!(requests.len(), 1, "expected exactly one request, got {requests:?}");
        requests[0].clone()
    }

    /// Returns the number of responses dropped unfinished so far.
    pub fn closed_early(&self) -> usize {
        self.state.closed_early.load(Ordering::SeqCst)
    }

    /// Waits up to `limit` until `count` responses were dropped unfinished, which happens when
    /// the client closes the connection; returns whether that happened in time.
    pub async fn wait_for_closed(&self, count: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.state.closed_early.load(Ordering::SeqCst) >= count {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts a response as closed early when dropped before `finish` is called.
struct CloseGuard {
    state: Arc<MockState>,
    finished: bool,
}

impl CloseGuard {
    fn new(state: &Arc<MockState>) -> Self {
        Self {
            state: state.clone(),
            finished: false,
        }
    }

    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.closed_early.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn openai(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(state, Wire::OpenAi, "/v1/chat/completions", headers, body).await
}

async fn anthropic(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(state, Wire::Anthropic, "/v1/messages", headers, body).await
}

async fn respond(state: Arc<MockState>, wire: Wire, path: &str, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let recorded = RecordedRequest {
        path: path.to_string(),
        headers: headers
            .iter()
            .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect(),
        body: body.clone(),
    };
    lock(&state.requests).push(recorded);

    let script = lock(&state.scripts)
        .pop_front()
        .unwrap_or_else(|| Script::Answer(Answer::new(&["Hello", ", world"], default_stop(wire), 10, 2)));
    let stream = body["stream"] == json!(true);
    let model = format!("{}-20250101", body["model"].as_str().unwrap_or("unknown"));
    let include_usage = body["stream_options"]["include_usage"] == json!(true);

    match script {
        Script::Status {
            status,
            body,
            retry_after,
        } => {
            let mut response = Response::builder()
                .status(StatusCode::from_u16(status).expect("valid scripted status"))
                .header("content-type", "application/json");
            if let Some(retry_after) = retry_after {
                response = response.header("retry-after", retry_after);
            }
            response.body(Body::from(body)).expect("valid mock response")
        }
        Script::HangBeforeHeaders => {
            let mut guard = CloseGuard::new(&state);
            tokio::time::sleep(HANG).await;
            guard.finish();
            json_response("{}".to_string())
        }
        Script::MalformedBody if !stream => json_response("{\"choices\": [".to_string()),
        Script::Answer(answer) if !stream => json_response(complete_body(wire, &model, &answer).to_string()),
        script => {
            let plan = stream_plan(wire, &model, include_usage, script);
            sse_response(state, plan)
        }
    }
}

fn default_stop(wire: Wire) -> &'static str {
    match wire {
        Wire::OpenAi => "stop",
        Wire::Anthropic => "end_turn",
    }
}

fn json_response(body: String) -> Response {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("valid mock response")
}

fn complete_body(wire: Wire, model: &str, answer: &Answer) -> Value {
    let text: String = answer.deltas.concat();
    match wire {
        Wire::OpenAi => json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": answer.stop_reason,
            }],
            "usage": {
                "prompt_tokens": answer.input_tokens,
                "completion_tokens": answer.output_tokens,
                "total_tokens": answer.input_tokens + answer.output_tokens,
            },
        }),
        Wire::Anthropic => json!({
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": answer.stop_reason,
            "stop_sequence": null,
            "usage": {"input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens},
        }),
    }
}

/// Body chunks of a stream and what follows the last one.
struct StreamPlan {
    chunks: Vec<String>,
    stall: bool,
}

/// Events of a stream: preamble, deltas and end, each as the text of its network chunks.
struct WireEvents {
    wire: Wire,
    model: String,
    include_usage: bool,
}

impl WireEvents {
    fn preamble(&self, input_tokens: u64) -> Vec<String> {
        match self.wire {
            Wire::OpenAi => vec![self.openai_chunk(json!({"role": "assistant", "content": ""}), Value::Null)],
            Wire::Anthropic => vec![
                anthropic_event(
                    "message_start",
                    json!({"type": "message_start", "message": {
                        "id": "msg_mock", "type": "message", "role": "assistant", "model": self.model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                    }}),
                ),
                anthropic_event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                ": a comment line\r\n\r\n".to_string(),
                anthropic_event("ping", json!({"type": "ping"})),
            ],
        }
    }

    /// Returns the network chunks of one delta. Anthropic's is split between its `event:` and `data:` lines, so the client
    /// has to join an event across network chunks.
    fn delta(&self, text: &str) -> Vec<String> {
        match self.wire {
            Wire::OpenAi => vec![self.openai_chunk(json!({"content": text}), Value::Null)],
            Wire::Anthropic => {
                let data = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}});
                vec!["event: content_block_delta\r\n".to_string(), format!("data: {data}\r\n\r\n")]
            }
        }
    }

    fn end(&self, answer: &Answer) -> Vec<String> {
        match self.wire {
            Wire::OpenAi => {
                let mut chunks = vec![self.openai_chunk(json!({}), json!(answer.stop_reason))];
                if self.include_usage && !answer.omit_usage {
                    let usage = json!({
                        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": self.model,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": answer.input_tokens,
                            "completion_tokens": answer.output_tokens,
                            "total_tokens": answer.input_tokens + answer.output_tokens,
                        },
                    });
                    chunks.push(format!("data: {usage}\n\n"));
                }
                chunks.push("data: [DONE]\n\n".to_string());
                chunks
            }
            Wire::Anthropic => vec![
                anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
                anthropic_event(
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": answer.stop_reason, "stop_sequence": null},
                           "usage": {"output_tokens": answer.output_tokens}}),
                ),
                anthropic_event("message_stop", json!({"type": "message_stop"})),
            ],
        }
    }

    fn error(&self, kind: &str, message: &str) -> String {
        match self.wire {
            Wire::OpenAi => format!("data: {}\n\n", json!({"error": {"type": kind, "message": message}})),
            Wire::Anthropic => anthropic_event("error", json!({"type": "error", "error": {"type": kind, "message": message}})),
        }
    }

    fn openai_chunk(&self, delta: Value, finish_reason: Value) -> String {
        let mut chunk = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        format!("data: {chunk}\n\n")
    }
}

fn anthropic_event(name: &str, data: Value) -> String {
    format!("event: {name}\r\ndata: {data}\r\n\r\n")
}

fn stream_plan(wire: Wire, model: &str, include_usage: bool, script: Script) -> StreamPlan {
    let events = WireEvents {
        wire,
        model: model.to_string(),
        include_usage,
    };
    let default_answer = Answer::new(&["one ", "two ", "three ", "four"], default_stop(wire), 10, 4);
    let deltas = |answer: &Answer, count: usize| -> Vec<String> {
        answer.deltas.iter().take(count).flat_map(|delta| events.delta(delta)).collect()
    };

    let mut chunks = Vec::new();
    let mut stall = false;
    match script {
        Script::Answer(answer) => {
            chunks.extend(events.preamble(answer.input_tokens));
            chunks.extend(deltas(&answer, usize::MAX));
            chunks.extend(events.end(&answer));
        }
        Script::StallAfter { chunks: count } => {
            chunks.extend(events.preamble(10));
            chunks.extend(deltas(&default_answer, count));
            stall = true;
        }
        Script::CutAfter { chunks: count } => {
            chunks.extend(events.preamble(10));
            chunks.extend(deltas(&default_answer, count));
        }
        Script::MalformedBody => {
            chunks.extend(events.preamble(10));
            chunks.extend(deltas(&default_answer, 1));
            chunks.push("data: {\"choices\": [\n\n".to_string());
        }
        Script::ErrorEventAfter {
            chunks: count,
            kind,
            message,
        } => {
            chunks.extend(events.preamble(10));
            chunks.extend(deltas(&default_answer, count));
            chunks.push(events.error(&kind, &message));
        }
        Script::Status { .. } | Script::HangBeforeHeaders => unreachable!("answered without a stream"),
    }
    StreamPlan { chunks, stall }
}

fn sse_response(state: Arc<MockState>, plan: StreamPlan) -> Response {
    let body = async_stream::stream! {
        let mut guard = CloseGuard::new(&state);
        for chunk in plan.chunks {
            yield Ok::<Bytes, std::convert::Infallible>(Bytes::from(chunk));
            tokio::time::sleep(CHUNK_PAUSE).await;
        }
        if plan.stall {
            loop {
                tokio::time::sleep(KEEPALIVE_INTERVAL).await;
                yield Ok(Bytes::from_static(b": keep-alive\n\n"));
            }
        }
        guard.finish();
    };

    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .expect("valid mock response")
}

/// Collects a stream's items: the events, then the error that ended it, if any.
pub async fn drain(mut stream: ChatStream) -> (Vec<StreamEvent>, Option<ProviderError>) {
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(error) => {
                assert!(stream.next().await.is_none(), "an item followed the error {error:?}");
                return (events, Some(error));
            }
        }
    }
    (events, None)
}
