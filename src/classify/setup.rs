//! Builds the served task set from the configuration: loads the encoders the tasks use and
//! each task's heads and prompts.

use std::collections::HashMap;
use std::sync::Arc;

use super::encoder::SentenceEncoder;
use super::encoder_worker::{BatchSettings, EncoderWorker};
use super::task::{Task, TaskResources};
use super::task_config::{BackendConfig, TaskConfig};
use super::TaskSet;
use crate::config::EncoderConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("encoder `{id}` ({path}): {message}")]
    Encoder {
        id: String,
        path: String,
        message: String,
    },
    #[error(transparent)]
    Task(#[from] super::task::TaskLoadError),
}

/// Loads `tasks`. A configured task must load in full. A built-in task instead loses the
/// backends whose encoder, model or files are missing, with a warning, and is left out when
/// none remains, so the server still starts on a partial set of models.
///
/// An encoder that `previous` loaded from the same config is shared rather than loaded again,
/// with the batching it started with. `metrics`, when given, records each new encoder's
/// batch sizes.
pub fn load_tasks(
    tasks: Vec<TaskConfig>,
    encoders: &[EncoderConfig],
    registry: &Registry,
    batching: &BatchSettings,
    metrics: Option<&Metrics>,
    previous: Option<&TaskSet>,
) -> Result<TaskSet, SetupError> {
    let mut tasks = tasks;
    for task in tasks.iter_mut().filter(|task| task.builtin) {
        task.backends.retain(|backend| {
            let available = match backend {
                BackendConfig::EmbeddingHead { encoder, .. } => encoders
                    .iter()
                    .any(|e| &e.id == encoder && e.path.join("model.safetensors").is_file()),
                BackendConfig::LlmLabels { model, .. } => registry.get(model).is_some(),
            };
            if !available {
                tracing::warn!(
                    task = %task.name,
                    backend = backend.kind(),
                    model = backend.model(),
                    "built-in task backend left out: its encoder or model is not available"
                );
            }
            available
        });
    }
    tasks.retain(|task| !task.backends.is_empty());

    let mut loaded_encoders: HashMap<String, Arc<EncoderWorker>> = HashMap::new();
    let mut encoder_configs = Vec::new();
    for task in &tasks {
        for backend in &task.backends {
            let BackendConfig::EmbeddingHead { encoder: id, .. } = backend else {
                continue;
            };
            if loaded_encoders.contains_key(id) {
                continue;
            }
            let Some(config) = encoders.iter().find(|e| &e.id == id) else {
                // Task::load reports the missing encoder with the task's name.
                continue;
            };
            if let Some(worker) = previous.and_then(|set| set.encoder_loaded_from(id, config)) {
                loaded_encoders.insert(id.clone(), worker);
                encoder_configs.push(config.clone());
                continue;
            }
            let error = |message: String| SetupError::Encoder {
                id: id.clone(),
                path: config.path.display().to_string(),
                message,
            };
            let encoder = SentenceEncoder::load(&config.path).map_err(|e| error(e.to_string()))?;
            tracing::info!(
                encoder = %id,
                dim = encoder.dim,
                load_ms = encoder.load_time.as_millis() as u64,
                "encoder loaded"
            );
            let histograms = metrics.map(|metrics| metrics.encoder_batches(id));
            let worker =
                EncoderWorker::spawn(id, encoder, batching, histograms).map_err(|e| error(e.to_string()))?;
            loaded_encoders.insert(id.clone(), Arc::new(worker));
            encoder_configs.push(config.clone());
        }
    }

    let resources = TaskResources {
        encoders: &loaded_encoders,
        registry,
    };
    let mut loaded = Vec::with_capacity(tasks.len());
    for task in &tasks {
        match Task::load(task, &resources) {
            Ok(task) => loaded.push(task),
            Err(error) if task.builtin => {
                tracing::warn!(%error, "built-in task left out");
            }
            Err(error) => return Err(error.into()),
        }
    }
    tracing::info!(
        tasks = %loaded.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "),
        "tasks loaded"
    );
    let encoders = encoder_configs
        .into_iter()
        .filter_map(|config| {
            let worker = loaded_encoders.get(&config.id)?.clone();
            Some((config, worker))
        })
        .collect();
    Ok(TaskSet::new(loaded, encoders))
}
