//! Metrics, client keys, workflow budgets and cost headers, against a real `tierd serve` on
//! 127.0.0.1 with the real qwen and MiniLM models and a mock frontier provider. `/metrics` is
//! parsed with a Prometheus text-format parser and compared with the rows of the SQLite file.
//!
//! Run with `cargo test --release --test observability`.

mod common;
mod mock_provider;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use mock_provider::MockProvider;
use prometheus_parse::{Sample, Scrape, Value as MetricValue};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tierd::audit::{AuditStore, SqliteStore};
use tierd::client_keys::hash_hex;

const KEY: &str = "sk-test-billing-0123456789";
const KEY_NAME: &str = "billing-service";

/// Workflow budgets of both configs, in qwen tokens. A one-line chat prompt is about 30 tokens
/// once the chat template wraps it.
const BUDGETS: &str = r#"
[[workflow]]
name = "wordy"
max_prompt_tokens = 5
on_exceed = "warn"

[[workflow]]
name = "strict"
max_prompt_tokens = 5
on_exceed = "reject"
"#;

fn provider(mock: &str) -> String {
    format!(
        r#"
[pricing]
version = "obs-1"
baseline = "frontier/big"
[pricing.local]
"{QWEN}" = {{ input_per_mtok = 0.5, output_per_mtok = 1.0 }}

{frontier}

[[route]]
name = "auto"
local = "{QWEN}"
tier1 = ["frontier/big"]
threshold = 1.0
"#,
        frontier = frontier_provider(mock),
    )
}

/// Returns the config of the metrics server: no keys, and two workflow labels besides the
/// budgeted workflows, which always keep theirs.
fn metrics_config(mock: &str) -> String {
    format!(
        "builtin_tasks = false\n[server]\ndefault_max_tokens = 6\n[metrics]\nmax_workflows = 2\n{}\n{}\n{BUDGETS}",
        model_table(QWEN, None),
        provider(mock),
    )
}

/// Returns the config of the shared server: a client key, the budgets, one classification task
/// and a route that sends every request to the frontier.
fn keyed_config(mock: &str) -> String {
    format!(
        r#"
builtin_tasks = false
[server]
default_max_tokens = 6

{qwen}
{provider}
{BUDGETS}

[audit]
store_text = "full"

[[client_key]]
name = "{KEY_NAME}"
sha256 = "{hash}"

[[task]]
name = "greeting"
[[task.label]]
name = "hello"
examples = ["hello there", "good morning to you"]
[[task.label]]
name = "bye"
examples = ["goodbye for now", "see you later"]
[[task.backend]]
kind = "embedding_head"
encoder = "all-minilm-l6-v2"

[[route]]
name = "pre"
mode = "pre_route"
local = "{QWEN}"
tier1 = ["frontier/big"]
route_task = "greeting"
route_tiers = {{ hello = 1, bye = 1 }}
"#,
        qwen = model_table(QWEN, None),
        provider = provider(mock),
        hash = hash_hex(KEY),
    )
}

/// Starts the mock provider of the shared server once, and returns it.
fn mock() -> &'static MockProvider {
    static MOCK: OnceLock<MockProvider> = OnceLock::new();
    MOCK.get_or_init(|| MockProvider::start_shared().unwrap_or_else(|message| panic!("{message}")))
}

/// Returns the shared server with a client key, starting it on the first call.
fn keyed() -> &'static Server {
    own_server("observability-keyed", || keyed_config(&mock().base_url))
}

/// Sends `method path` with `body` (for POST), an `Authorization` header when `key` is set,
/// and `headers`.
async fn send(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let mut request = match method {
        "GET" => client().get(server.url(path)),
        _ => client().post(server.url(path)),
    };
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    read_reply(request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))).await
}

async fn scrape(server: &Server, key: Option<&str>) -> Scrape {
    let reply = send(server, "GET", "/metrics", key, &[], None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let content_type = reply.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "content type {content_type}");
    Scrape::parse(reply.text.lines().map(|line| Ok(line.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not in the Prometheus text format ({e}):\n{}", reply.text))
}

/// Samples of `metric` whose labels include every pair of `labels`.
fn samples<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(name, value)| s.labels.get(name) == Some(*value)))
        .collect()
}

/// Sum of the counter or gauge values of `metric` with `labels`.
fn sum(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, metric, labels)
        .iter()
        .map(|s| match &s.value {
            MetricValue::Counter(v) | MetricValue::Gauge(v) | MetricValue::Untyped(v) => *v,
            other => panic!("{metric} is not a counter or gauge: {other:?}"),
        })
        .sum()
}

