//! Live config reloads against a real `tierd serve` on 127.0.0.1 with the real MiniLM encoder.
//! An edited threshold applies to the next request. An invalid edit is logged with its line and
//! leaves the policy in force. SIGHUP reloads when polling is off.
//!
//! Run with `cargo test --release --test live_config`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::json;

/// Returns a config with one classification task at `threshold`, checked for changes every
/// `poll_ms` milliseconds.
fn config(threshold: &str, poll_ms: u64, max_tokens: u64) -> String {
    format!(
        r#"builtin_tasks = false
[server]
config_poll_ms = {poll_ms}
default_max_tokens = {max_tokens}

{qwen}

{task}"#,
        qwen = model_table(QWEN, None),
        task = greeting_task(threshold),
    )
}

/// Returns the 1-based line of `threshold = ...` in `config`.
fn threshold_line() -> usize {
    let text = config("0.5", 0, 1);
    text.lines().position(|line| line.starts_with("threshold =")).map_or(0, |index| index + 1)
}

async fn task_threshold(server: &Server) -> f64 {
    let reply = get(server, "/v1/tasks").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.json()["data"][0]["threshold"].as_f64().unwrap_or(f64::NAN)
}

async fn below_threshold(server: &Server) -> bool {
    let body = post_ok(server, "/v1/classify", &json!({"task": "greeting", "input": "hello there"})).await;
    body["results"][0]["below_threshold"]
        .as_bool()
        .unwrap_or_else(|| panic!("no below_threshold in {body}"))
}

