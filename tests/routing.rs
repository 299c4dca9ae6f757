//! Chat routing end to end: a real `tierd serve` on 127.0.0.1 with the real qwen2.5-coder
//! model as the local tier, escalating to mock OpenAI and Anthropic providers on 127.0.0.1.
//! Every test counts the requests the mock received, so a request that must stay local is
//! proven not to have left.
//!
//! Run with `cargo test --release --test routing`.

mod common;
mod mock_provider;

use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use mock_provider::{Answer, MockProvider, RecordedRequest, Script};
use reqwest::StatusCode;
use serde_json::{json, Value};

const KEY_VAR: &str = "TIERD_TEST_ROUTING_KEY";
const KEY: &str = "sk-routing-test-5f2e9c1d0b";

/// Texts of the built-in route task's training examples, so the label is not in doubt.
const SIMPLE: &str = "What is the capital of Australia?";
const COMPLEX: &str = "Design a sharded database schema for a payments system with strong consistency and explain the failure modes.";
/// A prompt whose greedy answer has tokens well below probability 1, so a threshold of 1
/// always escalates it.
const OPEN_PROMPT: &str = "Name one animal.";

/// Providers and routes. `mid` (tier 2, OpenAI wire) and `frontier` (tier 1, Anthropic
/// wire) share the mock. `flaky`, `fragile`, `slow` and `patient` are further providers on
/// the same mock, each with its own breaker and budget. Only the breaker test opens a breaker
/// (`flaky`'s), because the other tests fail at most three times in a row. Routes with `threshold = 1.0` escalate every
/// answer, so a test controls the decision with criteria alone.
fn config(mock: &str) -> String {
    format!(
        r#"
[server]
queue_capacity = 8
default_max_tokens = 8

{qwen}

[[model]]
id = "qwen-tight"
path = "{qwen_path}"
context_length = 96

[resilience]
max_attempts = 3
base_delay_ms = 5
max_delay_ms = 100
breaker_failures = 5
breaker_cooldown_ms = 600000

[[provider]]
name = "mid"
kind = "openai"
base_url = "{mock}"
api_key_env = "{KEY_VAR}"
timeouts = {{ first_byte_ms = 1000, total_ms = 1500 }}
[[provider.model]]
id = "mid-model"
upstream = "gpt-mini"
tier = 2
input_per_mtok = 0.15
output_per_mtok = 0.6

[[provider]]
name = "frontier"
kind = "anthropic"
base_url = "{mock}"
default_max_tokens = 100
timeouts = {{ first_byte_ms = 1000, total_ms = 1500 }}
[[provider.model]]
id = "claude"
upstream = "claude-large"
tier = 1
input_per_mtok = 3.0
output_per_mtok = 15.0

[[provider]]
name = "flaky"
kind = "openai"
base_url = "{mock}"
[[provider.model]]
id = "flaky-model"
tier = 1
input_per_mtok = 1.0
output_per_mtok = 1.0

[[provider]]
name = "fragile"
kind = "openai"
base_url = "{mock}"
[[provider.model]]
id = "fragile-model"
tier = 1
input_per_mtok = 1.0
output_per_mtok = 1.0

[[provider]]
name = "slow"
kind = "openai"
base_url = "{mock}"
[[provider.model]]
id = "slow-model"
tier = 1
input_per_mtok = 1.0
output_per_mtok = 1.0
latency_ms = 20000

[[provider]]
name = "patient"
kind = "openai"
base_url = "{mock}"
timeouts = {{ first_byte_ms = 30000, total_ms = 60000 }}
[[provider.model]]
id = "patient-model"
tier = 1
input_per_mtok = 1.0
output_per_mtok = 1.0

[[route]]
name = "auto"
local = "{QWEN}"
tier2 = ["mid/mid-model"]
tier1 = ["frontier/claude"]
threshold = 1.0

[[route]]
name = "pre"
mode = "pre_route"
local = "{QWEN}"
tier2 = ["mid/mid-model"]
tier1 = ["frontier/claude"]

[[route]]
name = "redacting"
local = "{QWEN}"
tier1 = ["frontier/claude"]
threshold = 1.0
pii = "redact"

[[route]]
name = "no-fallback"
local = "{QWEN}"
tier1 = ["fragile/fragile-model"]
threshold = 1.0
local_fallback = false

[[route]]
name = "breaker"
local = "{QWEN}"
tier1 = ["flaky/flaky-model"]
threshold = 1.0

[[route]]
name = "slow"
local = "{QWEN}"
tier1 = ["slow/slow-model"]
threshold = 1.0

[[route]]
name = "tight"
local = "qwen-tight"
tier1 = ["frontier/claude"]
threshold = 0.0

[[route]]
name = "patient"
local = "{QWEN}"
tier1 = ["patient/patient-model"]
threshold = 1.0
"#,
        qwen = model_table(QWEN, None),
        qwen_path = model_path(QWEN).display(),
    )
}

