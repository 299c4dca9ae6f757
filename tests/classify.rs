//! `POST /v1/classify` and `GET /v1/tasks` end to end: a real `tierd serve` on 127.0.0.1 with
//! the built-in tasks on the real encoder, heads and models, plus configured tasks that
//! exercise the LLM backend on a base model, input limits and chaining.
//!
//! Run with `cargo test --release --test classify`.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Tasks added to the built-in ones. `gemma_sentiment` scores labels with the base model in
/// plain format, and `strict` rejects inputs over 8 tokens. `chained` runs a head trained on
/// its label examples and passes unsure inputs to smollm2.
const TASKS: &str = r#"
[[task]]
name = "gemma_sentiment"
description = "Movie and product reviews, labelled by sentiment."
[[task.label]]
name = "positive"
examples = ["A wonderful film, I loved every minute.", "Great value and it works perfectly."]
[[task.label]]
name = "negative"
examples = ["Dull, slow and far too long.", "It stopped working after a week."]
[[task.backend]]
kind = "llm_labels"
model = "gemma3-270m"
format = "plain"

[[task]]
name = "strict"
max_input_tokens = 8
on_overflow = "reject"
[[task.label]]
name = "greeting"
examples = ["hello there", "good morning to you", "hi, how are you"]
[[task.label]]
name = "farewell"
examples = ["goodbye for now", "see you later", "bye, take care"]
[[task.backend]]
kind = "embedding_head"
encoder = "all-minilm-l6-v2"

[[task]]
name = "chained"
threshold = 0.9
[[task.label]]
name = "greeting"
examples = ["hello there", "good morning to you"]
[[task.label]]
name = "farewell"
examples = ["goodbye for now", "see you later"]
[[task.backend]]
kind = "embedding_head"
encoder = "all-minilm-l6-v2"
accept = 0.999
[[task.backend]]
kind = "llm_labels"
model = "smollm2-135m-instruct"
"#;

/// The encoder's batching window in microseconds: long enough that concurrent requests from
/// the tests are merged even on a busy machine.
const BATCH_WINDOW_US: u64 = 20_000;

fn server() -> &'static Server {
    own_server("classify", || {
        format!(
            "[server]\nqueue_capacity = 8\nencoder_batch_window_us = {BATCH_WINDOW_US}\n\n{}\n{}\n{}\n{TASKS}",
            model_table(QWEN, None),
            model_table(SMOLLM, None),
            model_table(GEMMA, Some(GEMMA_CONTEXT)),
        )
    })
}

async fn classify(task: &str, input: Value) -> Value {
    post_ok(server(), "/v1/classify", &json!({"task": task, "input": input})).await
}

fn labels(response: &Value) -> Vec<String> {
    response["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["label"].as_str().expect("label").to_string())
        .collect()
}

/// Checks the shape every result must have: scores over all labels summing to one, the
/// confidence equal to the top score, and the answering backend named.
fn check_result(result: &Value, labels: &[&str]) {
    let scores = result["scores"].as_object().expect("scores object");
    assert_eq!(scores.len(), labels.len(), "scores: {result}");
    let total: f64 = scores.values().map(|v| v.as_f64().expect("score")).sum();
    assert!((total - 1.0).abs() < 1e-6, "scores sum to {total}: {result}");
    let top = scores.values().map(|v| v.as_f64().expect("score")).fold(0.0, f64::max);
    let confidence = result["confidence"].as_f64().expect("confidence");
    assert!((confidence - top).abs() < 1e-12, "confidence {confidence} is not the top score {top}");
    assert!(labels.contains(&result["label"].as_str().expect("label")));
    assert!(result["backend"].is_string(), "{result}");
    assert!(result["model"].is_string(), "{result}");
    assert!(result["timings"]["attempts"].as_array().is_some_and(|a| !a.is_empty()), "{result}");
}

#[tokio::test]
async fn sentiment_batch_keeps_order() {
    let inputs = [
        "Absolutely love it, best purchase I've made this year.",
        "Terrible. It broke the first day and support ignored me.",
        "The food was delicious and the staff were lovely.",
        "Worst movie I have ever seen, a total waste of time.",
    ];
    let response = classify("sentiment", json!(inputs)).await;
    assert_eq!(response["object"], "classification");
    let results = response["results"].as_array().expect("results");
    assert_eq!(results.len(), inputs.len());
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["index"], index, "{result}");
        check_result(result, &["positive", "negative"]);
    }
    assert_eq!(labels(&response), ["positive", "negative", "positive", "negative"]);
    let usage = &response["usage"];
    assert!(usage["prompt_tokens"].as_u64().expect("prompt_tokens") > 0, "{usage}");
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"]);
}

