//! The prompt prefix cache of `/v1/chat/completions` and `/v1/completions`, end to end: real
//! `tierd serve` processes on 127.0.0.1 with the real models.
//!
//! Reusing a cached prefix must not change a single token or log-probability, so every
//! response of the server with the cache is compared with the same request on a server whose
//! cache is disabled. Each test starts its prompts with its own tag, so that tests running at
//! the same time do not reuse each other's entries.
//!
//! Run with `cargo test --release --test prompt_cache`.

mod common;

use std::sync::{Once, OnceLock};

use common::*;
use serde_json::{json, Value};

/// Shortest prefix that the servers reuse, as in the default config.
const MIN_TOKENS: usize = 16;

static CACHED: OnceLock<Server> = OnceLock::new();
static UNCACHED: OnceLock<Server> = OnceLock::new();
static TINY_BUDGET: OnceLock<Server> = OnceLock::new();
static KILL_AT_EXIT: Once = Once::new();

extern "C" fn kill_servers() {
    for server in [CACHED.get(), UNCACHED.get(), TINY_BUDGET.get()].into_iter().flatten() {
        server.kill();
    }
}

/// Starts the server `name` with the `[server.prompt_cache]` table `cache` and `models` on
/// first use. An `atexit` hook kills it when the test binary exits.
fn server(slot: &'static OnceLock<Server>, name: &str, cache: &str, models: &[&str]) -> &'static Server {
    KILL_AT_EXIT.call_once(|| {
        // SAFETY: registers a plain function with no captured state.
        assert_eq!(unsafe { libc::atexit(kill_servers) }, 0, "atexit failed");
    });
    slot.get_or_init(|| {
        let mut config =
            format!("builtin_tasks = false\n[server]\ndefault_max_tokens = 16\n[server.prompt_cache]\n{cache}\n");
        for model in models {
            config.push('\n');
            config.push_str(&model_table(model, None));
        }
        Server::start(name, &config)
    })
}

/// Returns the server with the default prompt cache.
fn cached() -> &'static Server {
    server(&CACHED, "prompt-cache-on", &format!("min_tokens = {MIN_TOKENS}"), &[QWEN, SMOLLM, GEMMA])
}

/// Returns the server with the prompt cache disabled, which gives the reference outputs.
fn uncached() -> &'static Server {
    server(&UNCACHED, "prompt-cache-off", "enabled = false", &[QWEN, SMOLLM, GEMMA])
}

/// Returns the smollm2 server whose budget, 4 KiB, is less than one position: 30 layers × 3 KV
/// heads × 64 values × 8 bytes = 45 KiB.
fn tiny_budget() -> &'static Server {
    let cache = format!("max_bytes = 4096\nmin_tokens = {MIN_TOKENS}");
    server(&TINY_BUDGET, "prompt-cache-tiny", &cache, &[SMOLLM])
}

/// Returns a system prompt of about `rules * 20` tokens that starts with `tag`.
fn system_prompt(tag: &str, rules: usize) -> String {
    let mut text = format!("Session {tag}. You are a careful assistant for a hardware store.\n");
    for rule in 1..=rules {
        text.push_str(&format!(
            "Rule {rule}: answer in plain English, keep the answer under {} words, and mention aisle {}.\n",
            rule * 3 + 10,
            rule * 7 % 23 + 1
        ));
    }
    text
}

/// Builds a greedy chat request with a system and a user message, asking for log-probabilities.
fn chat_with_system(model: &str, system: &str, question: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": true,
        "top_logprobs": 3,
    })
}

fn cached_tokens(response: &Value) -> u64 {
    response["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.prompt_tokens_details.cached_tokens in {response}"))
}

/// Checks that `reused` has the text and log-probabilities of `reference`.
fn assert_same_output(reused: &Value, reference: &Value, what: &str) {
    assert_eq!(reused["choices"][0]["message"], reference["choices"][0]["message"], "message of {what}");
    assert_eq!(reused["choices"][0]["text"], reference["choices"][0]["text"], "text of {what}");
    assert_eq!(reused["choices"][0]["logprobs"], reference["choices"][0]["logprobs"], "logprobs of {what}");
    assert_eq!(reused["choices"][0]["finish_reason"], reference["choices"][0]["finish_reason"], "finish_reason of {what}");
    assert_eq!(usage_field(reused, "prompt_tokens"), usage_field(reference, "prompt_tokens"), "prompt_tokens of {what}");
    assert_eq!(
        usage_field(reused, "completion_tokens"),
        usage_field(reference, "completion_tokens"),
        "completion_tokens of {what}"
    );
}