/// Number of observations of the histogram `metric` with `labels`: the sum of its `+Inf` buckets.
fn observations(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, metric, labels)
        .iter()
        .map(|s| match &s.value {
            MetricValue::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            other => panic!("{metric} is not a histogram: {other:?}"),
        })
        .sum()
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!((actual - expected).abs() < 1e-9, "{what}: {actual} != {expected}");
}

/// Every kind of traffic, then the counters against the rows. The server is its own, so no
/// other test adds requests between the last row and the scrape.
#[test]
fn metrics_match_the_audit_rows() {
    let mock = MockProvider::start_shared().expect("mock provider");
    let server = Server::start("observability-metrics", &metrics_config(&mock.base_url));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let server = &server;
        let chat = |id: &'static str, model: &str, prompt: &str, headers: Vec<(&'static str, String)>, extra: Value| {
            let mut body = chat_request(model, prompt, 6);
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            async move {
                let mut headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                headers.push(("x-request-id", id));
                send(server, "POST", "/v1/chat/completions", None, &headers, Some(&body)).await
            }
        };
        let sent = [
            (chat("m-local", QWEN, "Name one colour.", vec![("x-tierd-workflow", "alpha".into())], json!({})).await, 200),
            (chat("m-escalated", "auto", "Name one animal.", vec![], json!({"user": "gamma"})).await, 200),
            (chat("m-metadata", QWEN, "Say yes.", vec![], json!({"metadata": {"workflow": "beta"}})).await, 200),
            (chat("m-missing", "no-such-model", "Hi.", vec![], json!({})).await, 404),
            (chat("m-empty", QWEN, "", vec![], json!({"messages": []})).await, 400),
            (chat("m-warn", QWEN, "Say no.", vec![("x-tierd-workflow", "wordy".into())], json!({})).await, 200),
            (chat("m-reject", QWEN, "Say no.", vec![("x-tierd-workflow", "strict".into())], json!({})).await, 400),
        ];
        for (reply, status) in &sent {
            assert_eq!(reply.status.as_u16(), *status, "{}", reply.text);
        }
        let completion = send(
            server,
            "POST",
            "/v1/completions",
            None,
            &[("x-request-id", "m-completion")],
            Some(&completion_request(QWEN, "One, two,", 4)),
        )
        .await;
        assert_eq!(completion.status, StatusCode::OK, "{}", completion.text);

        let ids = ["m-local", "m-escalated", "m-metadata", "m-missing", "m-empty", "m-warn", "m-reject", "m-completion"];
        let mut records = Vec::new();
        for id in ids {
            records.push(audit_row(&server.audit_db, id).await);
        }
        let metrics = scrape(server, None).await;

        assert_eq!(sum(&metrics, "tierd_requests_total", &[]), records.len() as f64);
        let mut by_status: HashMap<u16, usize> = HashMap::new();
        for record in &records {
            *by_status.entry(record.status).or_default() += 1;
        }
        for (status, count) in &by_status {
            let status = status.to_string();
            assert_eq!(sum(&metrics, "tierd_requests_total", &[("status", &status)]), *count as f64, "status {status}");
        }
        let tiers = [(1, "1"), (3, "3")];
        for (tier, label) in tiers {
            let count = records.iter().filter(|r| r.tier == tier).count();
            assert_eq!(sum(&metrics, "tierd_requests_total", &[("tier", label)]), count as f64, "tier {label}");
        }

        let input: u64 = records.iter().map(|r| r.input_tokens).sum();
        let output: u64 = records.iter().map(|r| r.output_tokens).sum();
        assert_eq!(sum(&metrics, "tierd_tokens_total", &[("kind", "input")]), input as f64);
        assert_eq!(sum(&metrics, "tierd_tokens_total", &[("kind", "output")]), output as f64);
        let cost: f64 = records.iter().map(|r| r.cost_usd).sum();
        let counterfactual: f64 = records.iter().map(|r| r.counterfactual_usd).sum();
        assert!(cost > 0.0, "the local price and the escalation make the cost positive");
        assert_close(sum(&metrics, "tierd_cost_usd_total", &[]), cost, "cost");
        assert_close(sum(&metrics, "tierd_counterfactual_cost_usd_total", &[]), counterfactual, "counterfactual");
        assert_close(sum(&metrics, "tierd_saving_usd", &[]), counterfactual - cost, "saving");

        let escalated = records.iter().filter(|r| r.escalation.as_deref() == Some("low_confidence")).count();
        assert_eq!(escalated, 1);
        let labels = [("reason", "low_confidence"), ("tier", "1"), ("provider", "frontier"), ("model", "big")];
        assert_eq!(sum(&metrics, "tierd_escalations_total", &labels), 1.0);

        assert_eq!(observations(&metrics, "tierd_latency_seconds", &[("phase", "total")]), records.len() as f64);
        let decoded = records.iter().filter(|r| r.decode_ms.is_some()).count();
        assert_eq!(observations(&metrics, "tierd_latency_seconds", &[("phase", "decode")]), decoded as f64);
        let upstream = records.iter().filter(|r| r.upstream_ms.is_some()).count();
        assert_eq!(observations(&metrics, "tierd_latency_seconds", &[("phase", "upstream")]), upstream as f64);

        // `wordy` and `strict` have budgets and keep their labels. `alpha` and `gamma` take the
        // two places, so the later `beta` is counted as `other`.
        let workflows: HashSet<&str> = samples(&metrics, "tierd_requests_total", &[])
            .iter()
            .filter_map(|s| s.labels.get("workflow"))
            .collect();
        let expected: HashSet<&str> = ["", "alpha", "gamma", "other", "wordy", "strict"].into_iter().collect();
        assert_eq!(workflows, expected);
        assert_eq!(sum(&metrics, "tierd_requests_total", &[("workflow", "other")]), 1.0);

        assert_eq!(sum(&metrics, "tierd_context_budget_exceeded_total", &[("workflow", "wordy"), ("action", "warn")]), 1.0);
        assert_eq!(sum(&metrics, "tierd_context_budget_exceeded_total", &[("workflow", "strict"), ("action", "reject")]), 1.0);

        // Every row above was read back, so the writer has written them all.
        assert_eq!(sum(&metrics, "tierd_audit_records_total", &[("outcome", "written")]), records.len() as f64);
        assert_eq!(sum(&metrics, "tierd_audit_records_total", &[("outcome", "dropped")]), 0.0);
        assert_eq!(sum(&metrics, "tierd_audit_queue_depth", &[]), 0.0);
        assert_eq!(samples(&metrics, "tierd_audit_writer_lag_seconds", &[]).len(), 1);
        assert_eq!(sum(&metrics, "tierd_generation_queue_depth", &[("model", QWEN)]), 0.0);
    });
}

