//! Helpers for the HTTP tests: a real `tierd serve` process on 127.0.0.1, and requests to it.
//!
//! One server with all three models is shared by every test of a binary. It starts on first
//! use and is killed by an `atexit` hook when the test binary exits, because a `static` is
//! never dropped. A test binary killed by a signal cannot run that hook and leaves the server
//! behind, so each server's pid is printed when it starts.

#![allow(dead_code)]

pub mod postgres;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};

pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
pub const SMOLLM: &str = "smollm2-135m-instruct";
pub const GEMMA: &str = "gemma3-270m";

/// Context window configured for Gemma 3 on the shared server, small enough that a
/// `context_length_exceeded` prompt is cheap to build and tokenize.
pub const GEMMA_CONTEXT: usize = 256;

/// Requests that may wait per model on the shared server. The concurrency test sends four
/// requests at once to one model, and all four must fit even before the worker takes the
/// first one off the queue.
pub const QUEUE_CAPACITY: usize = 4;

/// Body limit of the shared server, in bytes.
pub const MAX_BODY_BYTES: usize = 65536;

/// Covers loading three models and, on the first start after a fetch, training the built-in
/// sentiment head (about 25 s on 2 cores).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(180);
/// Upper bound for any single HTTP exchange, so a hung server fails the test instead of
/// blocking the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Returns the path of a model's GGUF file under `models/`.
pub fn model_path(id: &str) -> PathBuf {
    let file = match id {
        QWEN => "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        SMOLLM => "SmolLM2-135M-Instruct.Q4_1.gguf",
        GEMMA => "gemma-3-270m-q4_k_m.gguf",
        other => panic!("no model file known for `{other}`"),
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(id).join(file);
    assert!(
        path.is_file(),
        "model file {} is missing; run scripts/fetch-models.sh",
        path.display()
    );
    path
}

/// Returns a `[[model]]` table for the config file.
pub fn model_table(id: &str, context_length: Option<usize>) -> String {
    let mut table = format!(
        "[[model]]\nid = \"{id}\"\npath = \"{}\"\n",
        model_path(id).display()
    );
    if let Some(tokens) = context_length {
        table.push_str(&format!("context_length = {tokens}\n"));
    }
    table
}

/// Returns a `[[provider]]` table named `frontier` that sends to `mock`, with one tier-1 model
/// `big` priced at $3 and $15 per million input and output tokens.
pub fn frontier_provider(mock: &str) -> String {
    format!(
        r#"[[provider]]
name = "frontier"
kind = "openai"
base_url = "{mock}"
[[provider.model]]
id = "big"
tier = 1
input_per_mtok = 3.0
output_per_mtok = 15.0
"#
    )
}

/// Returns a `greeting` task of two labels, `hello` and `bye`, answered by a MiniLM head, with
/// `threshold` as the text after `threshold = ` (a value, optionally with a comment).
pub fn greeting_task(threshold: &str) -> String {
    format!(
        r#"[[task]]
name = "greeting"
threshold = {threshold}
[[task.label]]
name = "hello"
examples = ["hello there", "good morning to you"]
[[task.label]]
name = "bye"
examples = ["goodbye for now", "see you later"]
[[task.backend]]
kind = "embedding_head"
encoder = "all-minilm-l6-v2"
"#
    )
}

/// A running `tierd serve` process, killed when dropped.
pub struct Server {
    pub base_url: String,
    pub pid: u32,
    /// The audit database, created fresh at each start.
    pub audit_db: PathBuf,
    /// The config file the server reads, which tests of live reloads edit.
    pub config_path: PathBuf,
    child: Mutex<Child>,
    log_path: PathBuf,
}

impl Server {
    /// Writes `config` to a file, starts `tierd serve` on a free port and waits until
    /// `/health` returns 200. Panics with the server's log if it exits or times out first.
    pub fn start(name: &str, config: &str) -> Server {
        Self::try_start(name, config).unwrap_or_else(|message| panic!("{message}"))
    }

    /// Like [`Server::start`], but returns the failure instead of panicking.
    pub fn try_start(name: &str, config: &str) -> Result<Server, String> {
        Self::try_start_with_env(name, config, &[])
    }

    /// Like [`Server::try_start`], with `env` added to the server's environment.
    pub fn try_start_with_env(name: &str, config: &str, env: &[(&str, &str)]) -> Result<Server, String> {
        Self::launch(name, config, env, false)
    }

    /// Like [`Server::start`], but keeps the audit database of an earlier server of the same
    /// name, as a restart in production would.
    pub fn restart_keeping_audit(name: &str, config: &str) -> Server {
        Self::launch(name, config, &[], true).unwrap_or_else(|message| panic!("{message}"))
    }

    fn launch(name: &str, config: &str, env: &[(&str, &str)], keep_audit: bool) -> Result<Server, String> {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-tests").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let config_path = dir.join("config.toml");
        // An earlier run may have left a symbolic link here, which a write would follow.
        let _ = std::fs::remove_file(&config_path);
        std::fs::write(&config_path, config)
            .map_err(|e| format!("write {}: {e}", config_path.display()))?;

        // tierd logs to stdout. Both streams go to one file, which a failure message includes.
        let log_path = dir.join("server.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let log_for_stderr = log.try_clone().map_err(|e| format!("clone the log file handle: {e}"))?;

        let audit_db = dir.join("audit.db");
        if !keep_audit {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(dir.join(format!("audit.db{suffix}")));
            }
        }

        let port = free_port();
        let binary = server_binary()?;
        let child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--audit-db")
            .arg(&audit_db)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .map_err(|e| format!("failed to start {}: {e}", binary.display()))?;
        eprintln!(
            "started tierd `{name}` (pid {}) on 127.0.0.1:{port}; log: {}",
            child.id(),
            log_path.display()
        );

        let server = Server {
            base_url: format!("http://127.0.0.1:{port}"),
            pid: child.id(),
            audit_db,
            config_path,
            child: Mutex::new(child),
            log_path,
        };
        server.wait_until_healthy()?;
        Ok(server)
    }

    fn wait_until_healthy(&self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let exited = self.child().try_wait().map_err(|e| format!("poll the server process: {e}"))?;
            if let Some(status) = exited {
                return Err(format!(
                    "tierd exited with {status} before /health returned 200. Its log:\n{}",
                    self.log()
                ));
            }
            if let Some((200, _)) = self.get_blocking("/health") {
                return Ok(());
            }
            if started.elapsed() > HEALTH_TIMEOUT {
                return Err(format!(
                    "/health did not return 200 within {HEALTH_TIMEOUT:?}. The server log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `GET path` over a plain socket and returns the status and body, or `None` when
    /// the server does not accept the connection. Used before any async runtime is involved.
    pub fn get_blocking(&self, path: &str) -> Option<(u16, String)> {
        let address = self.base_url.trim_start_matches("http://");
        let mut stream = TcpStream::connect(address).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;

        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        Some((status, body.to_string()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Returns the server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit; returns its status.
    pub fn terminate(&self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: `kill` takes plain integers; the child has not been reaped, so the pid is ours.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child().try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Returns whether the process is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Kills the process. `Child::kill` sends no signal once the child has been reaped, so it
    /// cannot hit a process that reused the pid.
    pub fn kill(&self) {
        let _ = self.child().kill();
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Returns the server executable that every server of this test binary runs.
///
/// A cargo build that includes the `tierd` binary replaces `target/<profile>/tierd`, and so
/// does a build in another checkout that shares the target directory. A hard link taken at
/// first use keeps every server of one run on the executable that was there at that moment.
fn server_binary() -> Result<&'static Path, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let snapshot = BINARY.get_or_init(|| {
        let source = Path::new(env!("CARGO_BIN_EXE_tierd"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-tests");
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let snapshot = dir.join("tierd");
        // Unlinking does not affect a server from an earlier run that still runs this file.
        let _ = std::fs::remove_file(&snapshot);
        if std::fs::hard_link(source, &snapshot).is_err() {
            std::fs::copy(source, &snapshot)
                .map_err(|e| format!("copy {} to {}: {e}", source.display(), snapshot.display()))?;
        }
        Ok(snapshot)
    });
    snapshot.as_deref().map_err(Clone::clone)
}

/// Returns a port that was free a moment ago, by binding port 0 and releasing it.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// The shared server, or why it failed to start, so that later tests fail at once instead of
/// each waiting for a server of their own.
static SHARED_SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// Lets timing- and queue-sensitive tests run alone. They take the write side, and every other
/// test takes the read side.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

extern "C" fn kill_shared_server() {
    if let Some(Ok(server)) = SHARED_SERVER.get() {
        // `Child::kill` sends no signal once the child has been reaped, so it cannot hit a
        // process that reused the pid.
        let _ = server.child().kill();
    }
}

fn shared_server() -> &'static Server {
    let started = SHARED_SERVER.get_or_init(|| {
        let config = format!(
            "[server]\nqueue_capacity = {QUEUE_CAPACITY}\nmax_body_bytes = {MAX_BODY_BYTES}\n\
             default_max_tokens = 64\n\n{}\n{}\n{}",
            model_table(QWEN, None),
            model_table(SMOLLM, None),
            model_table(GEMMA, Some(GEMMA_CONTEXT)),
        );
        let server = Server::try_start("shared", &config)?;
        // SAFETY: registers a plain function with no captured state.
        if unsafe { libc::atexit(kill_shared_server) } != 0 {
            return Err("atexit failed, so the server would outlive the tests".into());
        }
        Ok(server)
    });
    match started {
        Ok(server) => server,
        Err(message) => panic!("the shared server failed to start: {message}"),
    }
}

/// The server of [`own_server`], or why it failed to start.
static OWN_SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

extern "C" fn kill_own_server() {
    if let Some(Ok(server)) = OWN_SERVER.get() {
        server.kill();
    }
}

/// Returns the server that this test binary runs with its own configuration, starting it on the
/// first call with the config that `config` returns. An `atexit` hook kills it when the binary
/// exits, as it does the shared server.
pub fn own_server(name: &str, config: impl FnOnce() -> String) -> &'static Server {
    let started = OWN_SERVER.get_or_init(|| {
        let server = Server::try_start(name, &config())?;
        // SAFETY: registers a plain function with no captured state.
        if unsafe { libc::atexit(kill_own_server) } != 0 {
            return Err("atexit failed, so the server would outlive the tests".into());
        }
        Ok(server)
    });
    match started {
        Ok(server) => server,
        Err(message) => panic!("the server `{name}` failed to start: {message}"),
    }
}

/// Returns the shared server, for a test that may run alongside others.
pub fn shared() -> (&'static Server, RwLockReadGuard<'static, ()>) {
    let guard = EXCLUSIVE.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    (shared_server(), guard)
}

/// Returns the shared server, for a test that must be the only one sending requests.
pub fn exclusive() -> (&'static Server, RwLockWriteGuard<'static, ()>) {
    let guard = EXCLUSIVE.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    (shared_server(), guard)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build the HTTP client")
}

/// A response with its body read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    /// Parses the body as JSON, panicking with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text))
    }
}

pub async fn read_reply(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("read the response body");
    Reply { status, headers, text }
}

/// POSTs `body` as JSON to `path` and returns the reply, whatever its status.
pub async fn post(server: &Server, path: &str, body: &Value) -> Reply {
    let response = client()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path} failed: {e}"));
    read_reply(response).await
}

/// POSTs `body` and returns the JSON reply, panicking unless the status is 200.
pub async fn post_ok(server: &Server, path: &str, body: &Value) -> Value {
    let reply = post(server, path, body).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "POST {path} with {body} returned {}: {}",
        reply.status,
        reply.text
    );
    reply.json()
}

pub async fn get(server: &Server, path: &str) -> Reply {
    let response = client()
        .get(server.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
    read_reply(response).await
}

/// Builds a greedy chat request with one user message.
pub fn chat_request(model: &str, prompt: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// Builds a greedy legacy completion request.
pub fn completion_request(model: &str, prompt: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// Returns `choices[0].message.content` of a chat completion.
pub fn chat_content(response: &Value) -> String {
    response["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no choices[0].message.content in {response}"))
        .to_string()
}

/// Returns `choices[0].text` of a legacy completion.
pub fn completion_text(response: &Value) -> String {
    response["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no choices[0].text in {response}"))
        .to_string()
}

pub fn finish_reason(response: &Value) -> String {
    response["choices"][0]["finish_reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no choices[0].finish_reason in {response}"))
        .to_string()
}

pub fn usage_field(response: &Value, field: &str) -> u64 {
    response["usage"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.{field} in {response}"))
}

/// A streamed response: the raw body and the JSON payload of every `data:` event before
/// `[DONE]`.
pub struct Stream {
    pub raw: String,
    pub chunks: Vec<Value>,
}

/// POSTs `body` with `"stream": true` and reads the whole event stream. Panics unless the
/// status is 200 and the content type is `text/event-stream`.
pub async fn post_stream(server: &Server, path: &str, body: &Value) -> Stream {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let reply = post(server, path, &body).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "streamed POST {path} with {body} returned {}: {}",
        reply.status,
        reply.text
    );
    let content_type = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        content_type.starts_with("text/event-stream"),
        "streamed response has Content-Type `{content_type}`, expected text/event-stream"
    );
    let chunks = sse_payloads(&reply.text)
        .into_iter()
        .take_while(|payload| *payload != "[DONE]")
        .map(|payload| {
            serde_json::from_str(payload)
                .unwrap_or_else(|e| panic!("SSE payload is not JSON ({e}): {payload}"))
        })
        .collect();
    Stream {
        raw: reply.text,
        chunks,
    }
}

/// Splits an SSE body into the payloads of its `data:` events, without checking the framing.
pub fn sse_payloads(raw: &str) -> Vec<&str> {
    raw.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").unwrap_or(event))
        .collect()
}

impl Stream {
    /// Concatenates the text of every chunk: `delta.content` for chat, `text` for legacy
    /// completions.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for chunk in &self.chunks {
            let Some(choice) = chunk["choices"].get(0) else {
                continue;
            };
            if let Some(delta) = choice["delta"]["content"].as_str() {
                text.push_str(delta);
            } else if let Some(piece) = choice["text"].as_str() {
                text.push_str(piece);
            }
        }
        text
    }

    /// Returns the `finish_reason` of the one chunk that has it.
    pub fn finish_reason(&self) -> String {
        let reasons: Vec<&str> = self
            .chunks
            .iter()
            .filter_map(|chunk| chunk["choices"].get(0)?["finish_reason"].as_str())
            .collect();
        assert_eq!(reasons.len(), 1, "expected one chunk with a finish_reason, got {reasons:?}");
        reasons[0].to_string()
    }

    /// Returns the `usage` of the last chunk, sent when `stream_options.include_usage` is set.
    pub fn usage(&self) -> &Value {
        let last = self.chunks.last().expect("the stream has no chunks");
        assert!(last["usage"].is_object(), "the last chunk has no usage: {last}");
        &last["usage"]
    }
}

/// Waits until the audit writer has stored the row of request `id` in `db`, and returns it.
pub async fn audit_row(db: &Path, id: &str) -> tierd::audit::AuditRecord {
    for _ in 0..100 {
        if let Ok(store) = tierd::audit::SqliteStore::open(db) {
            if let Ok(Some(record)) = store.record(id) {
                return record;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no audit row for request `{id}` in {}", db.display());
}

/// Checks that `reply` is an OpenAI error object with `status`, `type` and `param`, and a
/// non-empty message that contains `message_part`.
pub fn assert_api_error(
    reply: &Reply,
    status: StatusCode,
    kind: &str,
    param: Option<&str>,
    message_part: &str,
) {
    assert_eq!(reply.status, status, "unexpected status; body: {}", reply.text);
    let body = reply.json();
    let error = &body["error"];
    assert!(error.is_object(), "the body has no `error` object: {body}");
    for field in ["message", "type", "param", "code"] {
        assert!(
            error.get(field).is_some(),
            "the error object lacks `{field}` (OpenAI always sends it, null when unset): {body}"
        );
    }
    assert_eq!(error["type"], kind, "error.type; body: {body}");
    assert_eq!(error["param"], json!(param), "error.param; body: {body}");
    let message = error["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "error.message is empty: {body}");
    assert!(
        message.contains(message_part),
        "error.message does not name `{message_part}`: {message}"
    );
}

/// Checks that the server still serves a normal chat request after an error.
pub async fn assert_still_serves(server: &Server) {
    let response = post(server, "/v1/chat/completions", &chat_request(SMOLLM, "Say hi.", 2)).await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "a normal request failed after the previous one; body: {}\nserver running: {}",
        response.text,
        server.is_running()
    );
}
