//! `tierd bench serve` against a real `tierd serve` on 127.0.0.1 with smollm2, and against a
//! mock server on 127.0.0.1 whose replies are set per URL path. The mock covers a slow first
//! token, HTTP errors, cut streams, error events and a server that never responds. One test
//! targets a port with no server.
//!
//! Every run must account for each request: sent = succeeded + failed, with each failure
//! counted by kind, and no request may report a first token after its end.
//!
//! Run with `cargo test --release --test bench_serve`.

mod common;

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Path as UrlPath;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::*;
use serde_json::{json, Value};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["bench", "serve"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env_remove("TIERD_BENCH_API_KEY")
        .output()
        .expect("run tierd bench serve")
}

/// Runs the benchmark with `--format json` and returns the report, panicking with stderr
/// when it fails.
fn bench_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let output = bench(&all);
    assert!(
        output.status.success(),
        "tierd bench serve {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

fn rows(report: &Value) -> &Vec<Value> {
    report["rows"].as_array().expect("rows array")
}

fn count(row: &Value, field: &str) -> u64 {
    row[field].as_u64().unwrap_or_else(|| panic!("no {field} in {row}"))
}

fn failures(row: &Value, kind: &str) -> u64 {
    row["failures"][kind]["count"].as_u64().unwrap_or(0)
}

/// Checks the invariants every row must hold: the counts add up, one sample per request, and
/// no first token after the end of its request.
fn check_row(row: &Value) {
    let (sent, succeeded, failed) = (count(row, "sent"), count(row, "succeeded"), count(row, "failed"));
    assert_eq!(sent, succeeded + failed, "sent != succeeded + failed: {row}");
    let by_kind: u64 = row["failures"].as_object().expect("failures object").values().map(|f| f["count"].as_u64().expect("count")).sum();
    assert_eq!(by_kind, failed, "failures by kind do not add up to the failed count: {row}");

    let samples = row["samples"].as_array().expect("samples");
    assert_eq!(samples.len() as u64, sent, "one sample per request: {row}");
    for sample in samples {
        if let (Some(ttft), Some(e2e)) = (sample["ttft_ms"].as_f64(), sample["e2e_ms"].as_f64()) {
            assert!(ttft <= e2e, "TTFT {ttft} ms after the end {e2e} ms: {sample}");
        }
    }
    if let (Some(ttft), Some(e2e)) = (row["ttft_ms"]["max"].as_f64(), row["e2e_ms"]["max"].as_f64()) {
        assert!(ttft <= e2e, "{row}");
    }
}

// ---------------------------------------------------------------------------------------------
// The mock server.

/// Content chunks of every successful mock stream.
const MOCK_TOKENS: usize = 4;
/// Gap between the mock's content chunks.
const MOCK_GAP: Duration = Duration::from_millis(20);
/// Wait before the first chunk on `/slow`, and on `/fast`.
const SLOW_FIRST: Duration = Duration::from_millis(200);
const FAST_FIRST: Duration = Duration::from_millis(20);

/// Requests the `/mixed` endpoint has received. It returns in turn a 503, a cut stream and a
/// good stream. Only one test uses it.
static MIXED: AtomicUsize = AtomicUsize::new(0);

fn sse(payload: &Value) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

fn content(text: &str) -> Value {
    json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
}

/// Builds a stream of `MOCK_TOKENS` content chunks after `first`, then usage (when `usage`)
/// and `[DONE]`. With `cut_after`, the stream ends after that many chunks: cleanly when
/// `clean_cut`, else with a body error that drops the connection.
fn stream_response(first: Duration, usage: bool, cut_after: Option<usize>, clean_cut: bool) -> Response {
    let events = async_stream::stream! {
        yield Ok::<Bytes, std::io::Error>(sse(&json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})));
        tokio::time::sleep(first).await;
        for index in 0..MOCK_TOKENS {
            if cut_after == Some(index) {
                if clean_cut {
                    return;
                }
                yield Err(std::io::Error::other("mock cut the stream"));
                return;
            }
            if index > 0 {
                tokio::time::sleep(MOCK_GAP).await;
            }
            yield Ok(sse(&content("tok")));
        }
        if usage {
            yield Ok(sse(&json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": MOCK_TOKENS, "total_tokens": 11 + MOCK_TOKENS}})));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(events))
        .expect("a valid response")
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"message": message, "type": "server_error"}}))).into_response()
}