#[tokio::test]
async fn intent_uses_packaged_head() {
    let response = classify(
        "intent",
        json!(["please transfer 100 dollars from checking to savings", "what's the weather like tomorrow"]),
    )
    .await;
    assert_eq!(labels(&response), ["transfer", "weather"]);
    let result = &response["results"][0];
    assert_eq!(result["scores"].as_object().expect("scores").len(), 157);
    assert_eq!(result["backend"], "embedding_head");
    assert_eq!(result["model"], "all-minilm-l6-v2");
}

#[tokio::test]
async fn route_labels_training_examples() {
    // Both texts are examples of the built-in task, so its head was trained on them.
    let response = classify(
        "route",
        json!([
            "Convert 5 miles to kilometres.",
            "Plan a migration of our monolith to microservices, with risks, timeline and rollback strategy."
        ]),
    )
    .await;
    for result in response["results"].as_array().expect("results") {
        check_result(result, &["simple", "moderate", "complex"]);
    }
    let first = &response["results"][0]["timings"]["attempts"][0];
    assert_eq!(first["backend"], "embedding_head");
    assert_eq!(first["label"], "simple", "{first}");
    let second = &response["results"][1]["timings"]["attempts"][0];
    assert_eq!(second["label"], "complex", "{second}");
}

#[tokio::test]
async fn gemma_plain_prompt_scores_labels() {
    let response = classify(
        "gemma_sentiment",
        json!(["I hated every minute of this boring film.", "A brilliant, moving film with wonderful acting."]),
    )
    .await;
    for result in response["results"].as_array().expect("results") {
        check_result(result, &["positive", "negative"]);
        assert_eq!(result["backend"], "llm_labels");
        assert_eq!(result["model"], GEMMA);
    }
    assert_eq!(labels(&response), ["negative", "positive"]);
}

#[tokio::test]
async fn chain_passes_unsure_inputs_on() {
    let response = classify("chained", json!("hello and goodbye")).await;
    let result = &response["results"][0];
    let attempts = result["timings"]["attempts"].as_array().expect("attempts");
    // The head's accept level of 0.999 is out of reach for a head trained on four examples.
    assert_eq!(attempts.len(), 2, "{result}");
    assert_eq!(attempts[0]["backend"], "embedding_head");
    assert_eq!(attempts[1]["backend"], "llm_labels");
    assert_eq!(result["backend"], "llm_labels");
    assert_eq!(result["model"], SMOLLM);
    let below = result["confidence"].as_f64().expect("confidence") < 0.9;
    assert_eq!(result["below_threshold"], below, "{result}");
}

#[tokio::test]
async fn nfc_and_nfd_classify_alike() {
    let nfc = "Le crème brûlée était délicieux, café parfait.";
    let nfd: String = nfc
        .replace('è', "e\u{300}")
        .replace('û', "u\u{302}")
        .replace('é', "e\u{301}");
    assert_ne!(nfc, nfd);
    let response = classify("sentiment", json!([nfc, nfd])).await;
    let results = response["results"].as_array().expect("results");
    assert_eq!(results[0]["scores"], results[1]["scores"]);
    assert_eq!(results[0]["input_tokens"], results[1]["input_tokens"]);
}

#[tokio::test]
async fn long_input_is_truncated_and_reported() {
    let long = "The plot was slow but the ending made up for it. ".repeat(40);
    let response = classify("sentiment", json!([long, "fine"])).await;
    let results = response["results"].as_array().expect("results");
    assert_eq!(results[0]["truncated"], true, "{}", results[0]);
    assert!(results[0]["input_tokens"].as_u64().expect("input_tokens") > 256);
    assert_eq!(results[1]["truncated"], false);
}

#[tokio::test]
async fn long_input_is_rejected_by_index() {
    let reply = post(
        server(),
        "/v1/classify",
        &json!({"task": "strict", "input": ["hello", "one two three four five six seven eight nine ten"]}),
    )
    .await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("input[1]"), "accepts (8)");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let server = server();
    let cases = [
        (json!({"task": "nope", "input": "x"}), StatusCode::NOT_FOUND, Some("task"), "nope"),
        (json!({"task": "sentiment", "input": ["good", "", "bad"]}), StatusCode::BAD_REQUEST, Some("input[1]"), "input 1"),
        (json!({"task": "sentiment", "input": " \n\t"}), StatusCode::BAD_REQUEST, Some("input[0]"), "whitespace"),
        (json!({"task": "sentiment", "input": []}), StatusCode::BAD_REQUEST, Some("input"), "at least one"),
        (json!({"task": "sentiment", "input": 42}), StatusCode::BAD_REQUEST, Some("input"), "expected a string or an array of strings"),
        (json!({"task": "sentiment"}), StatusCode::BAD_REQUEST, None, "input"),
        (json!({"task": "sentiment", "input": "x", "colour": "red"}), StatusCode::BAD_REQUEST, Some("colour"), "unknown field"),
    ];
    for (body, status, param, part) in cases {
        let reply = post(server, "/v1/classify", &body).await;
        assert_api_error(&reply, status, "invalid_request_error", param, part);
    }
    // The server still answers after the errors.
    let response = classify("sentiment", json!("Great!")).await;
    assert_eq!(labels(&response), ["positive"]);
}

