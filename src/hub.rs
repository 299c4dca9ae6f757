//! Model files from the Hugging Face Hub, through hf-hub and its local cache.

use std::path::PathBuf;

use hf_hub::{Cache, Repo, RepoType};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{repo}/{file}` is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")]
    NotCached { repo: String, file: String },
    #[error("failed to download `{repo}/{file}` from the Hugging Face Hub: {message}")]
    Download {
        repo: String,
        file: String,
        message: String,
    },
}

/// Returns the local path of `file` in `repo` at `revision`: from the cache (`HF_HOME`, or
/// `~/.cache/huggingface`) when present, otherwise downloaded into it, unless
/// `HF_HUB_OFFLINE=1`.
pub fn resolve(repo: &str, revision: Option<&str>, file: &str) -> Result<PathBuf, HubError> {
    let revision = revision.unwrap_or("main").to_string();
    let hub_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision);

    let cache = Cache::from_env();
    if let Some(path) = cache.repo(hub_repo.clone()).get(file) {
        return Ok(path);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    if offline {
        return Err(HubError::NotCached {
            repo: repo.to_string(),
            file: file.to_string(),
        });
    }

    let download_error = |message: String| HubError::Download {
        repo: repo.to_string(),
        file: file.to_string(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .build()
        .map_err(|e| download_error(e.to_string()))?;
    api.repo(hub_repo)
        .get(file)
        .map_err(|e| download_error(e.to_string()))
}
