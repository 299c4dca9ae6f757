//! Escalation of `POST /v1/classify` results below the threshold: a real `tierd serve` on
//! 127.0.0.1, with small tasks whose MiniLM heads are trained on their label examples at start,
//! escalating to the mock OpenAI and Anthropic provider on 127.0.0.1.
//!
//! Every task escalates to a model of its own name, so each test counts only the mock requests
//! of its model. The tests take turns, because the mock's scripted answers form one queue.
//!
//! Run with `cargo test --release --test classify_escalation`.

mod common;
mod mock_provider;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use mock_provider::{Answer, MockProvider, RecordedRequest, Script};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The mock, with the runtime that serves it for the whole test binary.
static MOCK: OnceLock<(tokio::runtime::Runtime, MockProvider)> = OnceLock::new();
/// Held by each test for its whole run.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Threshold of the tasks. Inputs that repeat a label example get about 0.92 from these
/// heads, and unrelated sentences 0.5 to 0.65.
const THRESHOLD: f64 = 0.8;
/// An input unlike every label example, so the heads are unsure of it.
const UNSURE: &str = "the quarterly report is due on friday";
/// One of the `greeting` label examples.
const SURE: &str = "hello there";

fn mock() -> &'static MockProvider {
    let (_, mock) = MOCK.get_or_init(|| {
        // A runtime cannot be started inside the test's own, so it is built on another thread.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("build the mock's runtime");
            let mock = runtime.block_on(MockProvider::start());
            (runtime, mock)
        })
        .join()
        .expect("start the mock provider")
    });
    mock
}

/// Returns a task of the two labels `greeting` and `farewell` that escalates to
/// `provider/name`, with `extra` lines added to its `[task.escalate]` table.
fn task_table(name: &str, provider: &str, extra: &str) -> String {
    format!(
        r#"
[[task]]
name = "{name}"
description = "Whether a message greets or says goodbye."
threshold = {THRESHOLD}
[[task.label]]
name = "greeting"
description = "The writer says hello."
examples = ["hello there", "good morning to you", "hi, how are you"]
[[task.label]]
name = "farewell"
examples = ["goodbye for now", "see you later", "bye, take care"]
[[task.backend]]
kind = "embedding_head"
encoder = "all-minilm-l6-v2"
[task.escalate]
to = ["{provider}/{name}"]
{extra}
"#
    )
}

/// Returns a `[[provider.model]]` table; `latency_ms` is set when given.
fn model_table_of(id: &str, latency_ms: Option<u64>) -> String {
    let mut table = format!("[[provider.model]]\nid = \"{id}\"\ntier = 1\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n");
    if let Some(ms) = latency_ms {
        table.push_str(&format!("latency_ms = {ms}\n"));
    }
    table
}

fn server() -> &'static Server {
    own_server("classify-escalation", || {
        let base_url = &mock().base_url;
        let openai_models: String = [
            "low", "high", "pii", "restricted", "redact", "unparsable", "retried", "failing", "criteria", "hang",
            "budget",
        ]
        .iter()
        .map(|id| model_table_of(id, None))
        .collect();
        let tasks: String = [
            task_table("low", "mock", ""),
            task_table("high", "mock", ""),
            task_table("pii", "mock", ""),
            task_table("restricted", "mock", ""),
            task_table("redact", "mock", "pii = \"redact\""),
            task_table("unparsable", "mock", ""),
            task_table("retried", "mock", ""),
            task_table("failing", "mock", ""),
            task_table("criteria", "mock", ""),
            task_table("slow", "mock", ""),
            task_table("hang", "mock", ""),
            task_table("budget", "mock", ""),
            task_table("anthropic", "claude", ""),
        ]
        .concat();
        // tierd needs one served model, so the smallest one is loaded.
        format!(
            "builtin_tasks = false\nmodels_dir = \"{models}\"\n\n{model}\n\
             [resilience]\nbase_delay_ms = 10\nmax_delay_ms = 50\n\n\
             [[provider]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{base_url}\"\n{openai_models}\
             {slow}\n\
             [[provider]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{base_url}\"\n{anthropic}\n{tasks}",
            models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").display(),
            model = model_table(SMOLLM, None),
            slow = model_table_of("slow", Some(60_000)),
            anthropic = model_table_of("anthropic", None),
        )
    })
}