struct Fixture {
    server: Server,
    mock: MockProvider,
}

static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();

/// Tests share one mock and its script queue, so they take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

extern "C" fn kill_server() {
    if let Some(Ok(fixture)) = FIXTURE.get() {
        fixture.server.kill();
    }
}

fn fixture() -> &'static Fixture {
    let started = FIXTURE.get_or_init(|| {
        let mock = MockProvider::start_shared()?;
        let server = Server::try_start_with_env("routing", &config(&mock.base_url), &[(KEY_VAR, KEY)])?;
        // SAFETY: registers a plain function with no captured state.
        if unsafe { libc::atexit(kill_server) } != 0 {
            return Err("atexit failed, so the server would outlive the tests".into());
        }
        Ok(Fixture { server, mock })
    });
    match started {
        Ok(fixture) => fixture,
        Err(message) => panic!("the routing fixture failed to start: {message}"),
    }
}

/// Posts a chat request for `model` with `headers`, and returns the reply.
async fn chat(model: &str, prompt: &str, headers: &[(&str, &str)], extra: Value) -> Reply {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let mut request = client().post(fixture().server.url("/v1/chat/completions")).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("POST /v1/chat/completions");
    read_reply(response).await
}

async fn chat_ok(model: &str, prompt: &str, headers: &[(&str, &str)], extra: Value) -> (Reply, Value) {
    let reply = chat(model, prompt, headers, extra).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let body = reply.json();
    (reply, body)
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no `{name}` header in {:?}", reply.headers))
}

/// Requests the mock received since `before` were recorded.
fn new_requests(before: usize) -> Vec<RecordedRequest> {
    fixture().mock.requests().into_iter().skip(before).collect()
}

fn request_count() -> usize {
    fixture().mock.requests().len()
}

/// Checks a local response: tier 3, served by qwen, with a confidence in headers and body.
fn assert_local(reply: &Reply, body: &Value) {
    assert_eq!(header(reply, "x-tierd-tier"), "3", "{body}");
    assert_eq!(header(reply, "x-tierd-provider"), "local");
    assert_eq!(header(reply, "x-tierd-model"), QWEN);
    assert_eq!(body["model"], QWEN);
    assert_eq!(body["tierd"]["tier"], 3);
    let confidence = body["tierd"]["confidence"].as_f64().expect("a local answer has a confidence");
    assert!((0.0..=1.0).contains(&confidence), "{confidence}");
    let header_confidence: f64 = header(reply, "x-tierd-confidence").parse().expect("confidence header");
    assert!((header_confidence - confidence).abs() < 1e-4);
    assert!(!chat_content(body).is_empty() || finish_reason(body) == "length", "{body}");
}

#[tokio::test]
async fn confident_local_completion_stays_local() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[("x-tierd-min-confidence", "0")], json!({})).await;
    assert_local(&reply, &body);
    assert_eq!(body["tierd"]["route"], "auto");
    assert_eq!(body["tierd"]["threshold"], 0.0);
    assert!(body["tierd"]["escalation"].is_null(), "{body}");
    assert!(reply.headers.get("x-tierd-escalation").is_none());
    assert_eq!(request_count(), before, "a kept local answer must not call a provider");
}