/// Returns the sum of the samples of `name` whose labels include every pair of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter(|line| labels.iter().all(|(key, value)| line.contains(&format!("{key}=\"{value}\""))))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn shared_system_prompt_is_reused() {
    for model in [QWEN, SMOLLM, GEMMA] {
        let system = system_prompt(&format!("shared-{model}"), 14);
        let first = chat_with_system(model, &system, "Where do I find nails?", 8);
        let second = chat_with_system(model, &system, "Do you sell garden hoses?", 8);

        let warm = post_ok(cached(), "/v1/chat/completions", &first).await;
        let reused = post_ok(cached(), "/v1/chat/completions", &second).await;
        let reference = post_ok(uncached(), "/v1/chat/completions", &second).await;

        let prompt = usage_field(&reused, "prompt_tokens");
        let cached_count = cached_tokens(&reused);
        assert!(prompt > 250, "{model}: the system prompt is only {prompt} tokens long");
        assert!(
            cached_count > 250 && cached_count < prompt,
            "{model}: {cached_count} of {prompt} prompt tokens cached, expected the system prompt"
        );
        assert!(cached_tokens(&warm) < MIN_TOKENS as u64, "{model}: the first request found {warm}");
        assert_eq!(cached_tokens(&reference), 0, "{model}: the disabled cache reported reuse");
        assert_same_output(&reused, &reference, &format!("{model} chat"));
    }

    let metrics = get(cached(), "/metrics").await.text;
    assert!(
        metric_sum(&metrics, "tierd_prompt_cache_tokens_total", &[("model", SMOLLM)]) > 250.0,
        "tierd_prompt_cache_tokens_total of {SMOLLM}:\n{metrics}"
    );
    assert!(metric_sum(&metrics, "tierd_prompt_cache_lookups_total", &[("model", QWEN), ("result", "hit")]) >= 1.0);
    assert!(metric_sum(&metrics, "tierd_prompt_cache_bytes", &[("model", GEMMA)]) > 0.0);
    let disabled = get(uncached(), "/metrics").await.text;
    assert_eq!(metric_sum(&disabled, "tierd_prompt_cache_bytes", &[]), 0.0, "the disabled cache stored bytes");
}

#[tokio::test]
async fn streamed_usage_reports_cached_tokens() {
    let system = system_prompt("stream", 14);
    let first = chat_with_system(SMOLLM, &system, "Where do I find screws?", 8);
    let second = chat_with_system(SMOLLM, &system, "Do you cut keys?", 12);
    // `stream_options` goes only on the streamed copy, because a request that does not stream
    // is rejected with it.
    let mut streamed = second.clone();
    streamed["stream_options"] = json!({"include_usage": true});

    post_ok(cached(), "/v1/chat/completions", &first).await;
    let stream = post_stream(cached(), "/v1/chat/completions", &streamed).await;
    let reference = post_ok(uncached(), "/v1/chat/completions", &second).await;

    let usage = stream.usage();
    let cached_count = usage["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens in the usage chunk");
    assert!(cached_count > 250, "{cached_count} prompt tokens cached in {usage}");
    assert_eq!(usage["prompt_tokens"], reference["usage"]["prompt_tokens"]);
    assert_eq!(stream.text(), chat_content(&reference), "streamed text after reuse");
}