async fn mock_chat(UrlPath(mode): UrlPath<String>, body: axum::Json<Value>) -> Response {
    assert_eq!(body["stream"], true, "the benchmark must stream: {}", body.0);
    assert_eq!(body["stream_options"]["include_usage"], true, "{}", body.0);
    match mode.as_str() {
        "slow" => stream_response(SLOW_FIRST, true, None, false),
        "fast" => stream_response(FAST_FIRST, true, None, false),
        "nousage" => stream_response(FAST_FIRST, false, None, false),
        "error" => error_response(StatusCode::SERVICE_UNAVAILABLE, "mock overloaded"),
        "short" => stream_response(FAST_FIRST, true, Some(2), true),
        "mixed" => match MIXED.fetch_add(1, Ordering::SeqCst) % 3 {
            0 => error_response(StatusCode::SERVICE_UNAVAILABLE, "mock overloaded"),
            1 => stream_response(FAST_FIRST, true, Some(2), false),
            _ => stream_response(FAST_FIRST, true, None, false),
        },
        "errorevent" => {
            let events = futures::stream::iter([
                Ok::<Bytes, Infallible>(sse(&content("a"))),
                Ok(sse(&json!({"error": {"message": "mock failed mid-stream"}}))),
            ]);
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from_stream(events))
                .expect("a valid response")
        }
        "json" => axum::Json(json!({"choices": [{"message": {"role": "assistant", "content": "not streamed"}}]})).into_response(),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            error_response(StatusCode::GATEWAY_TIMEOUT, "too late")
        }
        _ => error_response(StatusCode::NOT_FOUND, "unknown mock mode"),
    }
}

async fn mock_classify(body: axum::Json<Value>) -> Response {
    assert!(body["task"].is_string(), "{}", body.0);
    assert!(body["input"].is_string(), "{}", body.0);
    tokio::time::sleep(Duration::from_millis(30)).await;
    axum::Json(json!({"object": "classification", "results": [{"index": 0, "label": "positive"}]})).into_response()
}

/// Returns the base URL of the mock, started on first use on its own thread.
fn mock() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the mock");
        listener.set_nonblocking(true).expect("non-blocking mock socket");
        let base = format!("http://{}", listener.local_addr().expect("mock address"));
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("mock runtime");
            runtime.block_on(async move {
                let app = Router::new()
                    .route("/{mode}/v1/chat/completions", post(mock_chat))
                    .route("/{mode}/v1/classify", post(mock_classify));
                let listener = tokio::net::TcpListener::from_std(listener).expect("mock listener");
                axum::serve(listener, app).await.expect("mock server");
            });
        });
        base
    })
}

fn mock_url(mode: &str) -> String {
    format!("{}/{mode}", mock())
}

/// Returns a URL on 127.0.0.1 where nothing listens: a port that was free a moment ago.
fn closed_url() -> String {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-serve").join(name);
    std::fs::create_dir_all(&dir).expect("create the test folder");
    dir
}

// ---------------------------------------------------------------------------------------------
// Against the mock.

#[test]
fn slow_first_token_is_timed() {
    let url = mock_url("slow");
    let report = bench_json(&[
        "--url", &url, "--model", "m", "--rate", "5", "--requests", "4", "--warmup", "0", "--prompt-tokens", "8",
    ]);
    let row = &rows(&report)[0];
    check_row(row);
    assert_eq!(count(row, "sent"), 4, "{row}");
    assert_eq!(count(row, "succeeded"), 4, "{row}");

    let ttft = &row["ttft_ms"];
    let floor = SLOW_FIRST.as_secs_f64() * 1000.0;
    assert!(ttft["p50"].as_f64() >= Some(floor), "TTFT below the mock's {floor} ms wait: {ttft}");
    // Three gaps of 20 ms follow the first token.
    let e2e_floor = floor + 3.0 * MOCK_GAP.as_secs_f64() * 1000.0;
    assert!(row["e2e_ms"]["p50"].as_f64() >= Some(e2e_floor), "{row}");
    assert_eq!(row["itl_ms"]["count"], 12, "3 gaps in each of 4 streams: {row}");
    assert!(row["itl_ms"]["p50"].as_f64() >= Some(15.0), "{row}");

    assert_eq!(row["output_tokens"], 16);
    assert_eq!(row["output_tokens_counted_by"], "usage");
    assert_eq!(row["mean_prompt_tokens"], 11.0);
    assert_eq!(report["setup"]["arrivals"], "poisson");
    assert!(report["setup"]["prompt_length"].as_str().unwrap_or("").starts_with("approximate"), "{}", report["setup"]);
}

