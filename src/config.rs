//! Server configuration: a TOML file, or the built-in default that serves every model in the
//! manifest `models/models.toml`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::classify::encoder::PassLimits;
use crate::classify::encoder_worker::BatchSettings;
use crate::classify::task_config::builtin_tasks;
use crate::classify::TaskConfig;
use crate::audit::config::{AuditConfig, PricingConfig};
use crate::budget::WorkflowConfig;
use crate::client_keys::ClientKeyConfig;
use crate::engine::PromptCacheConfig;
use crate::metrics::MetricsConfig;
use crate::manifest::{Manifest, ManifestError, ModelSource};
use crate::providers::{validate_providers, ProviderConfig};
use crate::routing::config::{ResilienceSettings, RouteConfig};
use crate::routing::resilience::ResilienceConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Folder holding `models.toml` and the model files laid out as `<id>/<file>`.
    #[serde(default = "default_models_dir")]
    pub models_dir: PathBuf,
    /// Models to serve; when empty, every model of the manifest is served.
    #[serde(default, rename = "model")]
    pub models: Vec<ModelConfig>,
    /// Sentence encoders for classification; when empty, every encoder of the manifest.
    #[serde(default, rename = "encoder")]
    pub encoders: Vec<EncoderConfig>,
    /// Classification tasks, served beside the built-in ones unless `builtin_tasks` is false.
    #[serde(default, rename = "task")]
    pub tasks: Vec<TaskConfig>,
    /// Whether to serve the built-in `sentiment`, `intent` and `route` tasks; a configured
    /// task of the same name replaces the built-in one.
    #[serde(default = "default_true")]
    pub builtin_tasks: bool,
    /// Remote APIs that requests escalate to.
    #[serde(default, rename = "provider")]
    pub providers: Vec<ProviderConfig>,
    /// Retries, retry budget and circuit breaker of every provider.
    #[serde(default)]
    pub resilience: ResilienceSettings,
    /// Model names such as `auto` whose chat requests are routed between tiers.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub pricing: PricingConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Keys that clients must send; when empty, the API is open.
    #[serde(default, rename = "client_key")]
    pub client_keys: Vec<ClientKeyConfig>,
    /// Tokens of the admin API, in the same form as client keys; without any, it is disabled.
    #[serde(default, rename = "admin_token")]
    pub admin_tokens: Vec<ClientKeyConfig>,
    /// Prompt budgets by workflow.
    #[serde(default, rename = "workflow")]
    pub workflows: Vec<WorkflowConfig>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub id: String,
    /// Folder with `config.json`, `tokenizer.json` and `model.safetensors`.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Requests that may wait per model before new ones get 429.
    pub queue_capacity: usize,
    /// Classification requests that may wait per sentence encoder before new ones get 429.
    /// Larger than `queue_capacity` because waiting requests are embedded together in one batch.
    pub encoder_queue_capacity: usize,
    /// Maximum time, in microseconds, that an encoder waits after a request arrives for more
    /// requests to embed with it, while the inputs gathered do not fill a forward pass. 0
    /// embeds at once the requests already waiting.
    pub encoder_batch_window_us: u64,
    /// Sequences in one forward pass of an encoder.
    pub encoder_batch_size: usize,
    /// Padded tokens in one forward pass of an encoder: the sequences times the longest of
    /// them. A longer single input runs alone.
    pub encoder_batch_tokens: usize,
    /// `max_tokens` of a request that does not set it.
    pub default_max_tokens: usize,
    /// How often the config file is checked for changes, in milliseconds; 0 reloads it only on
    /// SIGHUP.
    pub config_poll_ms: u64,
    /// Reuse of the KV caches of earlier requests that share a prompt prefix.
    pub prompt_cache: PromptCacheConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 4 * 1024 * 1024,
            queue_capacity: 16,
            encoder_queue_capacity: 256,
            encoder_batch_window_us: DEFAULT_BATCH_WINDOW_US,
            encoder_batch_size: PassLimits::default().max_sequences,
            encoder_batch_tokens: PassLimits::default().max_tokens,
            default_max_tokens: 512,
            config_poll_ms: 1000,
            prompt_cache: PromptCacheConfig::default(),
        }
    }
}