#[tokio::test]
async fn completion_reuses_prefix_past_sliding_window() {
    // Gemma 3's local layers attend to the last 512 positions, so a prefix of about 600 tokens
    // checks that reused keys keep their positions.
    let prefix = system_prompt("completion", 30);
    let first = json!({"model": GEMMA, "prompt": format!("{prefix}Question: where is the paint?\nAnswer:"),
                       "temperature": 0, "max_tokens": 6});
    let mut second = json!({"model": GEMMA, "prompt": format!("{prefix}Question: where are the ladders?\nAnswer:"),
                            "temperature": 0, "max_tokens": 10, "logprobs": 3});

    post_ok(cached(), "/v1/completions", &first).await;
    let reused = post_ok(cached(), "/v1/completions", &second).await;
    let reference = post_ok(uncached(), "/v1/completions", &second).await;

    assert!(usage_field(&reused, "prompt_tokens") > 512, "the prompt does not pass the sliding window");
    assert!(cached_tokens(&reused) > 512, "{reused}");
    assert_same_output(&reused, &reference, "gemma completion");

    second["stream"] = json!(true);
    second["stream_options"] = json!({"include_usage": true});
    let stream = post_stream(cached(), "/v1/completions", &second).await;
    assert_eq!(stream.text(), completion_text(&reference), "streamed completion after reuse");
    assert!(stream.usage()["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(512), "{}", stream.usage());
}

#[tokio::test]
async fn next_turn_reuses_the_answer() {
    // With `include_completion`, the entry keeps the generated tokens, so the next turn of the
    // conversation finds the previous assistant message cached too.
    let system = system_prompt("turns", 14);
    let question = "What should I use to hang a heavy mirror?";
    let first = chat_with_system(SMOLLM, &system, question, 12);
    let answered = post_ok(cached(), "/v1/chat/completions", &first).await;
    let answer = chat_content(&answered);

    let mut next = first.clone();
    next["messages"] = json!([
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And for a light picture frame?"},
    ]);
    let reused = post_ok(cached(), "/v1/chat/completions", &next).await;
    let reference = post_ok(uncached(), "/v1/chat/completions", &next).await;

    let first_prompt = usage_field(&answered, "prompt_tokens");
    assert!(
        cached_tokens(&reused) > first_prompt,
        "{} tokens cached, no more than the first prompt's {first_prompt}",
        cached_tokens(&reused)
    );
    assert_same_output(&reused, &reference, "second turn");
}

#[tokio::test]
async fn tiny_budget_stores_nothing() {
    let system = system_prompt("tiny", 14);
    let first = chat_with_system(SMOLLM, &system, "Where do I find nails?", 8);
    let second = chat_with_system(SMOLLM, &system, "Do you sell rope?", 8);

    post_ok(tiny_budget(), "/v1/chat/completions", &first).await;
    let answered = post_ok(tiny_budget(), "/v1/chat/completions", &second).await;
    let reference = post_ok(uncached(), "/v1/chat/completions", &second).await;

    assert_eq!(cached_tokens(&answered), 0, "a budget under one entry reused a prefix");
    assert_same_output(&answered, &reference, "tiny budget");
    let metrics = get(tiny_budget(), "/metrics").await.text;
    assert_eq!(metric_sum(&metrics, "tierd_prompt_cache_bytes", &[]), 0.0, "bytes stored over the budget");
}

#[test]
fn tiny_budget_logs_warning() {
    const WARNING: &str = "the prompt cache budget cannot hold min_tokens positions";
    // smollm2 has 30 layers × 3 KV heads × 64 values × 8 bytes = 46,080 bytes per position.
    let needed = format!("needed_bytes={}", MIN_TOKENS * 46_080);

    let log = tiny_budget().log();
    let warning = log.lines().find(|line| line.contains(WARNING)).unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(warning.contains("smollm2-135m-instruct"), "{warning}");
    assert!(warning.contains("max_bytes=4096"), "{warning}");
    assert!(warning.contains(&needed), "{warning}");

    let log = cached().log();
    assert!(!log.contains(WARNING), "the 256 MiB default budget raised the warning:\n{log}");
}

#[tokio::test]
async fn concurrent_requests_stay_separate() {
    // Requests that share a prefix, and one that shares nothing, arrive at once: each must get
    // exactly the output it gets alone on the server without the cache.
    let system = system_prompt("concurrent", 14);
    let other = system_prompt("unrelated", 14);
    let requests = [
        chat_with_system(SMOLLM, &system, "Where are the hammers?", 10),
        chat_with_system(SMOLLM, &system, "Do you rent drills?", 10),
        chat_with_system(SMOLLM, &other, "Where is the paint?", 10),
        chat_with_system(SMOLLM, &system, "Can I return a saw?", 10),
        chat_with_system(QWEN, &system, "Where are the hammers?", 10),
    ];

    let sends = requests.iter().map(|request| post_ok(cached(), "/v1/chat/completions", request));
    let concurrent = futures::future::join_all(sends).await;

    let mut reused = 0;
    for (index, request) in requests.iter().enumerate() {
        let reference = post_ok(uncached(), "/v1/chat/completions", request).await;
        assert_same_output(&concurrent[index], &reference, &format!("concurrent request {index}"));
        if cached_tokens(&concurrent[index]) > 250 {
            reused += 1;
        }
    }
    assert!(reused >= 2, "only {reused} of the smollm2 requests with the shared system prompt reused it");
}