#[tokio::test]
async fn every_endpoint_but_health_needs_the_key() {
    let server = keyed();
    let chat = chat_request(QWEN, "Say hi.", 2);
    let completion = completion_request(QWEN, "Hello", 2);
    let classify = json!({"task": "greeting", "input": "hello there"});
    let model_path = format!("/v1/models/{QWEN}");
    let endpoints: [(&str, &str, Option<&Value>); 7] = [
        ("GET", "/v1/models", None),
        ("GET", &model_path, None),
        ("GET", "/v1/tasks", None),
        ("GET", "/metrics", None),
        ("POST", "/v1/chat/completions", Some(&chat)),
        ("POST", "/v1/completions", Some(&completion)),
        ("POST", "/v1/classify", Some(&classify)),
    ];
    for (method, path, body) in endpoints {
        let missing = send(server, method, path, None, &[], body).await;
        assert_api_error(&missing, StatusCode::UNAUTHORIZED, "invalid_request_error", None, "API key");
        assert_eq!(missing.json()["error"]["code"], "missing_api_key", "{method} {path}");
        assert_eq!(missing.headers.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));

        let wrong = send(server, method, path, Some("sk-wrong"), &[], body).await;
        assert_api_error(&wrong, StatusCode::UNAUTHORIZED, "invalid_request_error", None, "Incorrect API key");
        assert_eq!(wrong.json()["error"]["code"], "invalid_api_key", "{method} {path}");
        assert!(!wrong.text.contains("sk-wrong"), "the 401 body repeats the key: {}", wrong.text);

        let right = send(server, method, path, Some(KEY), &[], body).await;
        assert_eq!(right.status, StatusCode::OK, "{method} {path} with the key: {}", right.text);
    }

    let health = send(server, "GET", "/health", None, &[], None).await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);

    let metrics = scrape(server, Some(KEY)).await;
    assert!(sum(&metrics, "tierd_unauthorized_total", &[("reason", "missing")]) >= 7.0);
    assert!(sum(&metrics, "tierd_unauthorized_total", &[("reason", "invalid")]) >= 7.0);
    // The encoder that served the classification is a known model, not `other`.
    let classify = [("endpoint", "/v1/classify"), ("status", "200")];
    assert!(sum(&metrics, "tierd_requests_total", &[&classify[..], &[("model", "all-minilm-l6-v2")]].concat()) >= 1.0);
    assert_eq!(sum(&metrics, "tierd_requests_total", &[("model", "other")]), 0.0);
    // Rejected requests reached no tier.
    assert!(sum(&metrics, "tierd_requests_total", &[("status", "401"), ("tier", "0")]) >= 3.0);
    assert_eq!(sum(&metrics, "tierd_requests_total", &[("status", "401"), ("tier", "3")]), 0.0);
}

