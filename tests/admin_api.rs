//! The admin API and `tierd policy` against a real `tierd serve` on 127.0.0.1 with the real
//! qwen and MiniLM models and a mock provider. Changes apply to the next request and land in the
//! config file with its comments kept. The history lists them with the token's name and
//! survives a restart.
//!
//! Run with `cargo test --release --test admin_api`.

mod common;
mod mock_provider;

use std::process::Command;

use common::*;
use mock_provider::MockProvider;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tierd::client_keys::hash_hex;

const TOKEN: &str = "admin-token-for-tests";
const TOKEN_NAME: &str = "budget-owner";

fn config(mock: &str, admin: bool) -> String {
    let admin_table = if admin {
        format!("[[admin_token]]\nname = \"{TOKEN_NAME}\"\nsha256 = \"{}\"\n", hash_hex(TOKEN))
    } else {
        String::new()
    };
    format!(
        r#"# Thresholds are owned by the support team.
builtin_tasks = false

{qwen}
{admin_table}
{frontier}

[[route]]
name = "auto"
local = "{QWEN}"
tier1 = ["frontier/big"]
threshold = 0.6

{task}"#,
        qwen = model_table(QWEN, None),
        task = greeting_task("0.5 # raised when the new intents ship"),
        frontier = frontier_provider(mock),
    )
}

async fn admin(server: &Server, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
    let url = server.url(path);
    let mut request = match method {
        "PUT" => client().put(url),
        "PATCH" => client().patch(url),
        _ => client().get(url),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    read_reply(request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))).await
}