#[tokio::test]
async fn low_confidence_answer_escalates_to_the_mid_tier() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[], json!({})).await;

    assert_eq!(header(&reply, "x-tierd-tier"), "2", "{body}");
    assert_eq!(header(&reply, "x-tierd-provider"), "mid");
    assert_eq!(header(&reply, "x-tierd-model"), "mid-model");
    assert_eq!(header(&reply, "x-tierd-escalation"), "low_confidence");
    assert_eq!(chat_content(&body), "Hello, world");
    assert_eq!(body["model"], "mid-model");
    assert_eq!(body["usage"]["prompt_tokens"], 10);
    let served = &body["tierd"];
    assert_eq!(served["escalation"], "low_confidence");
    assert_eq!(served["attempts"], 1);
    assert!(served["confidence"].is_null());
    assert!(served["local_confidence"].as_f64().is_some_and(|c| c < 1.0), "{body}");

    let sent = new_requests(before);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].path, "/v1/chat/completions");
    assert_eq!(sent[0].body["model"], "gpt-mini");
    // The client set no limit, so none is sent and the provider's own default applies.
    assert!(sent[0].body.get("max_completion_tokens").is_none(), "{:?}", sent[0].body);
    assert!(sent[0].body.get("max_tokens").is_none(), "{:?}", sent[0].body);
    assert_eq!(sent[0].body["messages"][0]["content"], OPEN_PROMPT);
    assert_eq!(sent[0].headers.get("authorization").map(String::as_str), Some(format!("Bearer {KEY}").as_str()));
    assert!(!fixture().server.log().contains(KEY), "the API key appears in the server log");
}

#[tokio::test]
async fn pre_routing_sends_complex_requests_to_the_frontier() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let system = json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": COMPLEX},
    ], "stop": ["END"], "max_tokens": 50});
    let (reply, body) = chat_ok("pre", COMPLEX, &[], system).await;

    assert_eq!(header(&reply, "x-tierd-tier"), "1", "{body}");
    assert_eq!(header(&reply, "x-tierd-provider"), "frontier");
    assert_eq!(header(&reply, "x-tierd-escalation"), "pre_route");
    assert_eq!(body["tierd"]["route_label"], "complex");
    assert!(body["tierd"]["local_confidence"].is_null(), "no local answer was generated: {body}");
    assert_eq!(chat_content(&body), "Hello, world");
    assert_eq!(finish_reason(&body), "stop");

    // The Anthropic translation: system prompt apart, stop sequences, max_tokens.
    let sent = new_requests(before);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].path, "/v1/messages");
    assert_eq!(sent[0].body["model"], "claude-large");
    assert_eq!(sent[0].body["system"], "You are terse.");
    assert_eq!(sent[0].body["stop_sequences"], json!(["END"]));
    assert_eq!(sent[0].body["max_tokens"], 50);
    assert_eq!(sent[0].body["messages"][0]["role"], "user");
}

#[tokio::test]
async fn pre_routing_answers_simple_requests_locally() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let (reply, body) = chat_ok("pre", SIMPLE, &[], json!({})).await;
    assert_local(&reply, &body);
    assert_eq!(body["tierd"]["route_label"], "simple");
    assert!(body["tierd"]["route_confidence"].as_f64().is_some());
    assert_eq!(request_count(), before);

    // Requiring a confidence the local completion lacks escalates it, in pre-routing too.
    let (reply, body) = chat_ok("pre", SIMPLE, &[("x-tierd-min-confidence", "1")], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-tier"), "2", "{body}");
    assert_eq!(body["tierd"]["escalation"], "low_confidence");
    assert_eq!(request_count(), before + 1);
}

#[tokio::test]
async fn max_tier_caps_the_escalation() {
    let _turn = SERIAL.lock().await;
    let before = request_count();

    // Tier 3 only: the request would escalate, and stays local.
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[("x-tierd-max-tier", "3")], json!({})).await;
    assert_local(&reply, &body);
    assert_eq!(header(&reply, "x-tierd-kept-local"), "max_tier");
    assert_eq!(body["tierd"]["escalation"], "low_confidence");
    assert_eq!(request_count(), before);

    // A frontier request capped at tier 2 goes to the mid-range model.
    let (reply, body) = chat_ok("pre", COMPLEX, &[], json!({"tierd": {"max_tier": 2}})).await;
    assert_eq!(header(&reply, "x-tierd-tier"), "2", "{body}");
    assert_eq!(header(&reply, "x-tierd-provider"), "mid");
    assert_eq!(request_count(), before + 1);
}

