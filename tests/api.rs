//! tierd's HTTP API end to end: a real `tierd serve` process on 127.0.0.1 with the three real
//! models, driven over HTTP as an OpenAI client would.
//!
//! Run with `cargo test --release --test api`: the models decode far too slowly without
//! optimisation. Tests that measure time or fill a model's queue take an exclusive lock, so
//! they never share the server with other tests.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

const CAPITAL_PROMPT: &str = "What is the capital of France?";
/// qwen2.5-coder's greedy output for this is Chinese characters and two emoji ("我爱你 🌟❤️"
/// when these tests were written), so byte-level tokens split inside UTF-8 characters.
const LOVE_PROMPT: &str =
    "Translate \"I love you\" into Chinese, then add a red heart emoji ❤️ at the end.";
/// A prompt whose greedy output is plain ASCII prose longer than 24 tokens.
const PROSE_PROMPT: &str = "Explain in two sentences what a hash map is.";

// ---------------------------------------------------------------------------------------------
// Greedy output of each model

#[tokio::test]
async fn qwen_chat_names_paris() {
    let (server, _lock) = shared();
    let response = post_ok(server, "/v1/chat/completions", &chat_request(QWEN, CAPITAL_PROMPT, 24)).await;

    let content = chat_content(&response);
    assert!(content.contains("Paris"), "greedy answer does not name Paris: {content:?}");
}

#[tokio::test]
async fn smollm_chat_returns_text() {
    let (server, _lock) = shared();
    let response = post_ok(server, "/v1/chat/completions", &chat_request(SMOLLM, CAPITAL_PROMPT, 16)).await;

    let content = chat_content(&response);
    assert!(!content.trim().is_empty(), "smollm2 returned no text: {response}");
}

#[tokio::test]
async fn gemma_completion_returns_text() {
    let (server, _lock) = shared();
    let request = completion_request(GEMMA, "The capital of France is", 12);
    let response = post_ok(server, "/v1/completions", &request).await;

    let text = completion_text(&response);
    assert!(!text.trim().is_empty(), "gemma3 returned no text: {response}");
    assert_eq!(response["object"], "text_completion", "object of {response}");
}