/// POSTs a classify request with `headers` and returns the reply, whatever its status.
async fn classify(task: &str, input: Value, headers: &[(&str, &str)]) -> Reply {
    let mut request = client()
        .post(server().url("/v1/classify"))
        .json(&json!({"task": task, "input": input}));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    read_reply(request.send().await.expect("POST /v1/classify")).await
}

/// Returns the mock's requests for the model `model`.
fn requests_for(model: &str) -> Vec<RecordedRequest> {
    mock()
        .requests()
        .into_iter()
        .filter(|request| request.body["model"] == model)
        .collect()
}

fn answer(text: &str) -> Script {
    Script::Answer(Answer::new(&[text], "stop", 120, 2))
}

fn header(reply: &Reply, name: &str) -> String {
    reply
        .headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_else(|| panic!("no `{name}` header in {:?}", reply.headers))
        .to_string()
}

fn results(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, StatusCode::OK, "body: {}", reply.text);
    reply.json()["results"].as_array().expect("results array").clone()
}

/// Returns the text of every message of a recorded OpenAI request, joined.
fn sent_text(request: &RecordedRequest) -> String {
    request.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|message| message["content"].as_str().expect("string content"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn low_confidence_escalates() {
    let _turn = TURN.lock().await;
    server();
    // The local head picks `greeting` for the unsure input, and the mock answers otherwise.
    mock().push(answer("farewell"));

    let reply = classify("low", json!(UNSURE), &[]).await;
    let results = results(&reply);

    let result = &results[0];
    assert_eq!(result["label"], "farewell", "{result}");
    assert!(result["confidence"].is_null(), "{result}");
    assert_eq!(result["below_threshold"], true, "{result}");
    assert!(result.get("kept_local").is_none(), "{result}");
    let escalation = &result["escalation"];
    assert_eq!(escalation["provider"], "mock", "{result}");
    assert_eq!(escalation["model"], "low", "{result}");
    assert_eq!(escalation["tier"], 1, "{result}");
    assert_eq!(escalation["reason"], "low_confidence", "{result}");
    assert_eq!(escalation["attempts"], 1, "{result}");
    assert_eq!(escalation["redacted"], false, "{result}");
    assert_eq!(escalation["local_label"], "greeting", "{result}");
    let local_confidence = escalation["local_confidence"].as_f64().expect("local_confidence");
    assert!(local_confidence < THRESHOLD, "{result}");
    assert_eq!(escalation["prompt_tokens"], 120, "{result}");
    assert_eq!(escalation["completion_tokens"], 2, "{result}");
    // 120 prompt tokens at 3 USD and 2 completion tokens at 15 USD per million.
    let cost = escalation["cost_usd"].as_f64().expect("cost_usd");
    assert!((cost - 390e-6).abs() < 1e-12, "{result}");
    assert_eq!(header(&reply, "x-tierd-escalated"), "1");
    assert_eq!(header(&reply, "x-tierd-kept-local"), "0");

    let requests = requests_for("low");
    assert_eq!(requests.len(), 1, "{requests:?}");
    let body = &requests[0].body;
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(body["temperature"], 0.0, "{body}");
    // The OpenAI wire format sends the limit as `max_completion_tokens`.
    assert!(body["max_completion_tokens"].as_u64().is_some_and(|tokens| tokens <= 16), "{body}");
    let text = sent_text(&requests[0]);
    assert!(text.contains(UNSURE), "{text}");
    assert!(text.contains("- greeting: The writer says hello."), "{text}");
    assert!(text.contains("- farewell"), "{text}");
}

#[tokio::test]
async fn high_confidence_stays_local() {
    let _turn = TURN.lock().await;
    server();

    let reply = classify("high", json!(SURE), &[]).await;
    let results = results(&reply);

    let result = &results[0];
    assert_eq!(result["label"], "greeting", "{result}");
    let confidence = result["confidence"].as_f64().expect("confidence");
    assert!(confidence >= THRESHOLD, "{result}");
    assert_eq!(result["below_threshold"], false, "{result}");
    assert!(result.get("escalation").is_none(), "{result}");
    assert!(result.get("kept_local").is_none(), "{result}");
    assert_eq!(header(&reply, "x-tierd-escalated"), "0");
    assert_eq!(requests_for("high").len(), 0);
}

#[tokio::test]
async fn personal_data_is_never_sent() {
    let _turn = TURN.lock().await;
    server();
    let inputs = [
        "please write to jane.doe@example.com about the report",
        "call me on 9123 4567 about the report",
        "the report was paid with 4111 1111 1111 1111",
    ];
    // Raising the required confidence to 1 makes every input escalate unless the gate keeps it.
    let reply = classify("pii", json!(inputs), &[("x-tierd-min-confidence", "1")]).await;
    let results = results(&reply);

    assert_eq!(results.len(), inputs.len());
    for (result, input) in results.iter().zip(inputs) {
        assert_eq!(result["kept_local"], "pii", "{input}: {result}");
        assert_eq!(result["below_threshold"], true, "{input}: {result}");
        assert!(result["confidence"].is_number(), "{input}: {result}");
        assert!(result.get("escalation").is_none(), "{input}: {result}");
    }
    assert_eq!(header(&reply, "x-tierd-kept-local"), "3");
    assert_eq!(header(&reply, "x-tierd-escalated"), "0");
    assert_eq!(requests_for("pii").len(), 0);
}

#[tokio::test]
async fn restricted_requests_are_never_sent() {
    let _turn = TURN.lock().await;
    server();

    let by_header = classify("restricted", json!(UNSURE), &[("x-tierd-sensitivity", "restricted")]).await;
    assert_eq!(results(&by_header)[0]["kept_local"], "restricted", "{}", by_header.text);
    assert_eq!(header(&by_header, "x-tierd-kept-local"), "1");

    let body = json!({"task": "restricted", "input": UNSURE, "tierd": {"sensitivity": "restricted"}});
    let by_field = post(server(), "/v1/classify", &body).await;
    assert_eq!(results(&by_field)[0]["kept_local"], "restricted", "{}", by_field.text);

    assert_eq!(requests_for("restricted").len(), 0);
}

#[tokio::test]
async fn redact_policy_sends_placeholders() {
    let _turn = TURN.lock().await;
    server();
    mock().push(answer("greeting"));
    let input = "please write to jane.doe@example.com about the report";

    let reply = classify("redact", json!(input), &[("x-tierd-min-confidence", "1")]).await;
    let results = results(&reply);

    assert_eq!(results[0]["escalation"]["redacted"], true, "{}", reply.text);
    assert_eq!(results[0]["label"], "greeting", "{}", reply.text);
    let requests = requests_for("redact");
    assert_eq!(requests.len(), 1, "{requests:?}");
    let text = sent_text(&requests[0]);
    assert!(text.contains("please write to [EMAIL] about the report"), "{text}");
    assert!(!text.contains("jane.doe"), "{text}");
    assert!(!text.contains("example.com"), "{text}");
}

#[tokio::test]
async fn unparsable_answer_is_an_error() {
    let _turn = TURN.lock().await;
    server();
    mock().push(answer("I think it is a greeting."));

    let reply = classify("unparsable", json!(UNSURE), &[]).await;

    assert_api_error(&reply, StatusCode::BAD_GATEWAY, "upstream_error", None, "provider `mock`");
    let body = reply.json();
    assert_eq!(body["error"]["code"], "invalid_provider_answer", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("I think it is a greeting."), "{message}");
    assert!(message.contains("greeting, farewell"), "{message}");
    assert!(message.contains("input 0"), "{message}");
    assert_eq!(requests_for("unparsable").len(), 1);
}

#[tokio::test]
async fn anthropic_provider_answers() {
    let _turn = TURN.lock().await;
    server();
    mock().push(Script::Answer(Answer::new(&["farewell"], "end_turn", 90, 3)));

    let reply = classify("anthropic", json!(UNSURE), &[]).await;
    let results = results(&reply);

    assert_eq!(results[0]["label"], "farewell", "{}", reply.text);
    assert_eq!(results[0]["escalation"]["provider"], "claude", "{}", reply.text);
    assert_eq!(results[0]["escalation"]["prompt_tokens"], 90, "{}", reply.text);
    let requests = requests_for("anthropic");
    assert_eq!(requests.len(), 1, "{requests:?}");
    let body = &requests[0].body;
    assert_eq!(requests[0].path, "/v1/messages");
    assert!(body["system"].as_str().is_some_and(|system| system.contains("exactly one label name")), "{body}");
    assert!(body["max_tokens"].as_u64().is_some_and(|tokens| tokens <= 16), "{body}");
    let messages = body["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "the system message must not be sent as a message: {body}");
}

#[tokio::test]
async fn server_error_is_retried() {
    let _turn = TURN.lock().await;
    server();
    mock().push(Script::Status {
        status: 500,
        body: r#"{"error":{"message":"scripted 500"}}"#.into(),
        retry_after: None,
    });
    mock().push(answer("greeting"));

    let reply = classify("retried", json!(UNSURE), &[]).await;
    let results = results(&reply);

    assert_eq!(results[0]["label"], "greeting", "{}", reply.text);
    assert_eq!(results[0]["escalation"]["attempts"], 2, "{}", reply.text);
    assert_eq!(requests_for("retried").len(), 2);
}

#[tokio::test]
async fn failed_chain_is_an_error() {
    let _turn = TURN.lock().await;
    server();
    for _ in 0..3 {
        mock().push(Script::Status {
            status: 503,
            body: r#"{"error":{"message":"secret detail from the provider"}}"#.into(),
            retry_after: None,
        });
    }

    let reply = classify("failing", json!(UNSURE), &[]).await;

    assert_api_error(&reply, StatusCode::BAD_GATEWAY, "upstream_error", None, "`mock` (model `failing`)");
    let body = reply.json();
    assert_eq!(body["error"]["code"], "provider_failed", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("HTTP 503 after 3 attempts"), "{message}");
    assert!(!message.contains("secret detail"), "the provider's error body leaked: {message}");
    assert_eq!(requests_for("failing").len(), 3);
}

#[tokio::test]
async fn criteria_keep_results_local() {
    let _turn = TURN.lock().await;
    server();

    let max_tier = classify("criteria", json!(UNSURE), &[("x-tierd-max-tier", "3")]).await;
    assert_eq!(results(&max_tier)[0]["kept_local"], "max_tier", "{}", max_tier.text);

    // The `slow` model's configured latency of 60 s cannot fit in a budget of 500 ms.
    let budget = classify("slow", json!(UNSURE), &[("x-tierd-latency-budget-ms", "500")]).await;
    assert_eq!(results(&budget)[0]["kept_local"], "latency_budget", "{}", budget.text);

    // A minimum confidence of 0 keeps every result, so nothing is below the threshold.
    let body = json!({"task": "criteria", "input": UNSURE, "tierd": {"min_confidence": 0.0}});
    let kept = post(server(), "/v1/classify", &body).await;
    let result = &results(&kept)[0];
    assert_eq!(result["below_threshold"], false, "{result}");
    assert!(result.get("kept_local").is_none(), "{result}");

    assert_eq!(requests_for("criteria").len(), 0);
    assert_eq!(requests_for("slow").len(), 0);
}

#[tokio::test]
async fn invalid_criteria_are_rejected() {
    let _turn = TURN.lock().await;
    server();

    let reply = classify("criteria", json!(UNSURE), &[("x-tierd-sensitivity", "secret")]).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("x-tierd-sensitivity"), "secret");

    let body = json!({"task": "criteria", "input": UNSURE, "tierd": {"max_tier": 7}});
    let reply = post(server(), "/v1/classify", &body).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("tierd.max_tier"), "7");
    assert_eq!(requests_for("criteria").len(), 0);
}

#[tokio::test]
async fn client_disconnect_drops_upstream_request() {
    let _turn = TURN.lock().await;
    server();
    mock().push(Script::HangBeforeHeaders);
    let closed_before = mock().closed_early();

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .expect("build the HTTP client");
    let sent = impatient
        .post(server().url("/v1/classify"))
        .json(&json!({"task": "hang", "input": UNSURE}))
        .send()
        .await;
    assert!(sent.is_err_and(|error| error.is_timeout()), "the request did not time out");

    assert!(
        mock().wait_for_closed(closed_before + 1, Duration::from_secs(10)).await,
        "the upstream request was still open 10 s after the client left"
    );
    assert_eq!(requests_for("hang").len(), 1);
}

#[tokio::test]
async fn spent_budget_cancels_escalation() {
    let _turn = TURN.lock().await;
    server();
    // The `budget` model has no configured latency, so the gate lets the request through.
    mock().push(Script::HangBeforeHeaders);
    let closed_before = mock().closed_early();

    let started = std::time::Instant::now();
    let reply = classify("budget", json!(UNSURE), &[("x-tierd-latency-budget-ms", "1000")]).await;
    let results = results(&reply);

    assert_eq!(results[0]["kept_local"], "latency_budget", "{}", reply.text);
    assert!(results[0]["confidence"].is_number(), "{}", reply.text);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(
        mock().wait_for_closed(closed_before + 1, Duration::from_secs(10)).await,
        "the upstream request was still open after the budget ran out"
    );
    assert_eq!(requests_for("budget").len(), 1);
}