#[tokio::test]
async fn restricted_requests_never_leave_the_box() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[("x-tierd-sensitivity", "restricted")], json!({})).await;
    assert_local(&reply, &body);
    assert_eq!(body["tierd"]["kept_local"], "restricted");

    let (reply, body) = chat_ok("pre", COMPLEX, &[], json!({"tierd": {"sensitivity": "restricted"}})).await;
    assert_local(&reply, &body);
    assert_eq!(body["tierd"]["kept_local"], "restricted");
    assert_eq!(body["tierd"]["escalation"], "pre_route");
    assert_eq!(request_count(), before, "a restricted request reached a provider");
}

#[tokio::test]
async fn personal_data_keeps_requests_local() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let texts = [
        format!("{COMPLEX} Send the design to jane.doe＠example.com."),
        format!("{COMPLEX} Send the design to jane.doe@exam\u{200B}ple.com."),
        format!("{COMPLEX} Bill card ４１１１ １１１１ １１１１ １１１１."),
        format!("{COMPLEX} Send the design to jane.doe@example.com."),
        format!("{COMPLEX} Call me on +852 9123 4567."),
        format!("{COMPLEX} Bill card 4111 1111 1111 1111."),
        format!("{COMPLEX} My HKID is A123456(3)."),
        format!("{COMPLEX} Pay into GB82 WEST 1234 5698 7654 32."),
    ];
    for text in &texts {
        let (reply, body) = chat_ok("pre", text, &[], json!({})).await;
        assert_local(&reply, &body);
        assert_eq!(header(&reply, "x-tierd-kept-local"), "pii", "{text}: {body}");
        assert!(body["tierd"]["pii"].as_array().is_some_and(|kinds| !kinds.is_empty()), "{body}");
    }

    // Stop sequences reach providers too, so they are scanned as well.
    let (reply, _) = chat_ok("pre", COMPLEX, &[], json!({"stop": ["jane.doe@example.com"]})).await;
    assert_eq!(header(&reply, "x-tierd-kept-local"), "pii");
    assert_eq!(request_count(), before, "a request with personal data reached a provider");
}

#[tokio::test]
async fn redacting_route_sends_placeholders() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let prompt = "Write to jane.doe@example.com and to +852 9123 4567 about the delay.";
    let (reply, body) = chat_ok("redacting", prompt, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-tier"), "1", "{body}");
    assert_eq!(body["tierd"]["redacted"], true);

    let sent = new_requests(before);
    assert_eq!(sent.len(), 1);
    let text = sent[0].body["messages"][0]["content"].as_str().expect("content").to_string();
    assert!(!text.contains("jane.doe@example.com"), "{text}");
    assert!(!text.contains("9123"), "{text}");
    assert!(text.contains("about the delay"), "{text}");
}

#[tokio::test]
async fn latency_budget_keeps_slow_providers_out() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    // `slow-model` is expected to take 20 s.
    let (reply, body) = chat_ok("slow", OPEN_PROMPT, &[("x-tierd-latency-budget-ms", "5000")], json!({})).await;
    assert_local(&reply, &body);
    assert_eq!(body["tierd"]["kept_local"], "latency_budget");
    assert_eq!(request_count(), before);

    let (reply, _) = chat_ok("slow", OPEN_PROMPT, &[("x-tierd-latency-budget-ms", "120000")], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "slow");
    assert_eq!(request_count(), before + 1);
}

#[tokio::test]
async fn rate_limit_is_retried_at_the_same_provider() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    fixture().mock.push(Script::Status {
        status: 429,
        body: r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#.into(),
        retry_after: Some("0".into()),
    });
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "mid", "{body}");
    assert_eq!(body["tierd"]["attempts"], 2);
    assert_eq!(request_count(), before + 2);
}