#[tokio::test]
async fn invisible_only_input_rejected() {
    let reply = post(
        server(),
        "/v1/classify",
        &json!({"task": "intent", "input": ["hello", "\u{200b}\u{200d}\u{feff}"]}),
    )
    .await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("input[1]"), "invisible");
}

#[tokio::test]
async fn parallel_requests_all_answered() {
    let texts = ["book a table for two tonight", "what's my account balance", "play some jazz"];
    let serial = classify("intent", json!(texts)).await;
    // More requests than the model queue's capacity of 8: the encoder has its own, larger
    // queue and embeds waiting requests together.
    let requests = (0..24).map(|_| classify("intent", json!(texts)));
    for response in futures::future::join_all(requests).await {
        assert_eq!(labels(&response), labels(&serial));
        for (a, b) in response["results"].as_array().expect("results").iter().zip(serial["results"].as_array().expect("results")) {
            let difference = (a["confidence"].as_f64().expect("confidence") - b["confidence"].as_f64().expect("confidence")).abs();
            // A different batch changes the padding, which moves embeddings by float rounding.
            assert!(difference < 1e-5, "{a} vs {b}");
        }
    }
}

/// Distinct intent requests, so that a result given to the wrong request shows.
const INTENT_REQUESTS: [&[&str]; 8] = [
    &["book a table for two tonight"],
    &["what's my account balance", "play some jazz"],
    &["please transfer 100 dollars from checking to savings"],
    &["what's the weather like tomorrow"],
    &["set an alarm for seven in the morning", "how do I say thank you in french"],
    &["my card was declined at the store"],
    &["tell me a joke"],
    &["cancel my reservation at the italian place for friday evening"],
];

/// Largest score difference allowed between a request classified alone and merged with
/// others. A merged batch is padded to a different width, which changes the order of float32
/// additions in the encoder, so the scores agree to rounding and not bit for bit.
const MERGED_TOLERANCE: f64 = 1e-5;

/// Compares two `/v1/classify` responses for the same inputs: the same labels, and every
/// label's score within [`MERGED_TOLERANCE`].
fn assert_same_results(merged: &Value, alone: &Value) {
    assert_eq!(labels(merged), labels(alone), "labels of {merged} and {alone}");
    let merged = merged["results"].as_array().expect("results");
    let alone = alone["results"].as_array().expect("results");
    assert_eq!(merged.len(), alone.len());
    for (a, b) in merged.iter().zip(alone) {
        let scores = a["scores"].as_object().expect("scores");
        for (label, score) in scores {
            let expected = b["scores"][label].as_f64().expect("the same labels");
            let difference = (score.as_f64().expect("score") - expected).abs();
            assert!(difference < MERGED_TOLERANCE, "score of {label} differs by {difference}: {a} vs {b}");
        }
    }
}