#[test]
fn every_failure_kind_is_counted() {
    let cases = [
        ("error", "http 503", "mock overloaded"),
        ("short", "stream cut", "[DONE]"),
        ("errorevent", "error event", "mock failed mid-stream"),
        ("json", "invalid response", "text/event-stream"),
    ];
    for (mode, kind, message) in cases {
        let url = mock_url(mode);
        let report = bench_json(&["--url", &url, "--model", "m", "--concurrency", "2", "--requests", "3", "--warmup", "0"]);
        let row = &rows(&report)[0];
        check_row(row);
        assert_eq!(count(row, "sent"), 3, "{mode}: {row}");
        assert_eq!(count(row, "failed"), 3, "{mode}: {row}");
        assert_eq!(failures(row, kind), 3, "{mode}: {row}");
        let example = row["failures"][kind]["example"].as_str().unwrap_or("");
        assert!(example.contains(message), "{mode}: the example `{example}` lacks `{message}`");
        assert!(row["ttft_ms"].is_null(), "{mode}: {row}");
    }
}

#[test]
fn mixed_outcomes_add_up() {
    let url = mock_url("mixed");
    let report = bench_json(&["--url", &url, "--model", "m", "--rate", "20", "--requests", "9", "--warmup", "0"]);
    let row = &rows(&report)[0];
    check_row(row);
    assert_eq!(count(row, "sent"), 9, "{row}");
    assert_eq!(count(row, "succeeded"), 3, "{row}");
    assert_eq!(failures(row, "http 503"), 3, "{row}");
    assert_eq!(failures(row, "stream cut"), 3, "{row}");
    // Only the three complete streams count their tokens.
    assert_eq!(row["output_tokens"], 3 * MOCK_TOKENS as u64, "{row}");
}

#[test]
fn timeout_and_connect_failures_are_counted() {
    let started = Instant::now();
    let url = mock_url("hang");
    let report = bench_json(&["--url", &url, "--model", "m", "--concurrency", "2", "--requests", "2", "--timeout", "300ms", "--warmup", "0"]);
    let row = &rows(&report)[0];
    check_row(row);
    assert_eq!(failures(row, "timeout"), 2, "{row}");
    assert!(started.elapsed() < Duration::from_secs(20), "the timeout did not stop the requests");

    let closed = closed_url();
    let report = bench_json(&["--url", &closed, "--model", "m", "--concurrency", "1", "--requests", "2", "--warmup", "0"]);
    let row = &rows(&report)[0];
    check_row(row);
    assert_eq!(failures(row, "connect"), 2, "{row}");
}