#[tokio::test]
async fn server_errors_fall_back_to_the_next_tier() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    for _ in 0..3 {
        fixture().mock.push(Script::Status {
            status: 500,
            body: "internal".into(),
            retry_after: None,
        });
    }
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "frontier", "{body}");
    assert_eq!(header(&reply, "x-tierd-tier"), "1");
    let failed = body["tierd"]["failed"].as_array().expect("failed providers");
    assert!(failed[0].as_str().is_some_and(|f| f.contains("mid") && f.contains("3 attempts")), "{body}");
    let paths: Vec<String> = new_requests(before).into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions", "/v1/messages"]);
}

#[tokio::test]
async fn malformed_body_falls_back_without_retry() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    fixture().mock.push(Script::MalformedBody);
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "frontier", "{body}");
    assert_eq!(request_count(), before + 2);
}

#[tokio::test]
async fn hanging_provider_times_out_and_is_retried() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    fixture().mock.push(Script::HangBeforeHeaders);
    let (reply, body) = chat_ok("auto", OPEN_PROMPT, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "mid", "{body}");
    assert_eq!(body["tierd"]["attempts"], 2);
    assert_eq!(request_count(), before + 2);
}

#[tokio::test]
async fn failed_chain_answers_locally_or_with_502() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let error = Script::Status {
        status: 503,
        body: "unavailable".into(),
        retry_after: None,
    };
    for _ in 0..3 {
        fixture().mock.push(error.clone());
    }
    let reply = chat("no-fallback", OPEN_PROMPT, &[], json!({})).await;
    assert_api_error(&reply, StatusCode::BAD_GATEWAY, "upstream_error", None, "fragile");
    assert_eq!(reply.json()["error"]["code"], "provider_failed");
    assert_eq!(request_count(), before + 3);

    // One success resets the breaker's count of consecutive failures before the next test.
    let (reply, _) = chat_ok("no-fallback", OPEN_PROMPT, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "fragile");
}

#[tokio::test]
async fn open_breaker_skips_the_provider() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    for _ in 0..5 {
        fixture().mock.push(Script::Status {
            status: 500,
            body: "down".into(),
            retry_after: None,
        });
    }
    // Three attempts fail, and the route serves the request locally.
    let (reply, body) = chat_ok("breaker", OPEN_PROMPT, &[], json!({})).await;
    assert_local(&reply, &body);
    assert_eq!(body["tierd"]["kept_local"], "providers_failed");
    assert_eq!(request_count(), before + 3);

    // The fifth consecutive failure opens `flaky`'s breaker, which ends the retries.
    let (reply, body) = chat_ok("breaker", OPEN_PROMPT, &[], json!({})).await;
    assert_local(&reply, &body);
    let failed = body["tierd"]["failed"][0].as_str().unwrap_or_default();
    assert!(failed.contains("after 2 attempts"), "{body}");
    assert_eq!(request_count(), before + 5);

    // The breaker now skips it without a request.
    let (reply, body) = chat_ok("breaker", OPEN_PROMPT, &[], json!({})).await;
    assert_local(&reply, &body);
    let failed = body["tierd"]["failed"][0].as_str().unwrap_or_default();
    assert!(failed.contains("circuit breaker"), "{body}");
    assert_eq!(request_count(), before + 5, "an open breaker let a request through");

    let health = get(&fixture().server, "/health").await.json();
    let flaky = health["providers"]
        .as_array()
        .and_then(|providers| providers.iter().find(|p| p["name"] == "flaky"))
        .unwrap_or_else(|| panic!("no `flaky` in /health: {health}"));
    assert_eq!(flaky["breaker"], "open", "{health}");
}

