//! The set of models being served: each loaded model with its worker thread and chat template.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::engine::chat_template::GEMMA3_TEMPLATE;
use crate::engine::{ChatMessage, ChatTemplate, ModelWorker, PromptCacheConfig};
use crate::model::{Architecture, LoadedModel, ModelError};

pub struct ServedModel {
    pub id: String,
    pub model: Arc<LoadedModel>,
    pub worker: ModelWorker,
    pub template: Option<ChatTemplate>,
    /// Context window served, in tokens.
    pub context_length: usize,
    /// Unix time at which the model finished loading.
    pub created: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model `{id}`: file {path} not found; run scripts/fetch-models.sh or fix `path`")]
    FileNotFound { id: String, path: PathBuf },
    #[error("model `{id}`: {source}")]
    Model { id: String, source: ModelError },
    #[error("model `{id}`: {source}")]
    Hub {
        id: String,
        source: crate::hub::HubError,
    },
    #[error("model `{id}`: chat template: {message}")]
    Template { id: String, message: String },
    #[error("model `{id}`: failed to start its worker thread: {source}")]
    Worker { id: String, source: std::io::Error },
}

/// Returns the model's local file after checking that it exists, or `None` for a hub model,
/// whose file is fetched at load time.
pub fn local_path(config: &ModelConfig) -> Result<Option<PathBuf>, LoadError> {
    match &config.path {
        Some(path) if path.is_file() => Ok(Some(path.clone())),
        Some(path) => Err(LoadError::FileNotFound {
            id: config.id.clone(),
            path: path.clone(),
        }),
        None => Ok(None),
    }
}

/// Returns the model's GGUF file: its local `path`, or the file fetched from the hub (or found
/// in the hub cache) for a hub model. Blocking.
pub fn model_file(config: &ModelConfig) -> Result<PathBuf, LoadError> {
    match local_path(config)? {
        Some(path) => Ok(path),
        None => {
            let repo = config.hf_repo.as_deref().unwrap_or_default();
            let file = config.hf_file.as_deref().unwrap_or_default();
            crate::hub::resolve(repo, config.hf_revision.as_deref(), file).map_err(|source| LoadError::Hub {
                id: config.id.clone(),
                source,
            })
        }
    }
}

impl ServedModel {
    /// Loads the model's weights and tokenizer and starts its worker, with a queue of
    /// `queue_capacity` requests and the prompt cache that `prompt_cache` sets. Blocking.
    pub fn load(config: &ModelConfig, queue_capacity: usize, prompt_cache: &PromptCacheConfig) -> Result<Self, LoadError> {
        let id = config.id.clone();
        let path = model_file(config)?;

        let model = LoadedModel::load(&path).map_err(|source| LoadError::Model {
            id: id.clone(),
            source,
        })?;
        let template = chat_template(config, &model)?;
        let model_context = model.network.hparams().context_length;
        let context_length = config
            .context_length
            .map_or(model_context, |limit| limit.min(model_context));

        tracing::info!(
            model = %id,
            path = %path.display(),
            architecture = model.network.hparams().architecture.as_str(),
            size_mb = model.file_size / 1_000_000,
            load_ms = model.load_time.as_millis() as u64,
            context_length,
            "model loaded"
        );

        let model = Arc::new(model);
        let worker = ModelWorker::spawn(&id, model.clone(), queue_capacity, prompt_cache)
            .map_err(|source| LoadError::Worker { id: id.clone(), source })?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Self {
            id,
            model,
            worker,
            template,
            context_length,
            created,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.model.tokenizer
    }

    /// Renders chat messages to prompt tokens with the model's template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Option<Vec<u32>>, String> {
        let Some(template) = &self.template else {
            return Ok(None);
        };
        let text = template.render(messages).map_err(|e| e.to_string())?;
        // A template that writes the BOS token itself must not get a second one.
        let bos_text = self
            .model
            .special
            .bos
            .and_then(|id| self.model.tokenizer.id_to_token(id));
        let template_has_bos = bos_text.is_some_and(|bos| text.starts_with(&bos));
        self.encode(&text, !template_has_bos).map(Some)
    }