#[test]
fn failed_warmup_stops_the_run() {
    let url = mock_url("error");
    let output = bench(&["--url", &url, "--model", "m", "--requests", "2"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warm-up request"), "{stderr}");
    assert!(stderr.contains("http 503"), "{stderr}");
}

#[test]
fn duration_bounds_the_run() {
    let started = Instant::now();
    let url = mock_url("fast");
    let report = bench_json(&[
        "--url", &url, "--model", "m", "--rate", "40", "--arrivals", "uniform", "--requests", "10000", "--duration", "1s", "--warmup", "0",
    ]);
    let row = &rows(&report)[0];
    check_row(row);
    // Evenly spaced at 40 per second, sends at 0, 25, ..., 975 ms fit in one second.
    assert_eq!(count(row, "sent"), 40, "{row}");
    assert_eq!(count(row, "succeeded"), 40, "{row}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

#[test]
fn missing_usage_counts_content_chunks() {
    let url = mock_url("nousage");
    let output = bench(&["--url", &url, "--model", "m", "--requests", "2", "--warmup", "0"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("TTFT p50/p90/p99 ms"), "{table}");
    assert!(table.contains("no usage in the streams, so output tokens are content chunks"), "{table}");

    let report = bench_json(&["--url", &url, "--model", "m", "--requests", "2", "--warmup", "0"]);
    let row = &rows(&report)[0];
    check_row(row);
    assert_eq!(row["output_tokens_counted_by"], "content_chunks");
    assert_eq!(row["output_tokens"], 2 * MOCK_TOKENS as u64);
    assert!(row["mean_prompt_tokens"].is_null(), "{row}");
}

#[test]
fn compare_alternates_and_reports_ratios() {
    let dir = temp_dir("compare");
    let chart = dir.join("compare.png");
    let output_file = dir.join("compare.json");
    let _ = std::fs::remove_file(&chart);
    let (slow, fast) = (mock_url("slow"), mock_url("fast"));
    let report = bench_json(&[
        "--compare", &slow, &fast, "--model", "m", "--rate", "4,8", "--requests", "6", "--warmup", "1",
        "--chart", chart.to_str().expect("UTF-8 path"), "--output", output_file.to_str().expect("UTF-8 path"),
    ]);
    assert_eq!(report["setup"]["rounds"], 3);
    let rows = rows(&report);
    assert_eq!(rows.len(), 4, "one row per endpoint and rate");
    for row in rows {
        check_row(row);
        assert_eq!(count(row, "sent"), 6, "{row}");
        assert_eq!(count(row, "succeeded"), 6, "{row}");
    }
    let ratios = report["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 2, "one ratio row per later endpoint and rate");
    for ratio in ratios {
        assert_eq!(ratio["endpoint"], 1);
        // The fast mock waits 20 ms for its first token, the slow one 200 ms.
        let ttft = ratio["ttft_p50"].as_f64().expect("TTFT ratio");
        assert!(ttft < 0.5, "fast / slow TTFT ratio {ttft}: {ratio}");
    }

    let written: Value = serde_json::from_str(&std::fs::read_to_string(&output_file).expect("--output file")).expect("JSON");
    assert_eq!(written["rows"].as_array().map(Vec::len), Some(4));
    let image = image::open(&chart).expect("the chart is a PNG");
    assert_eq!((image.width(), image.height()), (1280, 600));
}

#[test]
fn classification_is_timed_end_to_end() {
    let url = mock_url("ok");
    let report = bench_json(&["--url", &url, "--task", "sentiment", "--concurrency", "2", "--requests", "4", "--prompt-tokens", "16"]);
    assert_eq!(report["setup"]["api"], "classify");
    assert!(report["endpoints"][0]["api_url"].as_str().unwrap_or("").ends_with("/ok/v1/classify"), "{report}");
    let row = &rows(&report)[0];
    check_row(row);
    assert_eq!(count(row, "succeeded"), 4, "{row}");
    assert!(row["e2e_ms"]["p50"].as_f64() >= Some(30.0), "{row}");
    assert!(row["ttft_ms"].is_null(), "{row}");
}

#[test]
fn prompts_file_lines_are_sent_and_checked() {
    let dir = temp_dir("prompts");
    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"one\"}]}\n\n\
         {\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"two\"}], \"max_tokens\": 3}\n",
    )
    .expect("write the prompts");
    let url = mock_url("fast");
    let report = bench_json(&["--url", &url, "--prompts", good.to_str().expect("UTF-8 path"), "--requests", "3", "--warmup", "0"]);
    assert_eq!(report["setup"]["distinct_prompts"], 2);
    check_row(&rows(&report)[0]);
    assert_eq!(count(&rows(&report)[0], "succeeded"), 3);

    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n{\"messages\": \"x\"}\n").expect("write the prompts");
    let output = bench(&["--url", &url, "--model", "m", "--prompts", bad.to_str().expect("UTF-8 path")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("{}, line 2: `messages` must be a non-empty array", bad.display())), "{stderr}");
}

#[test]
fn remote_targets_are_rejected() {
    // Only the address is resolved, which for an IP literal sends nothing on the network.
    for url in ["http://10.255.255.1:8080", "http://192.0.2.1/v1"] {
        let output = bench(&["--url", url, "--model", "m", "--requests", "1"]);
        assert!(!output.status.success(), "{url} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("is not on this machine"), "{url}: {stderr}");
        assert!(stderr.contains("--allow-remote"), "{url}: {stderr}");
    }
}

#[test]
fn bad_arguments_name_the_value() {
    let url = mock_url("fast");
    for (args, expected) in [
        (vec!["--rate", "0"], "--rate 0"),
        (vec!["--rate", "1", "--concurrency", "2"], "cannot be used with"),
        (vec!["--requests", "2", "--rounds", "3"], "--rounds 3"),
        (vec!["--tokenizer", "no-such-model"], "--tokenizer no-such-model"),
        (vec!["--compare", "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", "--model", "a", "--model", "b"], "2 --model values for 3 endpoints"),
    ] {
        let mut all = vec!["--url", &url, "--model", "m"];
        if args[0] == "--compare" {
            all.clear();
        }
        all.extend(args.iter().copied());
        let output = bench(&all);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let output = bench(&["--url", &url, "--requests", "1"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("--model is required"));
}

// ---------------------------------------------------------------------------------------------
// Against a real tierd.

fn tierd() -> &'static Server {
    own_server("bench-serve", || {
        format!(
            "builtin_tasks = false\n[server]\nqueue_capacity = 16\n\n{}\n{}",
            model_table(SMOLLM, None),
            greeting_task("0.5")
        )
    })
}

#[test]
fn tierd_at_three_rates() {
    let server = tierd();
    let dir = temp_dir("tierd");
    let chart = dir.join("rates.png");
    let _ = std::fs::remove_file(&chart);
    let report = bench_json(&[
        "--url", &server.base_url, "--model", SMOLLM, "--rate", "1,2,4", "--requests", "3", "--prompt-tokens", "32",
        "--max-tokens", "8", "--chart", chart.to_str().expect("UTF-8 path"),
    ]);
    let setup = &report["setup"];
    assert!(
        setup["prompt_length"].as_str().unwrap_or("").starts_with("exact"),
        "the local model's tokenizer should measure the prompts: {setup}"
    );
    let rows = rows(&report);
    let levels: Vec<f64> = rows.iter().map(|row| row["level"]["rate"].as_f64().expect("rate")).collect();
    assert_eq!(levels, [1.0, 2.0, 4.0]);
    for row in rows {
        check_row(row);
        assert_eq!(count(row, "sent"), 3, "{row}");
        assert_eq!(count(row, "succeeded"), 3, "{row}");
        assert_eq!(row["output_tokens_counted_by"], "usage", "tierd sends usage when asked: {row}");
        let tokens = count(row, "output_tokens");
        assert!((3..=24).contains(&tokens), "3 requests of at most 8 tokens: {row}");
        // 32 tokens of text plus the chat template's own.
        assert!(row["mean_prompt_tokens"].as_f64() > Some(32.0), "{row}");
        assert!(row["ttft_ms"]["p50"].as_f64() > Some(0.0), "{row}");
    }
    let image = image::open(&chart).expect("the chart is a PNG");
    assert_eq!((image.width(), image.height()), (1280, 600));
}

#[test]
fn tierd_classification_closed_loop() {
    let server = tierd();
    let output = bench(&[
        "--url", &server.base_url, "--task", "greeting", "--concurrency", "2", "--requests", "4", "--prompt-tokens", "12",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("workload: classify"), "{table}");
    assert!(table.contains("concurrency 2"), "{table}");
    let line = table.lines().find(|line| line.starts_with("1 ")).unwrap_or_else(|| panic!("no row for endpoint 1: {table}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    // ep, "concurrency", "2", sent, ok, fail
    assert_eq!(&fields[3..6], ["4", "4", "0"], "{line}");
}

#[test]
fn exact_prompts_have_the_requested_length() {
    let path = model_path(SMOLLM);
    let mut file = std::fs::File::open(&path).expect("open the model");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("GGUF metadata");
    let (tokenizer, _) = tierd::tokenizer::load(&path, &content).expect("tokenizer");
    for tokens in [1, 17, 128, 1000] {
        let (prompts, miss) = tierd::commands::bench_serve::synthetic::exact(&tokenizer, tokens, 5).expect("prompts");
        assert_eq!(prompts.len(), 5);
        assert_eq!(miss, 0, "{tokens} tokens");
        for prompt in &prompts {
            let counted = tokenizer.encode_fast(prompt.as_str(), false).expect("encode").get_ids().len();
            assert_eq!(counted, tokens, "{prompt:?}");
        }
        assert_ne!(prompts[0], prompts[1]);
    }

    // No two prompts may repeat, or a server's prompt cache would answer the repeats.
    let (prompts, _) = tierd::commands::bench_serve::synthetic::exact(&tokenizer, 64, 200).expect("prompts");
    let distinct: std::collections::HashSet<&String> = prompts.iter().collect();
    assert_eq!(distinct.len(), prompts.len());
}