/// Reads `metric` (a histogram's `_sum` or `_count`) of the MiniLM encoder from `/metrics`.
async fn encoder_metric(metric: &str) -> f64 {
    let reply = get(server(), "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let prefix = format!("{metric}{{encoder=\"all-minilm-l6-v2\"}} ");
    reply
        .text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in /metrics:\n{}", reply.text))
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn concurrent_requests_match_alone() {
    let mut alone = Vec::new();
    for texts in INTENT_REQUESTS {
        alone.push(classify("intent", json!(texts)).await);
    }
    let merged = futures::future::join_all(INTENT_REQUESTS.iter().map(|texts| classify("intent", json!(texts)))).await;
    for (merged, alone) in merged.iter().zip(&alone) {
        assert_same_results(merged, alone);
    }
}

#[tokio::test]
async fn concurrent_requests_are_merged() {
    let runs_before = encoder_metric("tierd_encoder_batch_requests_count").await;
    let requests_before = encoder_metric("tierd_encoder_batch_requests_sum").await;
    futures::future::join_all(INTENT_REQUESTS.iter().map(|texts| classify("intent", json!(texts)))).await;
    let runs = encoder_metric("tierd_encoder_batch_requests_count").await - runs_before;
    let requests = encoder_metric("tierd_encoder_batch_requests_sum").await - requests_before;
    // Other tests of this binary may embed at the same time, so the counts are bounds.
    assert!(requests >= INTENT_REQUESTS.len() as f64, "{requests} requests embedded");
    assert!(runs < requests, "{requests} requests in {runs} runs: none were merged");
    let passes = encoder_metric("tierd_encoder_batch_sequences_count").await;
    let sequences = encoder_metric("tierd_encoder_batch_sequences_sum").await;
    assert!(sequences > passes, "{sequences} sequences in {passes} forward passes");
}

#[tokio::test]
async fn bad_request_fails_alone() {
    let good = INTENT_REQUESTS.iter().map(|texts| async move {
        post(server(), "/v1/classify", &json!({"task": "intent", "input": texts})).await
    });
    let bad = [
        json!({"task": "intent", "input": ["play some jazz", ""]}),
        json!({"task": "intent", "input": ["\u{200b}\u{200d}"]}),
    ];
    let bad = bad.iter().map(|body| post(server(), "/v1/classify", body));
    let (good, bad) = futures::future::join(futures::future::join_all(good), futures::future::join_all(bad)).await;
    for (reply, texts) in good.iter().zip(INTENT_REQUESTS) {
        assert_eq!(reply.status, StatusCode::OK, "{texts:?}: {}", reply.text);
        assert_eq!(reply.json()["results"].as_array().expect("results").len(), texts.len());
    }
    assert_api_error(&bad[0], StatusCode::BAD_REQUEST, "invalid_request_error", Some("input[1]"), "empty");
    assert_api_error(&bad[1], StatusCode::BAD_REQUEST, "invalid_request_error", Some("input[0]"), "invisible");
}

#[test]
fn empty_label_text_fails_start() {
    let config = format!(
        "builtin_tasks = false\n{}\n[[task]]\nname = \"t\"\n[[task.label]]\nname = \"a\"\n\
         [[task.label]]\nname = \"b\"\ntext = \"\"\n[[task.backend]]\nkind = \"llm_labels\"\nmodel = \"{SMOLLM}\"\n",
        model_table(SMOLLM, None)
    );
    let message = match Server::try_start("empty-label-text", &config) {
        Ok(_) => panic!("the server started with an empty label text"),
        Err(message) => message,
    };
    assert!(message.contains("label `b` has no tokens"), "{message}");
}

#[tokio::test]
async fn tasks_are_listed() {
    let reply = get(server(), "/v1/tasks").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let body = reply.json();
    let tasks = body["data"].as_array().expect("data");
    let names: Vec<&str> = tasks.iter().map(|t| t["name"].as_str().expect("name")).collect();
    for expected in ["gemma_sentiment", "strict", "chained", "sentiment", "intent", "route"] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    let sentiment = tasks.iter().find(|t| t["name"] == "sentiment").expect("sentiment");
    assert_eq!(sentiment["threshold"], 0.8);
    assert_eq!(sentiment["labels"].as_array().expect("labels").len(), 2);
    assert_eq!(sentiment["backends"][0]["kind"], "embedding_head");
    assert_eq!(sentiment["backends"][1]["kind"], "llm_labels");
    let intent = tasks.iter().find(|t| t["name"] == "intent").expect("intent");
    assert_eq!(intent["labels"].as_array().expect("labels").len(), 157);
}

/// A classification whose client leaves while the encoder runs it is recorded with status 499
/// and an error. The handler is dropped before it sets a status, which was recorded as 0.
#[tokio::test]
async fn left_classification_is_recorded_as_closed() {
    let server = server();
    // Enough inputs that the encoder is still busy when the client gives up.
    let inputs: Vec<String> = (0..600).map(|i| format!("review number {i}: the battery died after a week")).collect();
    let sent = client()
        .post(server.url("/v1/classify"))
        .header("x-request-id", "classify-left")
        .timeout(std::time::Duration::from_millis(200))
        .json(&json!({"task": "sentiment", "input": inputs}))
        .send()
        .await;
    assert!(sent.is_err(), "the classification finished within 200 ms, so the client did not leave");

    let record = audit_row(&server.audit_db, "classify-left").await;
    assert_eq!(record.status, 499, "{record:?}");
    let error = record.error.as_deref().unwrap_or_default();
    assert!(error.contains("closed the connection"), "{record:?}");
}