/// Reads a streamed reply whole, keeping every `data:` payload including errors.
async fn stream_payloads(model: &str, headers: &[(&str, &str)]) -> (Reply, Vec<String>) {
    let reply = chat(model, OPEN_PROMPT, headers, json!({"stream": true, "stream_options": {"include_usage": true}})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let payloads = sse_payloads(&reply.text).into_iter().map(str::to_string).collect();
    (reply, payloads)
}

#[tokio::test]
async fn escalated_stream_relays_the_provider_stream() {
    let _turn = SERIAL.lock().await;
    let (reply, payloads) = stream_payloads("auto", &[]).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "mid");
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"), "{payloads:?}");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk JSON"))
        .collect();
    assert_eq!(chunks[0]["tierd"]["provider"], "mid");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello, world");
    assert_eq!(chunks.last().expect("usage chunk")["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn anthropic_stream_is_relayed_as_chat_chunks() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let body = json!({"stream": true, "stream_options": {"include_usage": true}});
    let reply = chat("pre", COMPLEX, &[], body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(header(&reply, "x-tierd-provider"), "frontier");
    let payloads = sse_payloads(&reply.text);
    assert_eq!(payloads.last().copied(), Some("[DONE]"), "{payloads:?}");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk JSON"))
        .collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello, world");
    // Anthropic's `end_turn` becomes OpenAI's `stop`.
    let finish: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finish, ["stop"]);
    assert_eq!(chunks.last().expect("usage chunk")["usage"]["completion_tokens"], 2);

    let sent = new_requests(before);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/messages");
    assert_eq!(sent[0].body["stream"], true);
    // Anthropic requires a limit: the provider's `default_max_tokens`, not the server's.
    assert_eq!(sent[0].body["max_tokens"], 100);
}

#[tokio::test]
async fn legacy_completions_report_the_local_tier() {
    let _turn = SERIAL.lock().await;
    let reply = post(&fixture().server, "/v1/completions", &completion_request(QWEN, "Once upon a time", 4)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(header(&reply, "x-tierd-tier"), "3");
    assert_eq!(header(&reply, "x-tierd-provider"), "local");
    assert_eq!(header(&reply, "x-tierd-model"), QWEN);
}

#[tokio::test]
async fn local_stream_replays_the_local_answer() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    let (reply, payloads) = stream_payloads("auto", &[("x-tierd-min-confidence", "0")]).await;
    assert_eq!(header(&reply, "x-tierd-tier"), "3");
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&payloads[0]).expect("chunk JSON");
    assert_eq!(first["tierd"]["provider"], "local");
    assert!(first["tierd"]["confidence"].as_f64().is_some());
    assert_eq!(request_count(), before);
}

#[tokio::test]
async fn cut_stream_ends_with_error() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    fixture().mock.push(Script::CutAfter { chunks: 1 });
    let (_, payloads) = stream_payloads("auto", &[]).await;
    assert_ne!(payloads.last().map(String::as_str), Some("[DONE]"), "a cut stream ended cleanly: {payloads:?}");
    let last: Value = serde_json::from_str(payloads.last().expect("payloads")).expect("error JSON");
    assert_eq!(last["error"]["code"], "upstream_stream_failed", "{last}");
    // The stream had started, so it was neither retried nor sent elsewhere.
    assert_eq!(request_count(), before + 1);

    fixture().mock.push(Script::StallAfter { chunks: 1 });
    let (_, payloads) = stream_payloads("auto", &[]).await;
    let last: Value = serde_json::from_str(payloads.last().expect("payloads")).expect("error JSON");
    assert_eq!(last["error"]["code"], "upstream_stream_failed", "{last}");
    assert!(last["error"]["message"].as_str().is_some_and(|m| m.contains("mid")), "{last}");
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let _turn = SERIAL.lock().await;
    let mock = &fixture().mock;
    let before = request_count();
    let closed_before = mock.closed_early();
    mock.push(Script::HangBeforeHeaders);
    let body = json!({"model": "patient", "messages": [{"role": "user", "content": OPEN_PROMPT}], "temperature": 0});
    let url = fixture().server.url("/v1/chat/completions");
    let request = client().post(url).json(&body).send();
    // The local completion takes well under this. Then the provider hangs until the client leaves.
    let outcome = tokio::time::timeout(Duration::from_secs(8), request).await;
    assert!(outcome.is_err(), "the request finished although the provider hangs");
    assert_eq!(request_count(), before + 1);
    assert!(
        mock.wait_for_closed(closed_before + 1, Duration::from_secs(5)).await,
        "the upstream request stayed open after the client left"
    );
}

