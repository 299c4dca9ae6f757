//! The audit trail end to end: a real `tierd serve` on 127.0.0.1 with the real qwen model and
//! a mock frontier provider, whose SQLite file is read back row by row, and `tierd report` on
//! that file.
//!
//! Run with `cargo test --release --test audit`.

mod common;
mod mock_provider;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use mock_provider::{Answer, MockProvider, Script};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tierd::audit::{AuditRecord, SqliteStore};

/// Prices of the test config, in USD per million tokens.
const LOCAL_IN: f64 = 0.5;
const LOCAL_OUT: f64 = 1.0;
const FRONTIER_IN: f64 = 3.0;
const FRONTIER_OUT: f64 = 15.0;

/// Returns the config, with `mock` as the frontier provider and `stalling` as a second provider
/// whose streams the cut-stream test scripts.
fn config(mock: &str, stalling: &str) -> String {
    format!(
        r#"
builtin_tasks = false
[server]
default_max_tokens = 8

{qwen}

[pricing]
version = "test-1"
baseline = "frontier/big"
[pricing.local]
"{QWEN}" = {{ input_per_mtok = {LOCAL_IN}, output_per_mtok = {LOCAL_OUT} }}

[[provider]]
name = "frontier"
kind = "openai"
base_url = "{mock}"
[[provider.model]]
id = "big"
tier = 1
input_per_mtok = {FRONTIER_IN}
output_per_mtok = {FRONTIER_OUT}

[[route]]
name = "auto"
local = "{QWEN}"
tier1 = ["frontier/big"]
threshold = 1.0

[[provider]]
name = "stalling"
kind = "openai"
base_url = "{stalling}"
[[provider.model]]
id = "slow"
tier = 1
input_per_mtok = {FRONTIER_IN}
output_per_mtok = {FRONTIER_OUT}

[[route]]
name = "stalling"
local = "{QWEN}"
tier1 = ["stalling/slow"]
threshold = 1.0
"#,
        qwen = model_table(QWEN, None),
    )
}

struct Fixture {
    server: Server,
    _mock: MockProvider,
    stalling: MockProvider,
}

static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();

extern "C" fn kill_server() {
    if let Some(Ok(fixture)) = FIXTURE.get() {
        fixture.server.kill();
    }
}

fn fixture() -> &'static Fixture {
    let started = FIXTURE.get_or_init(|| {
        let mock = MockProvider::start_shared()?;
        let stalling = MockProvider::start_shared()?;
        let server = Server::try_start("audit", &config(&mock.base_url, &stalling.base_url))?;
        // SAFETY: registers a plain function with no captured state.
        if unsafe { libc::atexit(kill_server) } != 0 {
            return Err("atexit failed, so the server would outlive the tests".into());
        }
        Ok(Fixture {
            server,
            _mock: mock,
            stalling,
        })
    });
    match started {
        Ok(fixture) => fixture,
        Err(message) => panic!("the audit fixture failed to start: {message}"),
    }
}

async fn send(server: &Server, id: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut request = client()
        .post(server.url("/v1/chat/completions"))
        .header("x-request-id", id)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    read_reply(request.send().await.expect("POST /v1/chat/completions")).await
}

fn usd(input: u64, output: u64, input_price: f64, output_price: f64) -> f64 {
    (input as f64 * input_price + output as f64 * output_price) / 1_000_000.0
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!((actual - expected).abs() < 1e-12, "{what}: {actual} != {expected}");
}