#[tokio::test]
async fn prompts_are_stored_for_every_endpoint() {
    let server = keyed();
    let completion = completion_request(QWEN, "One, two,", 2);
    let headers = [("x-request-id", "text-completion")];
    let reply = send(server, "POST", "/v1/completions", Some(KEY), &headers, Some(&completion)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let record = audit_row(&server.audit_db, "text-completion").await;
    assert_eq!(record.prompt.as_deref(), Some("One, two,"));
    assert_eq!(record.completion.as_deref(), Some(completion_text(&reply.json()).as_str()));

    let classify = json!({"task": "greeting", "input": ["hello there", "see you later"]});
    let headers = [("x-request-id", "text-classify")];
    let reply = send(server, "POST", "/v1/classify", Some(KEY), &headers, Some(&classify)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let record = audit_row(&server.audit_db, "text-classify").await;
    assert_eq!(record.prompt.as_deref(), Some("hello there\nsee you later"));
    assert_eq!(record.completion.as_deref(), Some("hello\nbye"));
}

#[tokio::test]
async fn client_text_cannot_forge_log_lines() {
    let server = keyed();
    let body = chat_request("bad\nFORGED log line", "Hi.", 1);
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &[], Some(&body)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let log = server.log();
    assert!(log.contains("bad\\nFORGED"), "the escaped model name is not in the log");
    assert!(!log.lines().any(|line| line.starts_with("FORGED")), "a client wrote a log line:\n{log}");
}

#[tokio::test]
async fn audit_rows_name_the_key_never_show_it() {
    let server = keyed();
    let body = chat_request(QWEN, "Say hi.", 2);
    let headers = [("x-request-id", "keyed-ok")];
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &headers, Some(&body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let headers = [("x-request-id", "keyed-wrong")];
    let reply = send(server, "POST", "/v1/chat/completions", Some("sk-wrong"), &headers, Some(&body)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    let record = audit_row(&server.audit_db, "keyed-ok").await;
    assert_eq!(record.client.as_deref(), Some(KEY_NAME));
    let rejected = audit_row(&server.audit_db, "keyed-wrong").await;
    assert_eq!(rejected.status, 401);
    assert_eq!(rejected.client, None);
    assert_eq!((rejected.input_tokens, rejected.output_tokens), (0, 0));

    let output = Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["report", "--by", "client", "--format", "json", "--db"])
        .arg(&server.audit_db)
        .output()
        .expect("run tierd report");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains(KEY_NAME), "{report}");
    assert!(!report.contains(KEY), "the report shows the key: {report}");
    let store = SqliteStore::open(&server.audit_db).expect("open the audit file");
    let rows = store.records_since(0).expect("read the rows");
    assert!(rows.iter().all(|r| !format!("{r:?}").contains(KEY)), "a row contains the key");
}

#[tokio::test]
async fn budgets_warn_or_reject_by_workflow() {
    let server = keyed();
    let body = chat_request(QWEN, "Say no.", 2);

    let headers = [("x-request-id", "budget-warn"), ("x-tierd-workflow", "wordy")];
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &headers, Some(&body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let record = audit_row(&server.audit_db, "budget-warn").await;
    assert_eq!(record.over_budget.as_deref(), Some("warn"));
    assert!(record.input_tokens > 5, "{record:?}");

    let headers = [("x-request-id", "budget-reject"), ("x-tierd-workflow", "strict")];
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &headers, Some(&body)).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("messages"), "workflow `strict`");
    assert_eq!(reply.json()["error"]["code"], "context_budget_exceeded");
    assert!(reply.json()["error"]["message"].as_str().is_some_and(|m| m.contains("5 tokens")), "{}", reply.text);
    let record = audit_row(&server.audit_db, "budget-reject").await;
    assert_eq!((record.status, record.over_budget.as_deref()), (400, Some("reject")));
    assert_eq!(record.output_tokens, 0);

    // The legacy endpoint names its own field.
    let headers = [("x-tierd-workflow", "strict")];
    let completion = completion_request(QWEN, "One two three four five six seven eight", 2);
    let reply = send(server, "POST", "/v1/completions", Some(KEY), &headers, Some(&completion)).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("prompt"), "workflow `strict`");

    // Routed requests are checked before their local attempt (`auto`) and before a
    // pre-routed request goes to the provider (`pre`).
    for route in ["auto", "pre"] {
        let routed = chat_request(route, "Say no.", 2);
        let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &headers, Some(&routed)).await;
        assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("messages"), "workflow `strict`");
    }
    let headers = [("x-request-id", "budget-pre-warn"), ("x-tierd-workflow", "wordy")];
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &headers, Some(&chat_request("pre", "Say no.", 2))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let record = audit_row(&server.audit_db, "budget-pre-warn").await;
    assert_eq!((record.tier, record.over_budget.as_deref()), (1, Some("warn")));

    // Workflows without a table have no budget.
    let headers = [("x-tierd-workflow", "unbounded")];
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &headers, Some(&body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}