/// Default of `encoder_batch_window_us`: no wait. Under a steady load, requests pile up while
/// the encoder runs and are merged anyway, and a window only delays lone requests. Measured
/// with scripts/bench-classify-vs-python.sh: a 1 ms window merged 4.2 requests per run at 8
/// clients against 4.0 without, and added about 1 ms to a lone request.
const DEFAULT_BATCH_WINDOW_US: u64 = 0;

/// Largest `encoder_batch_window_us`: a longer window adds as much latency to a lone request,
/// and the bound catches a value meant in milliseconds.
const MAX_BATCH_WINDOW_US: u64 = 100_000;

impl ServerConfig {
    /// Returns the queue and batching settings of every sentence encoder.
    pub fn encoder_batching(&self) -> BatchSettings {
        BatchSettings {
            queue_capacity: self.encoder_queue_capacity,
            window: std::time::Duration::from_micros(self.encoder_batch_window_us),
            limits: PassLimits {
                max_sequences: self.encoder_batch_size,
                max_tokens: self.encoder_batch_tokens,
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name clients use in the `model` field.
    pub id: String,
    /// Local GGUF file. Relative paths are resolved against the working directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Hugging Face repository and file, used when `path` is not set.
    #[serde(default)]
    pub hf_repo: Option<String>,
    #[serde(default)]
    pub hf_file: Option<String>,
    #[serde(default)]
    pub hf_revision: Option<String>,
    /// Context window served, in tokens; at most the model's own.
    #[serde(default)]
    pub context_length: Option<usize>,
    /// Jinja chat template replacing the one in the GGUF file.
    #[serde(default)]
    pub chat_template: Option<String>,
}

fn default_models_dir() -> PathBuf {
    PathBuf::from("models")
}

/// A config file that is not valid TOML or does not match the config's types.
///
/// toml's message gives the line, column and expected type but not the key, so `key` adds
/// the full key path (e.g. `server.prompt_cache.max_bytes`) when the error belongs to one.
#[derive(Debug, thiserror::Error)]
#[error("{}{source}", key.as_ref().map(|key| format!("key `{key}`: ")).unwrap_or_default())]
pub struct TomlError {
    pub key: Option<String>,
    pub source: toml::de::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            models_dir: default_models_dir(),
            models: Vec::new(),
            encoders: Vec::new(),
            tasks: Vec::new(),
            builtin_tasks: true,
            providers: Vec::new(),
            resilience: ResilienceSettings::default(),
            routes: Vec::new(),
            audit: AuditConfig::default(),
            pricing: PricingConfig::default(),
            metrics: MetricsConfig::default(),
            client_keys: Vec::new(),
            admin_tokens: Vec::new(),
            workflows: Vec::new(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Parses config TOML, recording the key path of a value of the wrong type.
    pub fn parse(text: &str) -> Result<Self, TomlError> {
        let deserializer = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let path = error.path().to_string();
            // serde_path_to_error writes the root as `.`, which happens for syntax errors and
            // for errors that are about no single key.
            let key = (path != ".").then_some(path);
            TomlError {
                key,
                source: error.into_inner(),
            }
        })
    }

    /// Returns the models to serve: the configured ones, or every manifest model.
    pub fn resolved_models(&self) -> Result<Vec<ModelConfig>, ConfigError> {
        let models = if self.models.is_empty() {
            self.manifest_models()?
        } else {
            self.models.clone()
        };

        let server = &self.server;
        for (name, value) in [
            ("server.max_body_bytes", server.max_body_bytes),
            ("server.queue_capacity", server.queue_capacity),
            ("server.encoder_queue_capacity", server.encoder_queue_capacity),
            ("server.encoder_batch_size", server.encoder_batch_size),
            ("server.encoder_batch_tokens", server.encoder_batch_tokens),
            ("server.default_max_tokens", server.default_max_tokens),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("`{name}` must be at least 1")));
            }
        }
        if server.encoder_batch_window_us > MAX_BATCH_WINDOW_US {
            return Err(ConfigError::Invalid(format!(
                "`server.encoder_batch_window_us` is {} microseconds; it must be at most {MAX_BATCH_WINDOW_US} (0.1 s)",
                server.encoder_batch_window_us
            )));
        }

