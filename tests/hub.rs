//! Loading a model through hf-hub from a pre-filled local cache, offline.
//!
//! The cache is laid out as the Hugging Face Hub client writes it:
//! `$HF_HOME/hub/models--{owner}--{name}/refs/main` names a commit, and
//! `snapshots/{commit}/{file}` is the file (here a symlink to the fetched SmolLM2 model).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = "tierd-test/smollm2-135m-instruct";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fill_cache(home: &Path) {
    let repo_dir = home.join("hub").join("models--tierd-test--smollm2-135m-instruct");
    std::fs::create_dir_all(repo_dir.join("refs")).expect("create refs");
    std::fs::write(repo_dir.join("refs/main"), COMMIT).expect("write ref");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).expect("create snapshot");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m-instruct")
        .join(FILE);
    assert!(model.is_file(), "{} is missing; run scripts/fetch-models.sh", model.display());
    std::os::unix::fs::symlink(&model, snapshot.join(FILE)).expect("link model");
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("bind a free port")
}

#[test]
fn serves_model_from_offline_hub_cache() {
    let home = tempfile::tempdir().expect("temp dir");
    fill_cache(home.path());
    let config = home.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[[model]]\nid = \"smollm2-hub\"\nhf_repo = \"{REPO}\"\nhf_file = \"{FILE}\"\n"),
    )
    .expect("write config");

    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["serve", "--port", &port.to_string(), "--config"])
        .arg(&config)
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tierd");
    let mut server = Server(child);

    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking_client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = server.0.try_wait() {
            let mut log = String::new();
            if let Some(stderr) = server.0.stderr.take() {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            panic!("tierd exited with {status}:\n{log}");
        }
        if client.get(format!("{url}/health")).send().is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "tierd did not become ready within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    let response = client
        .post(format!("{url}/v1/completions"))
        .json(&serde_json::json!({
            "model": "smollm2-hub",
            "prompt": "The capital of France is",
            "max_tokens": 4,
            "temperature": 0
        }))
        .send()
        .expect("send completion");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().expect("json body");
    let text = body["choices"][0]["text"].as_str().unwrap_or_default();
    assert!(!text.is_empty(), "empty completion: {body}");
}

#[test]
fn missing_hub_file_is_reported_offline() {
    let home = tempfile::tempdir().expect("temp dir");
    // The other test of this binary passes its environment to a child process only, so
    // changing this process's environment affects no other test.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let error = tierd::hub::resolve(REPO, None, FILE);
    let message = error.expect_err("an empty cache must not resolve").to_string();
    assert!(message.contains(REPO), "{message}");
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
}

mod reqwest {
    pub use ::reqwest::blocking::Client;

    pub fn blocking_client() -> Client {
        Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .expect("HTTP client")
    }
}