#[tokio::test]
async fn gemma_chat_returns_text() {
    // gemma3-270m is a base model without a chat template in its file. tierd applies the
    // Gemma 3 template, so chat must work even though the output need not be sensible.
    let (server, _lock) = shared();
    let response = post_ok(server, "/v1/chat/completions", &chat_request(GEMMA, CAPITAL_PROMPT, 12)).await;

    let content = chat_content(&response);
    assert!(!content.trim().is_empty(), "gemma3 chat returned no text: {response}");
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// One request sent streamed and non-streamed in `stream_matches_non_stream`.
struct StreamCase {
    model: &'static str,
    path: &'static str,
    prompt: &'static str,
    max_tokens: u64,
    expect_non_ascii: bool,
}

#[tokio::test]
async fn stream_matches_non_stream() {
    let (server, _lock) = shared();
    let cases = [
        StreamCase {
            model: QWEN,
            path: "/v1/chat/completions",
            prompt: CAPITAL_PROMPT,
            max_tokens: 16,
            expect_non_ascii: false,
        },
        StreamCase {
            model: QWEN,
            path: "/v1/chat/completions",
            prompt: LOVE_PROMPT,
            max_tokens: 24,
            expect_non_ascii: true,
        },
        StreamCase {
            model: SMOLLM,
            path: "/v1/chat/completions",
            prompt: CAPITAL_PROMPT,
            max_tokens: 16,
            expect_non_ascii: false,
        },
        StreamCase {
            model: GEMMA,
            path: "/v1/completions",
            prompt: "The capital of France is",
            max_tokens: 12,
            expect_non_ascii: false,
        },
    ];

    for case in cases {
        let label = format!("{} {} {:?}", case.model, case.path, case.prompt);
        let request = if case.path == "/v1/completions" {
            completion_request(case.model, case.prompt, case.max_tokens)
        } else {
            chat_request(case.model, case.prompt, case.max_tokens)
        };

        let whole = post_ok(server, case.path, &request).await;
        let whole_text = if case.path == "/v1/completions" {
            completion_text(&whole)
        } else {
            chat_content(&whole)
        };

        let mut streamed_request = request.clone();
        streamed_request["stream_options"] = json!({"include_usage": true});
        let stream = post_stream(server, case.path, &streamed_request).await;

        assert_eq!(stream.text(), whole_text, "{label}: streamed deltas differ from the whole text");
        assert_eq!(
            stream.finish_reason(),
            finish_reason(&whole),
            "{label}: finish_reason differs"
        );
        assert_eq!(
            stream.usage()["completion_tokens"],
            whole["usage"]["completion_tokens"],
            "{label}: completion_tokens differ"
        );
        assert_eq!(
            stream.usage()["prompt_tokens"],
            whole["usage"]["prompt_tokens"],
            "{label}: prompt_tokens differ"
        );
        if case.expect_non_ascii {
            assert!(
                !whole_text.is_ascii(),
                "{label}: expected Chinese or emoji in the output, got {whole_text:?}"
            );
            assert!(
                !whole_text.contains('\u{FFFD}'),
                "{label}: the output contains U+FFFD, so a character was split: {whole_text:?}"
            );
        }
    }
}

/// Checks the SSE framing of a whole streamed body and returns the event payloads: every
/// event is exactly one `data: <payload>` line followed by a blank line, and the last is
/// `data: [DONE]`.
fn check_sse_framing(raw: &str) -> Vec<&str> {
    assert!(raw.ends_with("\n\n"), "the stream does not end with a blank line: {raw:?}");
    let events: Vec<&str> = raw.split_terminator("\n\n").collect();
    for event in &events {
        assert!(event.starts_with("data: "), "event is not a `data: ` line: {event:?}");
        assert!(!event.contains('\n'), "event spans several lines: {event:?}");
    }

    let payloads: Vec<&str> = events.iter().map(|event| &event["data: ".len()..]).collect();
    assert_eq!(payloads.last(), Some(&"[DONE]"), "the stream does not end with data: [DONE]");
    let done_count = payloads.iter().filter(|payload| **payload == "[DONE]").count();
    assert_eq!(done_count, 1, "[DONE] must be sent once");
    payloads
}

/// Checks what chat and legacy completion chunks share: object, id, model and creation time.
fn check_common_chunk_fields(chunks: &[Value], object: &str, id_prefix: &str, model: &str) {
    let first = &chunks[0];
    let id = first["id"].as_str().unwrap_or_else(|| panic!("chunk has no id: {first}"));
    assert!(id.starts_with(id_prefix), "id {id:?} does not start with {id_prefix:?}");
    for chunk in chunks {
        assert_eq!(chunk["object"], object, "object of chunk {chunk}");
        assert_eq!(chunk["id"], first["id"], "all chunks must share the id; chunk {chunk}");
        assert_eq!(chunk["created"], first["created"], "created differs in chunk {chunk}");
        assert_eq!(chunk["model"], model, "model of chunk {chunk}");
    }
}

/// Checks the usage chunk that ends a stream with `include_usage`, and that every chunk
/// before it has `"usage": null`.
fn check_usage_chunk(chunks: &[Value]) {
    let (usage_chunk, earlier) = chunks.split_last().expect("the stream has no chunks");
    assert_eq!(usage_chunk["choices"], json!([]), "the usage chunk must have no choices");
    let usage = &usage_chunk["usage"];
    let prompt = usage["prompt_tokens"].as_u64().expect("usage.prompt_tokens");
    let completion = usage["completion_tokens"].as_u64().expect("usage.completion_tokens");
    assert!(prompt > 0, "usage.prompt_tokens is 0: {usage}");
    assert!(completion > 0, "usage.completion_tokens is 0: {usage}");
    assert_eq!(usage["total_tokens"], prompt + completion, "usage.total_tokens: {usage}");

    for chunk in earlier {
        assert!(
            chunk.get("usage").is_some_and(Value::is_null),
            "a chunk before the usage chunk must have \"usage\": null: {chunk}"
        );
    }
}

#[tokio::test]
async fn chat_stream_sse_framing() {
    let (server, _lock) = shared();
    let mut request = chat_request(SMOLLM, CAPITAL_PROMPT, 6);
    request["stream_options"] = json!({"include_usage": true});
    let stream = post_stream(server, "/v1/chat/completions", &request).await;

    let payloads = check_sse_framing(&stream.raw);
    assert_eq!(payloads.len(), stream.chunks.len() + 1, "every payload but [DONE] is a chunk");
    let chunks = &stream.chunks;
    assert!(chunks.len() >= 4, "expected role, content, finish and usage chunks: {chunks:?}");
    check_common_chunk_fields(chunks, "chat.completion.chunk", "chatcmpl-", SMOLLM);

    let role_delta = &chunks[0]["choices"][0]["delta"];
    assert_eq!(role_delta["role"], "assistant", "the first chunk must carry the role");
    assert!(
        role_delta["content"].is_null() || role_delta["content"] == "",
        "the role chunk must have no content: {role_delta}"
    );

    let finish_index = chunks.len() - 2;
    for chunk in &chunks[1..finish_index] {
        let choice = &chunk["choices"][0];
        assert!(choice["delta"]["content"].is_string(), "content chunk without content: {chunk}");
        assert!(choice["delta"].get("role").is_none(), "only the first chunk has a role: {chunk}");
        assert!(choice["finish_reason"].is_null(), "finish_reason before the end: {chunk}");
    }
    assert!(!stream.text().is_empty(), "the content chunks carry no text");

    let finish = &chunks[finish_index]["choices"][0];
    let reason = finish["finish_reason"].as_str().unwrap_or("");
    assert!(reason == "stop" || reason == "length", "finish_reason is {reason:?}");
    assert_eq!(finish["delta"], json!({}), "the finish chunk must have an empty delta");

    check_usage_chunk(chunks);
}

#[tokio::test]
async fn chat_stream_without_usage() {
    let (server, _lock) = shared();
    let stream = post_stream(server, "/v1/chat/completions", &chat_request(SMOLLM, CAPITAL_PROMPT, 4)).await;

    check_sse_framing(&stream.raw);
    for chunk in &stream.chunks {
        assert!(
            chunk["usage"].is_null(),
            "usage was not requested, yet a chunk has it: {chunk}"
        );
    }
    let last = stream.chunks.last().expect("no chunks");
    assert!(
        last["choices"][0]["finish_reason"].is_string(),
        "without usage the finish chunk must be the last: {last}"
    );
}

#[tokio::test]
async fn completion_stream_sse_framing() {
    let (server, _lock) = shared();
    let mut request = completion_request(GEMMA, "The capital of France is", 5);
    request["stream_options"] = json!({"include_usage": true});
    let stream = post_stream(server, "/v1/completions", &request).await;

    let payloads = check_sse_framing(&stream.raw);
    assert_eq!(payloads.len(), stream.chunks.len() + 1, "every payload but [DONE] is a chunk");
    let chunks = &stream.chunks;
    assert!(chunks.len() >= 3, "expected text, finish and usage chunks: {chunks:?}");
    check_common_chunk_fields(chunks, "text_completion", "cmpl-", GEMMA);

    let finish_index = chunks.len() - 2;
    for chunk in &chunks[..finish_index] {
        let choice = &chunk["choices"][0];
        assert!(choice["text"].is_string(), "text chunk without text: {chunk}");
        assert!(choice["finish_reason"].is_null(), "finish_reason before the end: {chunk}");
    }
    assert!(!stream.text().is_empty(), "the text chunks carry no text");

    let finish = &chunks[finish_index]["choices"][0];
    let reason = finish["finish_reason"].as_str().unwrap_or("");
    assert!(reason == "stop" || reason == "length", "finish_reason is {reason:?}");
    assert_eq!(finish["text"], "", "the finish chunk must have empty text");

    check_usage_chunk(chunks);
}

// ---------------------------------------------------------------------------------------------
// Stop strings

/// Returns the greedy output for `prompt` and the text of each of its tokens.
async fn greedy_tokens(server: &Server, prompt: &str, max_tokens: u64) -> (String, Vec<String>) {
    let mut request = chat_request(QWEN, prompt, max_tokens);
    request["logprobs"] = json!(true);
    let response = post_ok(server, "/v1/chat/completions", &request).await;
    let tokens = response["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs.content in {response}"))
        .iter()
        .map(|entry| entry["token"].as_str().expect("logprob entry without token").to_string())
        .collect();
    (chat_content(&response), tokens)
}