#[tokio::test]
async fn client_leaving_a_stream_cancels_the_upstream_stream() {
    let _turn = SERIAL.lock().await;
    let mock = &fixture().mock;
    let closed_before = mock.closed_early();
    mock.push(Script::StallAfter { chunks: 1 });
    let body = json!({
        "model": "patient",
        "messages": [{"role": "user", "content": OPEN_PROMPT}],
        "temperature": 0,
        "stream": true,
    });
    let mut response = client()
        .post(fixture().server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("POST a routed stream");
    assert_eq!(response.status(), StatusCode::OK);
    // Read until the relayed delta arrives, then leave while the provider stalls.
    let mut received = String::new();
    while !received.contains("one ") {
        let chunk = tokio::time::timeout(Duration::from_secs(20), response.chunk())
            .await
            .expect("the first delta arrives")
            .expect("read the stream")
            .expect("the stream is open");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    assert!(
        mock.wait_for_closed(closed_before + 1, Duration::from_secs(5)).await,
        "the upstream stream stayed open after the client left"
    );
}

#[tokio::test]
async fn prompt_too_long_for_the_local_model_escalates() {
    let _turn = SERIAL.lock().await;
    let before = request_count();
    // About 200 tokens, over the 96-token context of `qwen-tight`.
    let long = "Please summarise the following meeting notes carefully. ".repeat(25);
    let (reply, body) = chat_ok("tight", &long, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-provider"), "frontier", "{body}");
    assert_eq!(header(&reply, "x-tierd-escalation"), "local_unavailable");
    assert_eq!(request_count(), before + 1);

    // When it may not leave the box, the local model's own error is returned.
    let reply = chat("tight", &long, &[("x-tierd-sensitivity", "restricted")], json!({})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert_eq!(reply.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(request_count(), before + 1);
}

#[tokio::test]
async fn invalid_criteria_are_rejected_by_name() {
    let _turn = SERIAL.lock().await;
    let reply = chat("auto", OPEN_PROMPT, &[("x-tierd-max-tier", "0")], json!({})).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("x-tierd-max-tier"), "x-tierd-max-tier");
    let reply = chat("auto", OPEN_PROMPT, &[], json!({"tierd": {"sensitivity": "secret"}})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(reply.text.contains("secret"), "{}", reply.text);
    let reply = chat("auto", OPEN_PROMPT, &[("x-tierd-max-tier", "3")], json!({"tierd": {"max_tier": 1}})).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("tierd.max_tier"), "disagree");
}

#[tokio::test]
async fn routes_are_listed_as_models() {
    let _turn = SERIAL.lock().await;
    let reply = get(&fixture().server, "/v1/models").await;
    let ids: Vec<String> = reply.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    for id in [QWEN, "auto", "pre", "redacting"] {
        assert!(ids.iter().any(|i| i == id), "{id} missing from {ids:?}");
    }
    let reply = get(&fixture().server, "/v1/models/auto").await;
    assert_eq!(reply.json()["owned_by"], "tierd-route");
}

#[tokio::test]
async fn direct_model_requests_report_the_local_tier() {
    let _turn = SERIAL.lock().await;
    let (reply, body) = chat_ok(QWEN, OPEN_PROMPT, &[], json!({})).await;
    assert_eq!(header(&reply, "x-tierd-tier"), "3");
    assert_eq!(body["tierd"]["provider"], "local");
    assert!(reply.headers.get("x-tierd-route").is_none());
}

/// Checks that a scripted completion with its own text reaches the client unchanged.
#[tokio::test]
async fn scripted_answer_reaches_the_client() {
    let _turn = SERIAL.lock().await;
    fixture().mock.push(Script::Answer(Answer::new(&["Cats", " purr."], "stop", 12, 3)));
    let (_, body) = chat_ok("auto", OPEN_PROMPT, &[], json!({})).await;
    assert_eq!(chat_content(&body), "Cats purr.");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}