#[tokio::test]
async fn local_request_row_has_tokens_costs_and_phases() {
    let server = &fixture().server;
    let body = chat_request(QWEN, "Name one colour.", 6);
    let reply = send(server, "audit-local", &[("x-tierd-workflow", "support")], &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let usage = &reply.json()["usage"];
    let input = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    let output = usage["completion_tokens"].as_u64().expect("completion_tokens");

    let record = audit_row(&server.audit_db, "audit-local").await;
    assert_eq!(record.endpoint, "/v1/chat/completions");
    assert_eq!(record.workflow.as_deref(), Some("support"));
    assert_eq!((record.tier, record.provider.as_str(), record.model.as_str()), (3, "local", QWEN));
    assert_eq!((record.input_tokens, record.output_tokens), (input, output));
    assert_close(record.cost_usd, usd(input, output, LOCAL_IN, LOCAL_OUT), "cost");
    assert_close(record.counterfactual_usd, usd(input, output, FRONTIER_IN, FRONTIER_OUT), "counterfactual");
    assert_eq!(record.price_version, "test-1");
    assert_eq!(record.status, 200);
    assert!(record.error.is_none());
    assert!(record.queue_ms.is_some(), "{record:?}");
    assert!(record.prefill_ms.is_some(), "{record:?}");
    assert!(record.decode_ms.is_some(), "{record:?}");
    assert!(record.total_ms > 0.0);
    assert!(record.prompt.is_none(), "the prompt is stored by default");
    assert!(record.completion.is_none(), "the completion is stored by default");
}

#[tokio::test]
async fn escalated_request_row_is_priced_at_the_provider() {
    let server = &fixture().server;
    let mut body = chat_request("auto", "Name one animal.", 6);
    body["user"] = json!("billing");
    let reply = send(server, "audit-escalated", &[], &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["tierd"]["tier"], 1, "{}", reply.text);

    let record = audit_row(&server.audit_db, "audit-escalated").await;
    assert_eq!(record.workflow.as_deref(), Some("billing"));
    assert_eq!(record.route.as_deref(), Some("auto"));
    assert_eq!((record.tier, record.provider.as_str(), record.model.as_str()), (1, "frontier", "big"));
    // The mock reports 10 prompt and 2 completion tokens.
    assert_eq!((record.input_tokens, record.output_tokens), (10, 2));
    assert_close(record.cost_usd, usd(10, 2, FRONTIER_IN, FRONTIER_OUT), "cost");
    assert_close(record.counterfactual_usd, record.cost_usd, "counterfactual");
    assert_eq!(record.escalation.as_deref(), Some("low_confidence"));
    assert!(record.confidence.is_some_and(|c| c < 1.0), "{record:?}");
    assert!(record.upstream_ms.is_some());
}

#[tokio::test]
async fn failed_requests_are_recorded_with_their_error() {
    let server = &fixture().server;
    let reply = send(server, "audit-missing-model", &[], &chat_request("no-such-model", "Hi.", 4)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let record = audit_row(&server.audit_db, "audit-missing-model").await;
    assert_eq!(record.status, 404);
    assert!(record.error.as_deref().is_some_and(|e| e.contains("no-such-model")), "{record:?}");
    assert_eq!((record.tier, record.provider.as_str()), (0, ""), "a rejected request reached no tier");
    assert_eq!((record.input_tokens, record.output_tokens), (0, 0));
    assert_eq!(record.cost_usd, 0.0);

    let reply = send(server, "audit-bad-value", &[], &json!({"model": QWEN, "messages": [], "max_tokens": 4})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let record = audit_row(&server.audit_db, "audit-bad-value").await;
    assert_eq!(record.status, 400);
    assert!(record.error.as_deref().is_some_and(|e| e.contains("messages")), "{record:?}");
}

#[tokio::test]
async fn cut_stream_is_recorded_with_the_tokens_generated() {
    let server = &fixture().server;
    let mut body = chat_request(QWEN, "Count from one to one hundred, one number per line.", 200);
    body["stream"] = json!(true);
    let mut response = client()
        .post(server.url("/v1/chat/completions"))
        .header("x-request-id", "audit-cut")
        .json(&body)
        .send()
        .await
        .expect("POST a stream");
    assert_eq!(response.status(), StatusCode::OK);
    // Wait for a content chunk beyond the role chunk, then leave.
    let mut received = String::new();
    while received.matches("data: ").count() < 3 {
        let chunk = response.chunk().await.expect("read the stream").expect("the stream is open");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);

    let record = audit_row(&server.audit_db, "audit-cut").await;
    assert_eq!(record.status, 499, "{record:?}");
    assert!(record.output_tokens >= 1, "{record:?}");
    assert!(record.output_tokens < 200, "{record:?}");
    assert!(record.input_tokens > 0);
    assert_close(record.cost_usd, usd(record.input_tokens, record.output_tokens, LOCAL_IN, LOCAL_OUT), "cost");
}

#[tokio::test]
async fn cut_provider_stream_is_recorded_with_estimated_tokens() {
    let fixture = fixture();
    let server = &fixture.server;
    fixture.stalling.push(Script::StallAfter { chunks: 2 });
    let mut body = chat_request("stalling", "Count to four.", 6);
    body["stream"] = json!(true);
    let mut response = client()
        .post(server.url("/v1/chat/completions"))
        .header("x-request-id", "audit-cut-provider")
        .json(&body)
        .send()
        .await
        .expect("POST a routed stream");
    assert_eq!(response.status(), StatusCode::OK);
    // Read until both relayed deltas ("one ", "two ") arrive, then leave while the provider
    // stalls.
    let mut received = String::new();
    while !received.contains("two ") {
        let chunk = tokio::time::timeout(Duration::from_secs(60), response.chunk())
            .await
            .expect("the relayed deltas arrive")
            .expect("read the stream")
            .expect("the stream is open");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);

    let record = audit_row(&server.audit_db, "audit-cut-provider").await;
    assert_eq!(record.status, 499, "{record:?}");
    assert_eq!((record.provider.as_str(), record.model.as_str()), ("stalling", "slow"));
    assert!(record.error.as_deref().is_some_and(|e| e.contains("estimates")), "{record:?}");
    // qwen's tokenizer reads "one two " as three tokens; the prompt is the chat template's.
    assert_eq!(record.output_tokens, 3, "{record:?}");
    assert!(record.input_tokens > 5, "{record:?}");
    let cost = usd(record.input_tokens, record.output_tokens, FRONTIER_IN, FRONTIER_OUT);
    assert_close(record.cost_usd, cost, "cost");
}

#[tokio::test]
async fn provider_stream_without_usage_is_counted_locally() {
    let fixture = fixture();
    let server = &fixture.server;
    let mut answer = Answer::new(&["one ", "two ", "three"], "stop", 10, 3);
    answer.omit_usage = true;
    fixture.stalling.push(Script::Answer(answer));
    let mut body = chat_request("stalling", "Count to three.", 6);
    body["stream"] = json!(true);
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .header("x-request-id", "audit-no-usage")
        .json(&body)
        .send()
        .await
        .expect("POST a routed stream");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("read the stream");
    assert!(text.contains("[DONE]"), "{text}");

    let record = audit_row(&server.audit_db, "audit-no-usage").await;
    assert_eq!(record.status, 200, "{record:?}");
    assert_eq!(record.provider, "stalling");
    // qwen's tokenizer reads "one two three" as three tokens, not the local attempt's count.
    assert_eq!(record.output_tokens, 3, "{record:?}");
    assert!(record.input_tokens > 5, "{record:?}");
}

#[tokio::test]
async fn report_totals_match_the_rows() {
    let server = &fixture().server;
    for (index, workflow) in ["alpha", "alpha", "beta"].iter().enumerate() {
        let id = format!("audit-report-{index}");
        let reply = send(server, &id, &[("x-tierd-workflow", workflow)], &chat_request(QWEN, "Say yes.", 3)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        audit_row(&server.audit_db, &id).await;
    }
    let rows = SqliteStore::open(&server.audit_db).expect("open the audit file");
    let records = tierd::audit::AuditStore::records_since(&rows, 0).expect("read the rows");

    let output = Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["report", "--since", "1h", "--by", "workflow", "--format", "json", "--db"])
        .arg(&server.audit_db)
        .output()
        .expect("run tierd report");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("report JSON");
    // Other tests may add rows while this one runs, so compare against rows read before.
    let total_requests = report["total"]["requests"].as_u64().expect("requests");
    assert!(total_requests >= records.len() as u64);
    let alpha = report["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["key"] == "alpha"))
        .unwrap_or_else(|| panic!("no alpha row: {report}"));
    let alpha_records: Vec<&AuditRecord> = records.iter().filter(|r| r.workflow.as_deref() == Some("alpha")).collect();
    assert_eq!(alpha["requests"], alpha_records.len() as u64);
    let alpha_input: u64 = alpha_records.iter().map(|r| r.input_tokens).sum();
    assert_eq!(alpha["input_tokens"], alpha_input);
    let alpha_cost: f64 = alpha_records.iter().map(|r| r.cost_usd).sum();
    assert_close(alpha["cost_usd"].as_f64().expect("cost"), alpha_cost, "alpha cost");

    for format in ["csv", "table"] {
        let output = Command::new(env!("CARGO_BIN_EXE_tierd"))
            .args(["report", "--by", "tier", "--format", format, "--db"])
            .arg(&server.audit_db)
            .output()
            .expect("run tierd report");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{format}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(text.contains("total"), "{format}: {text}");
        assert!(text.contains("saving"), "{format}: {text}");
    }
}

#[test]
fn sigterm_under_load_keeps_every_answered_row() {
    let mock = MockProvider::start_shared().expect("mock provider");
    let server = Server::start("audit-sigterm", &config(&mock.base_url, &mock.base_url));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let ids: Vec<String> = (0..6).map(|i| format!("sigterm-{i}")).collect();
    let answered = runtime.block_on(async {
        let requests = ids.iter().map(|id| {
            let server = &server;
            async move {
                let body = chat_request(QWEN, "List three fruits.", 12);
                let reply = client()
                    .post(server.url("/v1/chat/completions"))
                    .header("x-request-id", id.as_str())
                    .json(&body)
                    .send()
                    .await;
                let reply = reply.ok()?;
                if reply.status() != StatusCode::OK {
                    return None;
                }
                reply.text().await.ok().map(|_| id.clone())
            }
        });
        let terminate = async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let status = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(60)));
            assert!(status.is_some_and(|s| s.success()), "the server did not exit cleanly: {status:?}");
        };
        let (answered, ()) = tokio::join!(futures::future::join_all(requests), terminate);
        answered.into_iter().flatten().collect::<Vec<_>>()
    });
    assert!(!answered.is_empty(), "no request was answered before the shutdown");

    let store = SqliteStore::open(&server.audit_db).expect("open the audit file");
    for id in &answered {
        let record = store.record(id).expect("read").unwrap_or_else(|| panic!("answered request {id} has no row"));
        assert_eq!(record.status, 200);
    }
}
