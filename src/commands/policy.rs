//! `tierd policy show|set|history`: the admin API from the command line.

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

/// The server's address and the environment variable with the admin token.
pub struct AdminTarget {
    /// Base URL of the server, such as `http://127.0.0.1:8080`.
    pub url: String,
    pub token_env: String,
}

/// Change that `tierd policy set` makes.
pub enum PolicyEdit {
    TaskThreshold { task: String, threshold: f64 },
    /// Route criteria as a JSON object of the fields to change.
    Route { route: String, fields: Map<String, Value> },
}

pub enum PolicyCommand {
    Show,
    Set(PolicyEdit),
    History { limit: usize },
}

/// Sends `command` to the admin API and prints the JSON response.
pub fn run(target: &AdminTarget, command: PolicyCommand) -> anyhow::Result<()> {
    let response = send(target, command)?;
    println!("{}", serde_json::to_string_pretty(&response)?);
    Ok(())
}

/// Sends `command` to the admin API and returns its JSON response, or an error with the status
/// and body of a response that is not a success.
pub fn send(target: &AdminTarget, command: PolicyCommand) -> anyhow::Result<Value> {
    let token = admin_token(target)?;
    let base = target.url.trim_end_matches('/');
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let client = reqwest::Client::new();
    let request = match command {
        PolicyCommand::Show => client.get(format!("{base}/admin/policy")),
        PolicyCommand::History { limit } => client.get(format!("{base}/admin/history?limit={limit}")),
        PolicyCommand::Set(PolicyEdit::TaskThreshold { task, threshold }) => client
            .put(format!("{base}/admin/tasks/{}/threshold", encode_segment(&task)))
            .json(&json!({"threshold": threshold})),
        PolicyCommand::Set(PolicyEdit::Route { route, fields }) => {
            if fields.is_empty() {
                bail!("give at least one of --threshold, --confidence, --mode, --pii and --local-fallback");
            }
            client
                .patch(format!("{base}/admin/routes/{}", encode_segment(&route)))
                .json(&Value::Object(fields))
        }
    };
    let (status, body) = runtime.block_on(async {
        let response = request
            .bearer_auth(&token)
            .send()
            .await
            .with_context(|| format!("failed to reach {base}"))?;
        let status = response.status();
        let body = response.text().await.context("failed to read the response")?;
        Ok::<_, anyhow::Error>((status, body))
    })?;
    let parsed = serde_json::from_str::<Value>(&body);
    if !status.is_success() {
        let pretty = parsed
            .ok()
            .and_then(|value| serde_json::to_string_pretty(&value).ok())
            .unwrap_or(body);
        bail!("the server responded {status}: {pretty}");
    }
    parsed.with_context(|| format!("the server responded {status} with a body that is not JSON: {body}"))
}

/// Returns the admin token from the environment variable `target.token_env`.
pub fn admin_token(target: &AdminTarget) -> anyhow::Result<String> {
    std::env::var(&target.token_env)
        .ok()
        .filter(|token| !token.is_empty())
        .with_context(|| format!("set the admin token in the environment variable {}", target.token_env))
}

/// Percent-encodes a task or route name for a URL path segment.
fn encode_segment(name: &str) -> String {
    name.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::encode_segment;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("auto"), "auto");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