        server.prompt_cache.validate().map_err(ConfigError::Invalid)?;

        let mut seen = std::collections::HashSet::new();
        for model in &models {
            if model.id.trim().is_empty() {
                return Err(ConfigError::Invalid("a model has an empty `id`".into()));
            }
            if model.context_length == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "model `{}`: `context_length` must be at least 1",
                    model.id
                )));
            }
            if model.path.is_some() && model.hf_repo.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "model `{}` sets both `path` and `hf_repo`; keep one",
                    model.id
                )));
            }
            if !seen.insert(model.id.as_str()) {
                return Err(ConfigError::Invalid(format!("model id `{}` is listed twice", model.id)));
            }
            if model.path.is_none() && model.hf_repo.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "model `{}` needs `path` or `hf_repo`",
                    model.id
                )));
            }
            if model.hf_repo.is_some() && model.hf_file.is_none() && model.path.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "model `{}` sets `hf_repo` but no `hf_file`",
                    model.id
                )));
            }
        }
        if models.is_empty() {
            return Err(ConfigError::Invalid("no models to serve".into()));
        }
        Ok(models)
    }

    /// Returns the tasks to serve, configured ones first, with paths resolved.
    pub fn resolved_tasks(&self) -> Result<Vec<TaskConfig>, ConfigError> {
        let mut tasks = self.tasks.clone();
        if self.builtin_tasks {
            for task in builtin_tasks().map_err(ConfigError::Invalid)? {
                if tasks.iter().any(|t| t.name == task.name) {
                    tracing::info!(task = %task.name, "a configured task replaces the built-in one of the same name");
                } else {
                    tasks.push(task);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for task in &mut tasks {
            task.validate().map_err(ConfigError::Invalid)?;
            if !seen.insert(task.name.clone()) {
                return Err(ConfigError::Invalid(format!("task `{}` is listed twice", task.name)));
            }
            task.resolve_paths(&self.models_dir);
        }
        Ok(tasks)
    }

    /// Checks the providers, the resilience settings, the routes against `models` (the served
    /// model ids) and the escalation of `tasks`, and returns the resilience settings.
    pub fn validate_routing(&self, models: &[ModelConfig], tasks: &[TaskConfig]) -> Result<ResilienceConfig, ConfigError> {
        validate_providers(&self.providers).map_err(ConfigError::Invalid)?;
        let resilience = self.resilience.to_config().map_err(ConfigError::Invalid)?;
        let mut seen = std::collections::HashSet::new();
        for route in &self.routes {
            route.validate(&self.providers).map_err(ConfigError::Invalid)?;
            if !seen.insert(route.name.as_str()) {
                return Err(ConfigError::Invalid(format!("route `{}` is listed twice", route.name)));
            }
            if models.iter().any(|model| model.id == route.name) {
                return Err(ConfigError::Invalid(format!(
                    "route `{}` has the name of a served model; rename one",
                    route.name
                )));
            }
            if !models.iter().any(|model| model.id == route.local) {
                return Err(ConfigError::Invalid(format!(
                    "route `{}`: `local` names `{}`, which is not a served model",
                    route.name, route.local
                )));
            }
            if route.mode == crate::routing::config::RouteMode::PreRoute
                && !tasks.iter().any(|task| task.name == route.route_task)
            {
                return Err(ConfigError::Invalid(format!(
                    "route `{}`: `route_task` names `{}`, which is not a task",
                    route.name, route.route_task
                )));
            }
        }
        for task in tasks {
            if let Some(escalate) = &task.escalate {
                escalate
                    .validate(&task.name, &self.providers)
                    .map_err(ConfigError::Invalid)?;
            }
        }
        Ok(resilience)
    }

    /// Returns the encoders that `tasks` need: none when no task runs an embedding head, so a
    /// server without such tasks starts without the manifest.
    pub fn encoders_for(&self, tasks: &[TaskConfig]) -> Result<Vec<EncoderConfig>, ConfigError> {
        let needed = tasks.iter().flat_map(|task| &task.backends).any(|backend| {
            matches!(backend, crate::classify::task_config::BackendConfig::EmbeddingHead { .. })
        });
        if needed {
            self.resolved_encoders()
        } else {
            Ok(Vec::new())
        }
    }

    /// Returns the encoders that tasks may use: the configured ones, or the manifest's.
    pub fn resolved_encoders(&self) -> Result<Vec<EncoderConfig>, ConfigError> {
        if !self.encoders.is_empty() {
            return Ok(self.encoders.clone());
        }
        let manifest = Manifest::load(&self.models_dir.join("models.toml"))?;
        Ok(manifest
            .encoders
            .into_iter()
            .map(|entry| EncoderConfig {
                path: self.models_dir.join(&entry.id),
                id: entry.id,
            })
            .collect())
    }

    fn manifest_models(&self) -> Result<Vec<ModelConfig>, ConfigError> {
        let manifest = Manifest::load(&self.models_dir.join("models.toml"))?;
        let models = manifest
            .models
            .into_iter()
            .map(|entry| {
                let mut model = ModelConfig {
                    id: entry.id.clone(),
                    path: None,
                    hf_repo: None,
                    hf_file: None,
                    hf_revision: None,
                    context_length: entry.context_length,
                    chat_template: None,
                };
                match entry.source {
                    ModelSource::Pypi { .. } => {
                        model.path = Some(self.models_dir.join(&entry.id).join(&entry.file));
                    }
                    ModelSource::Hf {
                        repo,
                        revision,
                        file,
                    } => {
                        model.hf_repo = Some(repo);
                        model.hf_revision = revision;
                        model.hf_file = Some(file.unwrap_or(entry.file));
                    }
                }
                model
            })
            .collect();
        Ok(models)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        toml::from_str(text).expect("valid TOML config")
    }

    #[test]
    fn zero_limits_are_rejected() {
        for key in [
            "max_body_bytes",
            "queue_capacity",
            "encoder_queue_capacity",
            "encoder_batch_size",
            "encoder_batch_tokens",
            "default_max_tokens",
        ] {
            let config = parse(&format!("[server]\n{key} = 0\n[[model]]\nid = \"m\"\npath = \"m.gguf\"\n"));
            let error = config.resolved_models().expect_err("zero limit").to_string();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn batch_window_over_bound_is_rejected() {
        let model = "[[model]]\nid = \"m\"\npath = \"m.gguf\"\n";
        let config = parse(&format!("[server]\nencoder_batch_window_us = 100001\n{model}"));
        let error = config.resolved_models().expect_err("window over the bound").to_string();
        assert!(error.contains("encoder_batch_window_us"), "{error}");

        let config = parse(&format!("[server]\nencoder_batch_window_us = 0\n{model}"));
        assert!(config.resolved_models().is_ok());
    }

    #[test]
    fn prompt_cache_settings_are_read() {
        let config = parse("[server.prompt_cache]\nmax_bytes = 1024\nmin_tokens = 8\n");
        let cache = &config.server.prompt_cache;
        assert!(cache.enabled);
        assert_eq!(cache.max_bytes, 1024);
        assert_eq!(cache.min_tokens, 8);
        assert!(cache.include_completion);

        let config = parse("[server.prompt_cache]\nenabled = false\n[[model]]\nid = \"m\"\npath = \"m.gguf\"\n");
        assert!(!config.server.prompt_cache.enabled);
        assert!(config.resolved_models().is_ok());
    }

    #[test]
    fn batch_settings_come_from_server() {
        let config = parse("[server]\nencoder_batch_window_us = 2500\nencoder_batch_size = 8\nencoder_batch_tokens = 512\n");
        let settings = config.server.encoder_batching();
        assert_eq!(settings.window, std::time::Duration::from_micros(2500));
        assert_eq!(settings.limits.max_sequences, 8);
        assert_eq!(settings.limits.max_tokens, 512);
        assert_eq!(settings.queue_capacity, 256);
    }

    #[test]
    fn type_error_names_key_path() {
        let error = Config::parse("[server]\n[server.prompt_cache]\nmax_bytes = \"big\"\n")
            .expect_err("string for a usize")
            .to_string();
        assert!(error.contains("`server.prompt_cache.max_bytes`"), "{error}");
        assert!(error.contains("expected usize"), "{error}");
        assert!(error.contains("line 3"), "{error}");
    }

    #[test]
    fn type_error_in_array_names_index() {
        let text = "[[model]]\nid = \"a\"\npath = \"a.gguf\"\n[[model]]\nid = \"b\"\ncontext_length = -1\n";
        let error = Config::parse(text).expect_err("negative context length").to_string();
        assert!(error.contains("`model[1].context_length`"), "{error}");
        assert!(error.contains("line 6"), "{error}");
    }

    #[test]
    fn syntax_error_names_no_key() {
        let error = Config::parse("[server\n").expect_err("unclosed table header");
        assert_eq!(error.key, None);
        assert!(error.to_string().contains("line 1"), "{error}");
    }

    #[test]
    fn zero_prompt_cache_min_tokens_is_rejected() {
        let config = parse("[server.prompt_cache]\nmin_tokens = 0\n[[model]]\nid = \"m\"\npath = \"m.gguf\"\n");
        let error = config.resolved_models().expect_err("zero min_tokens").to_string();
        assert!(error.contains("prompt_cache.min_tokens"), "{error}");
    }

    #[test]
    fn path_and_hub_together_are_rejected() {
        let config = parse("[[model]]\nid = \"m\"\npath = \"m.gguf\"\nhf_repo = \"a/b\"\nhf_file = \"m.gguf\"\n");
        let error = config.resolved_models().expect_err("two sources").to_string();
        assert!(error.contains("both"), "{error}");
    }

    #[test]
    fn configured_task_replaces_builtin() {
        let config = parse(
            "[[task]]\nname = \"sentiment\"\nthreshold = 0.3\n[[task.label]]\nname = \"a\"\n\
             [[task.label]]\nname = \"b\"\n[[task.backend]]\nkind = \"embedding_head\"\nencoder = \"e\"\n",
        );
        let tasks = config.resolved_tasks().unwrap();
        let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["sentiment", "intent", "route"]);
        assert_eq!(tasks[0].threshold, 0.3);
        assert!(!tasks[0].builtin);
        assert!(tasks[1].builtin);
    }

    #[test]
    fn tasks_without_heads_need_no_manifest() {
        let config = parse("builtin_tasks = false\nmodels_dir = \"/nonexistent/models\"\n");
        let tasks = config.resolved_tasks().unwrap();
        assert!(config.encoders_for(&tasks).unwrap().is_empty());

        let config = parse("models_dir = \"/nonexistent/models\"\n");
        let tasks = config.resolved_tasks().unwrap();
        assert!(config.encoders_for(&tasks).is_err(), "the built-in heads need the manifest's encoders");
    }

    #[test]
    fn builtin_tasks_can_be_turned_off() {
        let config = parse("builtin_tasks = false\n");
        assert!(config.resolved_tasks().unwrap().is_empty());
    }

    #[test]
    fn task_paths_resolve_against_models_dir() {
        let config = parse("models_dir = \"/srv/models\"\n");
        let tasks = config.resolved_tasks().unwrap();
        let intent = tasks.iter().find(|t| t.name == "intent").unwrap();
        let crate::classify::task_config::BackendConfig::EmbeddingHead { head, .. } = &intent.backends[0] else {
            panic!("intent's first backend is not a head");
        };
        assert_eq!(head.as_deref(), Some(Path::new("/srv/models/heads/intent/head.safetensors")));
    }

    #[test]
    fn empty_id_and_zero_context_are_rejected() {
        let empty = parse("[[model]]\nid = \" \"\npath = \"m.gguf\"\n");
        assert!(empty.resolved_models().is_err());
        let zero = parse("[[model]]\nid = \"m\"\npath = \"m.gguf\"\ncontext_length = 0\n");
        let error = zero.resolved_models().expect_err("zero context").to_string();
        assert!(error.contains("context_length"), "{error}");
    }
}