#[tokio::test]
async fn responses_carry_request_id_and_cost() {
    let server = keyed();
    let body = chat_request(QWEN, "Name a fruit.", 4);
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &[("x-request-id", "cost-header")], Some(&body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let header = |name: &str| reply.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(header("x-request-id").as_deref(), Some("cost-header"));
    let cost: f64 = header("x-tierd-cost-usd")
        .unwrap_or_else(|| panic!("no cost header: {:?}", reply.headers))
        .parse()
        .expect("the cost header is a number");
    let record = audit_row(&server.audit_db, "cost-header").await;
    let usage = &reply.json()["usage"];
    let expected = (usage["prompt_tokens"].as_f64().unwrap_or(0.0) * 0.5 + usage["completion_tokens"].as_f64().unwrap_or(0.0) * 1.0) / 1e6;
    assert!(cost > 0.0);
    assert_close(cost, expected, "cost header");
    assert_close(record.cost_usd, cost, "row cost");

    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &[], Some(&stream)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.get("x-request-id").is_some());
    assert!(reply.headers.get("x-tierd-cost-usd").is_none(), "a stream's cost is unknown when its headers go out");
}

#[tokio::test]
async fn workflow_comes_from_header_then_metadata_then_user() {
    let server = keyed();
    let cases = [
        ("wf-header", Some("from-header"), json!({"metadata": {"workflow": "from-metadata"}, "user": "from-user"}), "from-header"),
        ("wf-metadata", None, json!({"metadata": {"workflow": "from-metadata"}, "user": "from-user"}), "from-metadata"),
        ("wf-user", None, json!({"metadata": {"team": "x"}, "user": "from-user"}), "from-user"),
    ];
    for (id, header, extra, expected) in cases {
        let mut body = chat_request(QWEN, "Hi.", 1);
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let mut headers = vec![("x-request-id", id)];
        if let Some(workflow) = header {
            headers.push(("x-tierd-workflow", workflow));
        }
        let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &headers, Some(&body)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(audit_row(&server.audit_db, id).await.workflow.as_deref(), Some(expected), "{id}");
    }

    // UTF-8 in the header is kept, as it is in the body.
    let body = chat_request(QWEN, "Hi.", 1);
    let mut request = client()
        .post(server.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("x-request-id", "wf-utf8")
        .json(&body);
    request = request.header(
        "x-tierd-workflow",
        reqwest::header::HeaderValue::from_bytes("café".as_bytes()).expect("header value"),
    );
    let reply = request.send().await.expect("POST with a UTF-8 workflow");
    assert_eq!(reply.status(), StatusCode::OK);
    assert_eq!(audit_row(&server.audit_db, "wf-utf8").await.workflow.as_deref(), Some("café"));

    let classify = json!({"task": "greeting", "input": "hello", "metadata": {"workflow": "triage"}});
    let reply = send(server, "POST", "/v1/classify", Some(KEY), &[("x-request-id", "wf-classify")], Some(&classify)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(audit_row(&server.audit_db, "wf-classify").await.workflow.as_deref(), Some("triage"));

    let bad = json!({"model": QWEN, "messages": [{"role": "user", "content": "Hi"}], "metadata": {"workflow": 7}});
    let reply = send(server, "POST", "/v1/chat/completions", Some(KEY), &[], Some(&bad)).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("metadata.workflow"), "metadata.workflow");
}