    /// Tokenizes `text`, adding BOS when the model wants it and `add_special` is set.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        let encoding = self
            .model
            .tokenizer
            .encode_fast(text, add_special)
            .map_err(|e| e.to_string())?;
        Ok(encoding.get_ids().to_vec())
    }
}

fn chat_template(config: &ModelConfig, model: &LoadedModel) -> Result<Option<ChatTemplate>, LoadError> {
    let source = match (&config.chat_template, &model.chat_template) {
        (Some(configured), _) => Some(configured.clone()),
        (None, Some(embedded)) => Some(embedded.clone()),
        (None, None) if model.network.hparams().architecture == Architecture::Gemma3 => {
            Some(GEMMA3_TEMPLATE.to_string())
        }
        (None, None) => None,
    };
    let Some(source) = source else {
        tracing::warn!(model = %config.id, "no chat template: only /v1/completions will work");
        return Ok(None);
    };

    let token_text = |id: Option<u32>| {
        id.and_then(|id| model.tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    ChatTemplate::new(&source, &token_text(model.special.bos), &token_text(model.special.eos))
        .map(Some)
        .map_err(|e| LoadError::Template {
            id: config.id.clone(),
            message: e.to_string(),
        })
}

/// All served models, in configuration order.
pub struct Registry {
    models: HashMap<String, Arc<ServedModel>>,
    order: Vec<String>,
}

impl Registry {
    pub fn new(models: Vec<ServedModel>) -> Self {
        let order = models.iter().map(|m| m.id.clone()).collect();
        let models = models
            .into_iter()
            .map(|m| (m.id.clone(), Arc::new(m)))
            .collect();
        Self { models, order }
    }

    /// Builds the registry of `configs` for a reload: a model whose config equals its config in
    /// `previous_configs` is taken from `previous` as it is, and the others are loaded. Models
    /// left out are unloaded once the last request that uses them ends. Blocking.
    pub fn reload(
        previous: &Registry,
        previous_configs: &[ModelConfig],
        configs: &[ModelConfig],
        queue_capacity: usize,
        prompt_cache: &PromptCacheConfig,
    ) -> Result<Self, LoadError> {
        let mut models = HashMap::new();
        let mut order = Vec::with_capacity(configs.len());
        for config in configs {
            let unchanged = previous_configs
                .iter()
                .find(|old| old.id == config.id)
                .is_some_and(|old| format!("{old:?}") == format!("{config:?}"));
            let model = match previous.get(&config.id) {
                Some(model) if unchanged => model,
                _ => {
                    let model = ServedModel::load(config, queue_capacity, prompt_cache)?;
                    tracing::info!(model = %config.id, "model loaded by a config reload");
                    Arc::new(model)
                }
            };
            order.push(config.id.clone());
            models.insert(config.id.clone(), model);
        }
        for id in previous.order.iter().filter(|id| !models.contains_key(*id)) {
            tracing::info!(model = %id, "model unloaded by a config reload once its last request ends");
        }
        Ok(Self { models, order })
    }

    /// Returns the models of `self`, then those of `other` that `self` lacks. Serves requests
    /// that started under the previous policy while a reload swaps the registry.
    pub fn with_missing_from(&self, other: &Registry) -> Self {
        let mut models = self.models.clone();
        let mut order = self.order.clone();
        for id in &other.order {
            if let (false, Some(model)) = (models.contains_key(id), other.get(id)) {
                models.insert(id.clone(), model);
                order.push(id.clone());
            }
        }
        Self { models, order }
    }

    pub fn get(&self, id: &str) -> Option<Arc<ServedModel>> {
        self.models.get(id).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.order.iter().filter_map(|id| self.models.get(id))
    }
}