/// Waits until `ready` returns true, checking every 100 ms for at most `limit`.
async fn wait_for(limit: Duration, mut ready: impl AsyncFnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ready().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn file_edits_apply_or_are_rejected() {
    let server = Server::start("live-config-edits", &config("0.5", 200, 16));
    assert_eq!(task_threshold(&server).await, 0.5);
    assert!(!below_threshold(&server).await, "\"hello there\" is a training example, far above 0.5");

    std::fs::write(&server.config_path, config("0.9999", 200, 16)).expect("edit the config");
    let applied = wait_for(Duration::from_secs(10), async || task_threshold(&server).await == 0.9999).await;
    assert!(applied, "the new threshold was not applied; log:\n{}", server.log());
    assert!(below_threshold(&server).await, "the next request did not use the new threshold");
    assert!(server.log().contains("config reloaded"), "{}", server.log());

    // A value out of range: rejected with its line and field, and the old threshold stays.
    std::fs::write(&server.config_path, config("1.5", 200, 16)).expect("edit the config");
    let logged = wait_for(Duration::from_secs(10), async || server.log().contains("config reload rejected")).await;
    assert!(logged, "no rejection logged; log:\n{}", server.log());
    let log = server.log();
    let rejection = log
        .lines()
        .find(|line| line.contains("config reload rejected"))
        .unwrap_or_default();
    assert!(rejection.contains(&format!("line {}", threshold_line())), "{rejection}");
    assert!(rejection.contains("`threshold`"), "{rejection}");
    assert_eq!(task_threshold(&server).await, 0.9999);

    // A TOML syntax error: the parser's message gives the line.
    let broken = config("0.7", 200, 16).replace("threshold = 0.7", "threshold = ");
    std::fs::write(&server.config_path, broken).expect("edit the config");
    let logged = wait_for(Duration::from_secs(10), async || {
        server.log().lines().filter(|l| l.contains("config reload rejected")).count() >= 2
    })
    .await;
    assert!(logged, "no second rejection logged; log:\n{}", server.log());
    let log = server.log();
    let rejection = log.lines().rfind(|line| line.contains("config reload rejected")).unwrap_or_default();
    assert!(rejection.contains(&format!("line {}", threshold_line())), "{rejection}");
    assert_eq!(task_threshold(&server).await, 0.9999);

    // A section that needs a restart is reported and kept, while the threshold applies.
    std::fs::write(&server.config_path, config("0.6", 200, 3)).expect("edit the config");
    let applied = wait_for(Duration::from_secs(10), async || task_threshold(&server).await == 0.6).await;
    assert!(applied, "the threshold beside a restart-only change was not applied; log:\n{}", server.log());
    assert!(server.log().contains("[server]"), "{}", server.log());
    let reply = post(&server, "/v1/chat/completions", &json!({
        "model": QWEN, "messages": [{"role": "user", "content": "Count from one to ten."}], "temperature": 0
    }))
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(usage_field(&reply.json(), "completion_tokens"), 16, "the running default_max_tokens stays");
}

#[tokio::test]
async fn sighup_reloads_without_polling() {
    let server = Server::start("live-config-sighup", &config("0.5", 0, 16));
    std::fs::write(&server.config_path, config("0.8", 0, 16)).expect("edit the config");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(task_threshold(&server).await, 0.5, "the file was reloaded although polling is off");

    // SAFETY: kill has no memory preconditions; the pid is the test's own child.
    let sent = unsafe { libc::kill(server.pid as i32, libc::SIGHUP) };
    assert_eq!(sent, 0, "kill failed");
    let applied = wait_for(Duration::from_secs(10), async || task_threshold(&server).await == 0.8).await;
    assert!(applied, "SIGHUP did not reload; log:\n{}", server.log());
    assert!(server.log().contains("SIGHUP"), "{}", server.log());
}

/// Returns the ids of `/v1/models`.
async fn model_ids(server: &Server) -> Vec<String> {
    let reply = get(server, "/v1/models").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.json()["data"]
        .as_array()
        .map(|models| models.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Returns the `created` time of model `id` in `/v1/models`, which is when it was loaded.
async fn created(server: &Server, id: &str) -> u64 {
    let reply = get(server, &format!("/v1/models/{id}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.json()["created"].as_u64().unwrap_or(0)
}

fn count(log: &str, text: &str) -> usize {
    log.lines().filter(|line| line.contains(text)).count()
}

#[tokio::test]
async fn model_entries_load_and_unload_live() {
    let base = config("0.5", 200, 16);
    let server = Server::start("live-config-models", &base);
    assert_eq!(model_ids(&server).await, [QWEN]);
    let qwen_created = created(&server, QWEN).await;
    // Loaded at different seconds, so a reload of qwen would show in `created`.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // An added model is loaded and served; the unchanged model and encoder are kept.
    let with_smollm = format!("{base}\n{}", model_table(SMOLLM, None));
    std::fs::write(&server.config_path, &with_smollm).expect("edit the config");
    let loaded = wait_for(Duration::from_secs(60), async || model_ids(&server).await.len() == 2).await;
    assert!(loaded, "the added model was not loaded; log:\n{}", server.log());
    let reply = post(&server, "/v1/chat/completions", &chat_request(SMOLLM, "Say hi.", 4)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(created(&server, QWEN).await, qwen_created, "the unchanged model was loaded again");
    let log = server.log();
    assert_eq!(count(&log, "model loaded by a config reload"), 1, "{log}");
    assert_eq!(count(&log, "encoder loaded"), 1, "the unchanged encoder was loaded again:\n{log}");
    assert!(!below_threshold(&server).await, "the task did not survive the reload");

    // A model whose file is missing is rejected, naming the model, and the old set stays.
    let missing = with_smollm.replace("SmolLM2-135M-Instruct.Q4_1.gguf", "missing.gguf");
    std::fs::write(&server.config_path, missing).expect("edit the config");
    let logged = wait_for(Duration::from_secs(10), async || server.log().contains("config reload rejected")).await;
    assert!(logged, "no rejection logged; log:\n{}", server.log());
    let log = server.log();
    let rejection = log.lines().find(|line| line.contains("config reload rejected")).unwrap_or_default();
    assert!(rejection.contains(&format!("model `{SMOLLM}`")), "{rejection}");
    assert!(rejection.contains("missing.gguf"), "{rejection}");
    let reply = post(&server, "/v1/chat/completions", &chat_request(SMOLLM, "Say hi.", 4)).await;
    assert_eq!(reply.status, StatusCode::OK, "the running model was dropped: {}", reply.text);

    // A removed model is no longer served.
    std::fs::write(&server.config_path, &base).expect("edit the config");
    let unloaded = wait_for(Duration::from_secs(10), async || model_ids(&server).await.len() == 1).await;
    assert!(unloaded, "the removed model is still listed; log:\n{}", server.log());
    let reply = post(&server, "/v1/chat/completions", &chat_request(SMOLLM, "Say hi.", 4)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text);
    assert!(server.log().contains("model unloaded by a config reload"), "{}", server.log());
    assert_eq!(created(&server, QWEN).await, qwen_created);

    // A changed task definition is rebuilt: a third label appears.
    let three_labels = base.replace(
        "[[task.backend]]",
        "[[task.label]]\nname = \"thanks\"\nexamples = [\"thank you so much\", \"many thanks\"]\n[[task.backend]]",
    );
    std::fs::write(&server.config_path, three_labels).expect("edit the config");
    let rebuilt = wait_for(Duration::from_secs(30), async || {
        get(&server, "/v1/tasks").await.json()["data"][0]["labels"].as_array().map(Vec::len) == Some(3)
    })
    .await;
    assert!(rebuilt, "the changed task was not rebuilt; log:\n{}", server.log());
    let body = post_ok(&server, "/v1/classify", &json!({"task": "greeting", "input": "many thanks"})).await;
    assert_eq!(body["results"][0]["label"], "thanks", "{body}");
}