async fn task_threshold(server: &Server) -> f64 {
    get(server, "/v1/tasks").await.json()["data"][0]["threshold"]
        .as_f64()
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn changes_apply_and_are_kept_with_their_history() {
    let mock = MockProvider::start().await;
    let server = Server::start("admin-changes", &config(&mock.base_url, true));

    for token in [None, Some("wrong-token")] {
        let reply = admin(&server, "PUT", "/admin/tasks/greeting/threshold", token, Some(json!({"threshold": 0.9}))).await;
        assert_api_error(&reply, StatusCode::UNAUTHORIZED, "invalid_request_error", None, "admin");
    }
    assert_eq!(task_threshold(&server).await, 0.5, "a rejected request changed the threshold");

    let reply = admin(&server, "PUT", "/admin/tasks/greeting/threshold", Some(TOKEN), Some(json!({"threshold": 0.77}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let change = &reply.json()["changes"][0];
    assert_eq!(change["setting"], "task.greeting.threshold");
    assert_eq!((change["old_value"].as_f64(), change["new_value"].as_f64()), (Some(0.5), Some(0.77)));
    assert_eq!(task_threshold(&server).await, 0.77, "the next request did not see the new threshold");
    let file = std::fs::read_to_string(&server.config_path).expect("read the config");
    assert!(file.contains("threshold = 0.77 # raised when the new intents ship"), "the edited line lost its comment:\n{file}");
    assert!(file.contains("# Thresholds are owned by the support team."), "the edit lost a comment:\n{file}");

    // The file watcher detects the edit, but the API applied it already: no second reload.
    let generation = reply.json()["generation"].as_u64();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let policy = admin(&server, "GET", "/admin/policy", Some(TOKEN), None).await.json();
    assert_eq!(policy["generation"].as_u64(), generation, "the watcher reloaded the API's edit again");

    let patch = json!({"confidence": "min", "threshold": 0.4});
    let reply = admin(&server, "PATCH", "/admin/routes/auto", Some(TOKEN), Some(patch)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let policy = admin(&server, "GET", "/admin/policy", Some(TOKEN), None).await.json();
    let route = &policy["routes"][0];
    assert_eq!((route["confidence"].as_str(), route["threshold"].as_f64()), (Some("min"), Some(0.4)), "{policy}");

    // Bad input names the value and changes nothing.
    let reply = admin(&server, "PUT", "/admin/tasks/greeting/threshold", Some(TOKEN), Some(json!({"threshold": 1.5}))).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("threshold"), "1.5");
    let reply = admin(&server, "PUT", "/admin/tasks/nope/threshold", Some(TOKEN), Some(json!({"threshold": 0.5}))).await;
    assert_api_error(&reply, StatusCode::NOT_FOUND, "invalid_request_error", Some("task"), "nope");
    let reply = admin(&server, "PATCH", "/admin/routes/auto", Some(TOKEN), Some(json!({"confidence": "bogus"}))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(reply.text.contains("confidence"), "{}", reply.text);
    let reply = admin(&server, "PATCH", "/admin/routes/auto", Some(TOKEN), Some(json!({}))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert_eq!(task_threshold(&server).await, 0.77);

    // An edit of the file is recorded too, with the file as its actor.
    let edited = std::fs::read_to_string(&server.config_path)
        .expect("read the config")
        .replace("threshold = 0.77", "threshold = 0.7");
    std::fs::write(&server.config_path, edited).expect("edit the config");
    let started = std::time::Instant::now();
    while task_threshold(&server).await != 0.7 && started.elapsed().as_secs() < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(task_threshold(&server).await, 0.7, "the file edit was not applied");

    let history = admin(&server, "GET", "/admin/history?limit=10", Some(TOKEN), None).await.json();
    let entries = history["data"].as_array().cloned().unwrap_or_default();
    let summary: Vec<(String, String)> = entries
        .iter()
        .map(|e| (e["actor"].as_str().unwrap_or("").to_string(), e["setting"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(summary[0], ("config file".to_string(), "task.greeting.threshold".to_string()), "{history}");
    assert!(summary.contains(&(TOKEN_NAME.to_string(), "route.auto.confidence".to_string())), "{history}");
    assert!(summary.contains(&(TOKEN_NAME.to_string(), "task.greeting.threshold".to_string())), "{history}");
    let reply = admin(&server, "GET", "/admin/history?limit=zero", Some(TOKEN), None).await;
    assert_api_error(&reply, StatusCode::BAD_REQUEST, "invalid_request_error", Some("limit"), "limit");

    // After a restart the policy comes from the edited file and the history from the store.
    let status = server.terminate(std::time::Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "the server did not stop cleanly: {status:?}");
    let kept = std::fs::read_to_string(&server.config_path).expect("read the config");
    let restarted = Server::restart_keeping_audit("admin-changes", &kept);
    assert_eq!(task_threshold(&restarted).await, 0.7);
    let history = admin(&restarted, "GET", "/admin/history", Some(TOKEN), None).await.json();
    assert_eq!(history["data"].as_array().map_or(0, Vec::len), entries.len(), "{history}");
    let latest = history["data"][0]["generation"].as_u64().unwrap_or(0);
    let policy = admin(&restarted, "GET", "/admin/policy", Some(TOKEN), None).await.json();
    assert!(policy["generation"].as_u64() > Some(latest), "generations restarted below the history's: {policy}");
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_command_wraps_the_api() {
    let mock = MockProvider::start().await;
    let server = Server::start("admin-cli", &config(&mock.base_url, true));
    let tierd = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tierd"));
        command
            .arg("policy")
            .args(args)
            .args(["--url", &server.base_url])
            .env("TIERD_ADMIN_TOKEN", TOKEN);
        command.output().expect("run tierd policy")
    };
    let output = tokio::task::block_in_place(|| tierd(&["set", "--task", "greeting", "--threshold", "0.66"]));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(task_threshold(&server).await, 0.66);

    let output = tokio::task::block_in_place(|| tierd(&["set", "--route", "auto", "--pii", "redact"]));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = tokio::task::block_in_place(|| tierd(&["show"]));
    let shown: Value = serde_json::from_slice(&output.stdout).expect("policy JSON");
    assert_eq!(shown["routes"][0]["pii"], "redact", "{shown}");
    let output = tokio::task::block_in_place(|| tierd(&["history", "--limit", "5"]));
    let history: Value = serde_json::from_slice(&output.stdout).expect("history JSON");
    assert_eq!(history["data"][0]["actor"], TOKEN_NAME, "{history}");

    let output = tokio::task::block_in_place(|| tierd(&["set", "--task", "greeting", "--threshold", "2"]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("400"), "{stderr}");
    assert!(stderr.contains("threshold"), "{stderr}");
}

#[tokio::test]
async fn admin_api_is_off_without_tokens() {
    let mock = MockProvider::start().await;
    let server = Server::start("admin-off", &config(&mock.base_url, false));
    let reply = admin(&server, "GET", "/admin/policy", Some(TOKEN), None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);
    assert_eq!(reply.json()["error"]["code"], "admin_api_disabled");
}

#[cfg(unix)]
#[tokio::test]
async fn edit_follows_a_symlink_and_keeps_the_mode() {
    use std::os::unix::fs::PermissionsExt;

    let mock = MockProvider::start().await;
    let server = Server::start("admin-symlink", &config(&mock.base_url, true));
    // Swap the config for a link to a private file of the same content, as a deployment that
    // keeps its config elsewhere would.
    let real = server.config_path.with_file_name("real.toml");
    std::fs::copy(&server.config_path, &real).expect("copy the config");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::remove_file(&server.config_path).expect("remove the config");
    std::os::unix::fs::symlink(&real, &server.config_path).expect("link the config");

    let reply = admin(&server, "PUT", "/admin/tasks/greeting/threshold", Some(TOKEN), Some(json!({"threshold": 0.66}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let link = std::fs::symlink_metadata(&server.config_path).expect("stat the link");
    assert!(link.file_type().is_symlink(), "the link was replaced by a file");
    let text = std::fs::read_to_string(&real).expect("read the real file");
    assert!(text.contains("threshold = 0.66"), "{text}");
    let mode = std::fs::metadata(&real).expect("stat the real file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the edit changed the file's mode");

    // A config file that disappeared is a conflict that names the file, not a server error.
    std::fs::remove_file(&real).expect("remove the real file");
    let reply = admin(&server, "PUT", "/admin/tasks/greeting/threshold", Some(TOKEN), Some(json!({"threshold": 0.7}))).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text);
    assert!(reply.text.contains("config.toml"), "{}", reply.text);
}