/// Sends `request` with `stop` non-streamed and streamed, and checks both return exactly
/// `expected` with finish_reason "stop".
async fn check_stop(server: &Server, request: &Value, stop: &str, expected: &str) {
    let mut request = request.clone();
    request["stop"] = json!([stop]);

    let response = post_ok(server, "/v1/chat/completions", &request).await;
    let content = chat_content(&response);
    assert!(!content.contains(stop), "output contains the stop string {stop:?}: {content:?}");
    assert_eq!(content, expected, "output must be the greedy text before {stop:?}");
    assert_eq!(finish_reason(&response), "stop", "finish_reason with stop {stop:?}");

    let stream = post_stream(server, "/v1/chat/completions", &request).await;
    for chunk in &stream.chunks {
        let delta = chunk["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        assert!(!delta.contains(stop), "a delta contains the stop string {stop:?}: {chunk}");
    }
    // Equality also proves that no held-back start of the stop string leaked after the cut.
    assert_eq!(stream.text(), expected, "streamed output must be the greedy text before {stop:?}");
    assert_eq!(stream.finish_reason(), "stop", "streamed finish_reason with stop {stop:?}");
}

#[tokio::test]
async fn stop_spanning_two_tokens() {
    let (server, _lock) = shared();
    let (text, tokens) = greedy_tokens(server, PROSE_PROMPT, 24).await;
    assert_eq!(tokens.concat(), text, "the token texts must add up to the ASCII answer");

    // The stop string is the last two characters of one token and the first two of the next,
    // taken from the middle of the output where the string occurs for the first time.
    let mut chosen = None;
    let mut boundary = 0;
    for pair in tokens.windows(2) {
        boundary += pair[0].len();
        let (left, right) = (&pair[0], &pair[1]);
        let usable = left.is_ascii() && right.is_ascii() && left.len() >= 2 && right.len() >= 2;
        if boundary < text.len() / 3 || !usable {
            continue;
        }
        let stop = format!("{}{}", &left[left.len() - 2..], &right[..2]);
        if text.find(&stop) == Some(boundary - 2) {
            chosen = Some((stop, boundary - 2));
            break;
        }
    }
    let (stop, cut) = chosen.unwrap_or_else(|| panic!("no stop string spans two tokens of {tokens:?}"));

    check_stop(server, &chat_request(QWEN, PROSE_PROMPT, 24), &stop, &text[..cut]).await;
}

#[tokio::test]
async fn stop_multibyte_string() {
    let (server, _lock) = shared();
    let (text, _) = greedy_tokens(server, LOVE_PROMPT, 24).await;

    // Two characters from inside the Chinese output, such as "爱你", each its own token.
    let stop: String = text.chars().skip(1).take(2).collect();
    assert!(!stop.is_ascii(), "expected Chinese in the output, got {text:?}");
    let cut = text.find(&stop).expect("the stop string comes from the text");

    check_stop(server, &chat_request(QWEN, LOVE_PROMPT, 24), &stop, &text[..cut]).await;
}

// ---------------------------------------------------------------------------------------------
// Length limits and usage

/// Checks a one-token response against the same request with `max_tokens: 2`.
fn check_one_token(one: &Value, two: &Value) {
    assert_eq!(finish_reason(one), "length", "finish_reason after one token: {one}");
    assert_eq!(usage_field(one, "completion_tokens"), 1, "completion_tokens: {one}");
    assert_eq!(
        usage_field(one, "prompt_tokens"),
        usage_field(two, "prompt_tokens"),
        "prompt_tokens must not depend on the length limit"
    );
    assert_eq!(
        usage_field(one, "total_tokens"),
        usage_field(one, "prompt_tokens") + usage_field(one, "completion_tokens"),
        "total_tokens must be the sum: {one}"
    );
}

#[tokio::test]
async fn max_tokens_one_is_length() {
    let (server, _lock) = shared();
    let one = post_ok(server, "/v1/chat/completions", &chat_request(QWEN, PROSE_PROMPT, 1)).await;
    let two = post_ok(server, "/v1/chat/completions", &chat_request(QWEN, PROSE_PROMPT, 2)).await;

    check_one_token(&one, &two);
    assert_eq!(usage_field(&two, "completion_tokens"), 2, "completion_tokens with max 2: {two}");
}

#[tokio::test]
async fn max_completion_tokens_one_is_length() {
    let (server, _lock) = shared();
    let mut request = chat_request(QWEN, PROSE_PROMPT, 1);
    request.as_object_mut().expect("object").remove("max_tokens");
    request["max_completion_tokens"] = json!(1);
    let one = post_ok(server, "/v1/chat/completions", &request).await;
    let two = post_ok(server, "/v1/chat/completions", &chat_request(QWEN, PROSE_PROMPT, 2)).await;

    check_one_token(&one, &two);
}

#[tokio::test]
async fn max_completion_tokens_overrides_max_tokens() {
    let (server, _lock) = shared();
    let mut request = chat_request(QWEN, PROSE_PROMPT, 5);
    request["max_completion_tokens"] = json!(1);
    let response = post_ok(server, "/v1/chat/completions", &request).await;

    assert_eq!(usage_field(&response, "completion_tokens"), 1, "max_completion_tokens wins: {response}");
}

#[tokio::test]
async fn completion_max_tokens_one() {
    let (server, _lock) = shared();
    let request = completion_request(GEMMA, "The capital of France is", 1);
    let one = post_ok(server, "/v1/completions", &request).await;
    let two = post_ok(server, "/v1/completions", &completion_request(GEMMA, "The capital of France is", 2)).await;

    check_one_token(&one, &two);
}

// ---------------------------------------------------------------------------------------------
// Errors

/// POSTs a raw body with the given Content-Type.
async fn post_raw(server: &Server, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> Reply {
    let response = client()
        .post(server.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path} failed: {e}"));
    read_reply(response).await
}

#[tokio::test]
async fn error_malformed_json() {
    let (server, _lock) = shared();
    let reply = post_raw(server, "/v1/chat/completions", "application/json", r#"{"model": "qw"#).await;

    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", None, "JSON");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_wrong_field_types() {
    let (server, _lock) = shared();
    let messages = json!([{"role": "user", "content": "hi"}]);
    // (endpoint, field, bad value, text the message must contain)
    let cases = [
        ("/v1/chat/completions", "temperature", json!("hot"), "hot"),
        ("/v1/chat/completions", "messages", json!("hi"), "hi"),
        ("/v1/chat/completions", "max_tokens", json!("5"), "\"5\""),
        ("/v1/chat/completions", "stream", json!("yes"), "yes"),
        ("/v1/chat/completions", "top_p", json!([1]), "sequence"),
        ("/v1/chat/completions", "stop", json!(5), "stop"),
        ("/v1/chat/completions", "logprobs", json!("yes"), "yes"),
        ("/v1/completions", "max_tokens", json!(-1), "-1"),
        ("/v1/completions", "seed", json!("abc"), "abc"),
    ];

    for (path, field, value, message_part) in cases {
        let mut request = json!({"model": SMOLLM, "max_tokens": 2});
        if path == "/v1/completions" {
            request["prompt"] = json!("hi");
        } else {
            request["messages"] = messages.clone();
        }
        request[field] = value.clone();

        let reply = post(server, path, &request).await;
        let label = format!("{path} with {field} = {value}");
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{label}: status; body: {}", reply.text);
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{label}: type; error: {error}");
        assert_eq!(error["param"], field, "{label}: param must name the field; error: {error}");
        let message = error["message"].as_str().unwrap_or("");
        assert!(message.contains(message_part), "{label}: message does not name {message_part:?}: {message}");
    }
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_wrong_content_type() {
    let (server, _lock) = shared();
    let body = chat_request(SMOLLM, "hi", 2).to_string();
    let reply = post_raw(server, "/v1/chat/completions", "text/plain", body).await;

    assert_api_error(&reply, StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", None, "text/plain");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_unknown_model() {
    let (server, _lock) = shared();
    let reply = post(server, "/v1/chat/completions", &chat_request("no-such-model", "hi", 2)).await;

    assert_api_error(&reply, StatusCode::NOT_FOUND, "invalid_request_error", Some("model"), "no-such-model");
    assert_eq!(reply.json()["error"]["code"], "model_not_found", "error.code: {}", reply.text);
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_empty_messages() {
    let (server, _lock) = shared();
    let reply = post(server, "/v1/chat/completions", &json!({"model": SMOLLM, "messages": []})).await;

    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("messages"), "messages");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_body_too_large() {
    let (server, _lock) = shared();
    let request = chat_request(SMOLLM, &"x".repeat(MAX_BODY_BYTES + 1), 2);
    let reply = post(server, "/v1/chat/completions", &request).await;

    assert_api_error(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        None,
        &MAX_BODY_BYTES.to_string(),
    );
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_n_two() {
    let (server, _lock) = shared();
    let mut request = chat_request(SMOLLM, "hi", 2);
    request["n"] = json!(2);
    let reply = post(server, "/v1/chat/completions", &request).await;

    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("n"), "2");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_stream_options_without_stream() {
    let (server, _lock) = shared();
    let cases = [
        ("/v1/chat/completions", chat_request(SMOLLM, "hi", 2), Some(false)),
        ("/v1/chat/completions", chat_request(SMOLLM, "hi", 2), None),
        ("/v1/completions", completion_request(SMOLLM, "hi", 2), Some(false)),
        ("/v1/completions", completion_request(SMOLLM, "hi", 2), None),
    ];
    for (path, mut request, stream) in cases {
        request["stream_options"] = json!({"include_usage": true});
        if let Some(stream) = stream {
            request["stream"] = json!(stream);
        }
        let reply = post(server, path, &request).await;

        assert_api_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("stream_options"),
            "stream_options",
        );
    }
    assert_still_serves(server).await;
}

#[tokio::test]
async fn null_stream_options_without_stream() {
    let (server, _lock) = shared();
    let mut request = chat_request(SMOLLM, "hi", 2);
    request["stream_options"] = Value::Null;
    let reply = post(server, "/v1/chat/completions", &request).await;

    assert_eq!(reply.status, StatusCode::OK, "body: {}", reply.text);
}

#[tokio::test]
async fn error_temperature_three() {
    let (server, _lock) = shared();
    let mut request = chat_request(SMOLLM, "hi", 2);
    request["temperature"] = json!(3);
    let reply = post(server, "/v1/chat/completions", &request).await;

    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("temperature"), "3");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_context_length_exceeded() {
    let (server, _lock) = shared();
    // About 300 tokens, more than the 256 configured for gemma3-270m.
    let long_prompt = "hello ".repeat(GEMMA_CONTEXT + 44);
    let cases = [
        ("/v1/completions", completion_request(GEMMA, &long_prompt, 2), "prompt"),
        ("/v1/chat/completions", chat_request(GEMMA, &long_prompt, 2), "messages"),
    ];

    for (path, request, param) in cases {
        let reply = post(server, path, &request).await;
        assert_api_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some(param),
            &GEMMA_CONTEXT.to_string(),
        );
        assert_eq!(reply.json()["error"]["code"], "context_length_exceeded", "{path}: error.code");
    }
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_unknown_route() {
    let (server, _lock) = shared();
    let reply = get(server, "/v1/no-such-route").await;

    assert_api_error(&reply, StatusCode::NOT_FOUND, "invalid_request_error", None, "/v1/no-such-route");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_wrong_method() {
    let (server, _lock) = shared();
    let reply = get(server, "/v1/completions").await;

    assert_api_error(&reply, StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", None, "GET");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn completion_ids_unique_per_request() {
    let (server, _lock) = shared();
    let request = chat_request(QWEN, CAPITAL_PROMPT, 1);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = client()
            .post(format!("{}/v1/chat/completions", server.base_url))
            .header("x-request-id", "client-chosen-id")
            .json(&request)
            .send()
            .await
            .expect("send chat request");
        assert_eq!(
            response.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
            Some("client-chosen-id"),
            "the client's request id is echoed"
        );
        let body: Value = response.json().await.expect("JSON body");
        ids.push(body["id"].as_str().unwrap_or_default().to_string());
    }
    assert_ne!(ids[0], ids[1], "two completions share the id {}", ids[0]);
}

#[tokio::test]
async fn logprob_bytes_rebuild_the_text() {
    let (server, _lock) = shared();
    let mut request = chat_request(QWEN, LOVE_PROMPT, 24);
    request["logprobs"] = json!(true);
    let response = post_ok(server, "/v1/chat/completions", &request).await;
    let content = chat_content(&response);
    assert!(!content.is_ascii(), "the answer has no emoji or CJK text to test with: {content:?}");

    let entries = response["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs in {response}"));
    let mut bytes = Vec::new();
    for entry in entries {
        let token_bytes = entry["bytes"].as_array().expect("entry.bytes");
        bytes.extend(token_bytes.iter().map(|b| b.as_u64().expect("byte") as u8));
    }
    let rebuilt = String::from_utf8(bytes).expect("the bytes of all tokens form valid UTF-8");
    assert_eq!(rebuilt, content, "concatenated token bytes differ from the message");
}

/// Waits until no request is queued for any model, as `/health` reports.
async fn wait_for_empty_queues(server: &Server) {
    let started = Instant::now();
    loop {
        let health = get(server, "/health").await.json();
        let models = health["models"].as_array().cloned().unwrap_or_default();
        if models.iter().all(|model| model["queue_depth"] == 0) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "queues did not drain within 30 s after the clients left: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn error_queue_full_429() {
    let (server, _lock) = exclusive();
    // Streamed requests return their headers as soon as they are queued, so every request
    // learns at once whether it was accepted. max_tokens 200 keeps the first one running while
    // the others arrive.
    let mut request = chat_request(SMOLLM, "Write a long story about a lighthouse keeper.", 200);
    request["stream"] = json!(true);
    let sent = 2 * (QUEUE_CAPACITY + 1);
    let http = client();
    let sends = (0..sent).map(|_| http.post(server.url("/v1/chat/completions")).json(&request).send());
    let responses: Vec<reqwest::Response> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|result| result.expect("send a streamed request"))
        .collect();

    let (accepted, rejected): (Vec<_>, Vec<_>) = responses
        .into_iter()
        .partition(|response| response.status() == StatusCode::OK);
    assert!(
        accepted.len() <= QUEUE_CAPACITY + 1,
        "{} requests accepted; at most one running plus {QUEUE_CAPACITY} queued fit",
        accepted.len()
    );
    assert!(!rejected.is_empty(), "{sent} concurrent requests, none rejected");

    for response in rejected {
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let reply = read_reply(response).await;
        assert_api_error(&reply, StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", None, SMOLLM);
        assert_eq!(reply.json()["error"]["code"], "queue_full", "error.code: {}", reply.text);
        let seconds: Option<u64> = retry_after.as_deref().and_then(|value| value.parse().ok());
        assert!(
            seconds.is_some_and(|s| s > 0),
            "429 needs a positive Retry-After in seconds, got {retry_after:?}"
        );
    }

    // Dropping the accepted streams closes their connections. The running generation stops
    // and the queued ones are skipped, so the queue drains long before 200 tokens each.
    drop(accepted);
    wait_for_empty_queues(server).await;
    assert_still_serves(server).await;
}

// ---------------------------------------------------------------------------------------------
// Concurrency and disconnects

/// Sends every request at once and returns the chat outputs in request order.
async fn chat_concurrently(server: &Server, requests: &[Value]) -> Vec<String> {
    let sends = requests
        .iter()
        .map(|request| post_ok(server, "/v1/chat/completions", request));
    let responses = futures::future::join_all(sends).await;
    responses.iter().map(chat_content).collect()
}

#[tokio::test]
async fn concurrent_equals_sequential() {
    // Exclusive: the four requests take all of qwen's queue, so a request from another test
    // could be rejected with 429.
    let (server, _lock) = exclusive();
    let prompts = [
        "Name three primary colors.",
        "What is 12 times 12?",
        "Write a haiku about rain.",
        "Which planet is closest to the Sun?",
    ];
    let requests: Vec<Value> = prompts
        .iter()
        .map(|prompt| chat_request(QWEN, prompt, 12))
        .collect();

    let mut sequential = Vec::new();
    for request in &requests {
        let response = post_ok(server, "/v1/chat/completions", request).await;
        sequential.push(chat_content(&response));
    }
    let concurrent = chat_concurrently(server, &requests).await;

    for (index, prompt) in prompts.iter().enumerate() {
        assert_eq!(
            concurrent[index], sequential[index],
            "concurrent and sequential outputs for {prompt:?} differ"
        );
    }
}

#[tokio::test]
async fn concurrent_models_equal_sequential() {
    // Different models run on different worker threads at the same time.
    let (server, _lock) = shared();
    let requests = [
        chat_request(QWEN, "Name a fruit that is yellow.", 10),
        chat_request(SMOLLM, "Name a fruit that is red.", 10),
        chat_request(GEMMA, "Name a fruit that is green.", 10),
    ];

    let mut sequential = Vec::new();
    for request in &requests {
        let response = post_ok(server, "/v1/chat/completions", request).await;
        sequential.push(chat_content(&response));
    }
    let concurrent = chat_concurrently(server, &requests).await;

    for (index, request) in requests.iter().enumerate() {
        assert_eq!(
            concurrent[index], sequential[index],
            "concurrent and sequential outputs differ for model {}",
            request["model"]
        );
    }
}

/// Builds a qwen request that keeps generating up to its 4000-token limit, because a count to
/// 100000 rarely ends early.
fn endless_request() -> Value {
    chat_request(QWEN, "Count from 1 to 100000, one number per line.", 4000)
}

/// Returns how long a short qwen request takes right now.
async fn time_short_request(server: &Server) -> Duration {
    let started = Instant::now();
    post_ok(server, "/v1/chat/completions", &chat_request(QWEN, "Say hi.", 8)).await;
    started.elapsed()
}

/// Checks that a short request after an abandoned one is not held up by it.
///
/// qwen's worker runs one generation at a time. If the abandoned 4000-token generation kept
/// running, the short request would wait for all of it, which takes over a minute even at 60
/// tokens per second. The bound, three times the short request's time alone plus 5 s, is far
/// below that.
async fn check_not_delayed(server: &Server, baseline: Duration, what: &str) {
    let after = time_short_request(server).await;
    let bound = baseline * 3 + Duration::from_secs(5);
    eprintln!("{what}: a short request took {after:?} (alone: {baseline:?})");
    assert!(
        after < bound,
        "after {what}, a short request took {after:?} (alone: {baseline:?}, bound {bound:?}); \
         the abandoned generation seems to keep running"
    );
}

#[tokio::test]
async fn stream_disconnect_frees_worker() {
    let (server, _lock) = exclusive();
    let baseline = time_short_request(server).await;

    let mut request = endless_request();
    request["stream"] = json!(true);
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .json(&request)
        .send()
        .await
        .expect("send the streamed request");
    assert_eq!(response.status(), StatusCode::OK, "the streamed request was rejected");

    // Read the role chunk and two content chunks, then hang up.
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    while count_events(&received) < 3 {
        let piece = body
            .next()
            .await
            .expect("the stream ended before two content chunks")
            .expect("read the stream");
        received.extend_from_slice(&piece);
    }
    drop(body);

    check_not_delayed(server, baseline, "a dropped stream").await;
}

fn count_events(bytes: &[u8]) -> usize {
    String::from_utf8_lossy(bytes).matches("\n\n").count()
}

#[tokio::test]
async fn non_stream_disconnect_frees_worker() {
    let (server, _lock) = exclusive();
    let baseline = time_short_request(server).await;

    // Give up on a non-streamed request after 2 s. Dropping the future closes the connection.
    let send = client()
        .post(server.url("/v1/chat/completions"))
        .json(&endless_request())
        .send();
    let outcome = tokio::time::timeout(Duration::from_secs(2), send).await;
    assert!(outcome.is_err(), "the 4000-token request finished within 2 s: {outcome:?}");

    check_not_delayed(server, baseline, "a dropped non-streamed request").await;
}

// ---------------------------------------------------------------------------------------------
// Log-probabilities

#[tokio::test]
async fn logprobs_top_three() {
    let (server, _lock) = shared();
    let mut request = chat_request(QWEN, PROSE_PROMPT, 8);
    request["logprobs"] = json!(true);
    request["top_logprobs"] = json!(3);
    let response = post_ok(server, "/v1/chat/completions", &request).await;

    // With finish_reason "length" no end-of-turn token was sampled, so every completion token
    // has an entry.
    assert_eq!(finish_reason(&response), "length", "the answer must run to max_tokens");
    let entries = response["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no choices[0].logprobs.content in {response}"));
    assert_eq!(
        entries.len() as u64,
        usage_field(&response, "completion_tokens"),
        "one logprobs entry per completion token"
    );

    let mut tokens = String::new();
    for entry in entries {
        let token = entry["token"].as_str().expect("entry.token");
        tokens.push_str(token);
        let logprob = entry["logprob"].as_f64().expect("entry.logprob");
        assert!(logprob <= 0.0, "logprob {logprob} > 0 for {token:?}");
        assert_eq!(entry["bytes"], json!(token.as_bytes()), "bytes of {token:?}");

        let top = entry["top_logprobs"].as_array().expect("entry.top_logprobs");
        assert_eq!(top.len(), 3, "top_logprobs of {token:?}: {top:?}");
        let top_values: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().expect("top logprob")).collect();
        assert!(top_values.iter().all(|value| *value <= 0.0), "positive top logprob: {top_values:?}");
        assert!(
            top_values.windows(2).all(|pair| pair[0] >= pair[1]),
            "top_logprobs not sorted by probability: {top_values:?}"
        );
        // Greedy decoding picks the most likely token.
        assert_eq!(top[0]["token"], token, "greedy token is not the top alternative");
        assert!(
            (top_values[0] - logprob).abs() < 1e-4,
            "greedy logprob {logprob} differs from the top alternative's {}",
            top_values[0]
        );
    }
    assert_eq!(tokens, chat_content(&response), "token texts must add up to the content");
}

// ---------------------------------------------------------------------------------------------
// Model listing and health

#[tokio::test]
async fn models_lists_three_ids() {
    let (server, _lock) = shared();
    let reply = get(server, "/v1/models").await;
    assert_eq!(reply.status, StatusCode::OK, "GET /v1/models: {}", reply.text);
    let body = reply.json();

    assert_eq!(body["object"], "list", "object of {body}");
    let data = body["data"].as_array().unwrap_or_else(|| panic!("no data in {body}"));
    let ids: BTreeSet<&str> = data.iter().filter_map(|model| model["id"].as_str()).collect();
    assert_eq!(ids, BTreeSet::from([QWEN, SMOLLM, GEMMA]), "served model ids");
    for model in data {
        assert_eq!(model["object"], "model", "object of {model}");
        assert!(model["created"].is_u64(), "created must be a Unix time: {model}");
        assert!(model["owned_by"].is_string(), "owned_by must be a string: {model}");
    }
}

#[tokio::test]
async fn health_reports_models() {
    let (server, _lock) = shared();
    let reply = get(server, "/health").await;
    assert_eq!(reply.status, StatusCode::OK, "GET /health: {}", reply.text);
    let body = reply.json();

    assert_eq!(body["status"], "ok", "status of {body}");
    let models = body["models"].as_array().unwrap_or_else(|| panic!("no models in {body}"));
    let ids: BTreeSet<&str> = models.iter().filter_map(|model| model["id"].as_str()).collect();
    assert_eq!(ids, BTreeSet::from([QWEN, SMOLLM, GEMMA]), "model ids in /health");
    for model in models {
        assert!(model["load_ms"].is_u64(), "load_ms missing: {model}");
        assert!(model["queue_depth"].is_u64(), "queue_depth missing: {model}");
    }
    let gemma = models.iter().find(|model| model["id"] == GEMMA).expect("gemma3 in /health");
    assert_eq!(gemma["context_length"], GEMMA_CONTEXT, "configured context_length of gemma3");
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Reads a `kB` field such as `VmHWM` from `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let line = status
        .lines()
        .find(|line| line.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{path} has no {field}"));
    let kilobytes: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    kilobytes * 1024
}

/// Server starts whose best load time is compared with the budget.
const LOAD_ATTEMPTS: usize = 3;

#[tokio::test]
async fn gemma_load_time_and_memory() {
    // Exclusive: generation in other tests would slow the load and blur the timing. The best of
    // a few starts is compared with the budget, because a shared machine sometimes stalls a
    // single load by several hundred milliseconds. Peak RSS must hold on every start.
    // Memory is the peak RSS less the file-backed pages (the executable and shared libraries),
    // so that code linked into the server does not count against the model. Measured on the
    // 2-core development VM: load 0.97-1.2 s when quiet (1.8 s in a stall), peak RSS 316.7 MiB
    // of which 13.5 MiB file-backed, which leaves 1.256 x the 241.4 MiB file.
    let (_, _lock) = exclusive();
    let file_size = std::fs::metadata(model_path(GEMMA)).expect("stat the GGUF file").len();
    let rss_budget = file_size as f64 * 1.3;

    let mut load_times = Vec::new();
    for _ in 0..LOAD_ATTEMPTS {
        // Without the built-in tasks, whose sentence encoder would add its own memory.
        let config = format!("builtin_tasks = false\n{}", model_table(GEMMA, None));
        let server = Server::start("gemma-only", &config);
        let peak_rss = proc_status_bytes(server.pid, "VmHWM");
        let file_backed = proc_status_bytes(server.pid, "RssFile");
        let model_rss = peak_rss.saturating_sub(file_backed);
        let (status, body) = server.get_blocking("/health").expect("GET /health");
        assert_eq!(status, 200, "/health of the gemma-only server: {body}");
        let health: Value = serde_json::from_str(&body).expect("/health is JSON");
        let load_ms = health["models"][0]["load_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no models[0].load_ms in {health}"));

        let ratio = model_rss as f64 / file_size as f64;
        println!(
            "gemma3-270m: load_ms {load_ms}, peak RSS {:.1} MiB less {:.1} MiB file-backed = {ratio:.4} x the {:.1} MiB file",
            peak_rss as f64 / 1048576.0,
            file_backed as f64 / 1048576.0,
            file_size as f64 / 1048576.0
        );
        assert!(
            (model_rss as f64) < rss_budget,
            "peak RSS less file-backed pages, {model_rss} bytes, is {ratio:.4} x the file size {file_size}, \
             over the budget of 1.3 x = {rss_budget:.0} bytes"
        );
        load_times.push(load_ms);
    }

    let best = load_times.iter().copied().min().unwrap_or(u64::MAX);
    assert!(
        best < 1500,
        "gemma3-270m took at best {best} ms to load ({load_times:?}); the budget is 1500 ms"
    );
}

#[tokio::test]
async fn error_stop_too_long() {
    let (server, _lock) = shared();
    let mut request = chat_request(QWEN, CAPITAL_PROMPT, 4);
    request["stop"] = json!("x".repeat(2000));
    let reply = post(server, "/v1/chat/completions", &request).await;

    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("stop"), "2000 bytes");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_trailing_data_after_json() {
    let (server, _lock) = shared();
    let body = format!("{} xyz", chat_request(QWEN, CAPITAL_PROMPT, 1));
    let reply = post_raw(server, "/v1/chat/completions", "application/json", body).await;

    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", None, "trailing");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn error_body_not_an_object() {
    let (server, _lock) = shared();
    let reply = post_raw(server, "/v1/chat/completions", "application/json", "[1, 2]").await;

    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", None, "JSON object");
    assert_still_serves(server).await;
}

#[tokio::test]
async fn stream_null_means_not_streamed() {
    let (server, _lock) = shared();
    let mut request = chat_request(QWEN, CAPITAL_PROMPT, 2);
    request["stream"] = Value::Null;
    let response = post_ok(server, "/v1/chat/completions", &request).await;

    assert_eq!(response["object"], "chat.completion", "{response}");
}

#[tokio::test]
async fn error_unsupported_fields() {
    let (server, _lock) = shared();
    let cases = [
        ("tools", json!([{"type": "function", "function": {"name": "f"}}])),
        ("response_format", json!({"type": "json_object"})),
        ("logit_bias", json!({"42": 5})),
        ("presence_penalty", json!(0.5)),
    ];
    for (field, value) in cases {
        let mut request = chat_request(QWEN, CAPITAL_PROMPT, 1);
        request[field] = value;
        let reply = post(server, "/v1/chat/completions", &request).await;
        assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some(field), field);
    }

    let mut neutral = chat_request(QWEN, CAPITAL_PROMPT, 1);
    neutral["presence_penalty"] = json!(0);
    neutral["response_format"] = json!({"type": "text"});
    post_ok(server, "/v1/chat/completions", &neutral).await;
}

#[tokio::test]
async fn retrieve_one_model() {
    let (server, _lock) = shared();
    let reply = get(server, &format!("/v1/models/{QWEN}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let card = reply.json();
    assert_eq!(card["id"], QWEN, "{card}");
    assert_eq!(card["object"], "model", "{card}");

    let missing = get(server, "/v1/models/no-such-model").await;
    assert_api_error(&missing, StatusCode::NOT_FOUND, "invalid_request_error", Some("model"), "no-such-model");
}
