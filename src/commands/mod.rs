//! The commands other than `tierd serve`: `tierd train`, `tierd eval`, `tierd calibrate`,
//! `tierd report`, `tierd key`, `tierd policy` and `tierd bench`. Only `tierd policy` and
//! `tierd bench serve` talk to a running server.

pub mod bench_model;
pub mod bench_serve;
pub mod calibrate;
pub mod escalation_eval;
pub mod eval;
pub mod key;
pub mod labelled_run;
pub mod machine;
pub mod policy;
pub mod report;
pub mod train;

use std::sync::Arc;

use anyhow::{bail, Context};

use crate::classify::setup::load_tasks;
use crate::classify::task_config::BackendConfig;
use crate::classify::{Task, TaskConfig};
use crate::config::Config;
use crate::registry::{Registry, ServedModel};

/// Returns the configuration of task `name`, from the config's tasks or the built-in ones.
pub fn task_config(config: &Config, name: &str) -> anyhow::Result<TaskConfig> {
    let tasks = config.resolved_tasks()?;
    let names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
    tasks
        .into_iter()
        .find(|task| task.name == name)
        .with_context(|| format!("task `{name}` is not configured (tasks: {})", names.join(", ")))
}

/// Checks that `backend`, when given, indexes the task's chain.
pub fn check_backend_index(task: &TaskConfig, backend: Option<usize>) -> anyhow::Result<()> {
    match backend {
        Some(index) if index >= task.backends.len() => bail!(
            "--backend {index} is out of range: task `{}` has {} backends (0 to {})",
            task.name,
            task.backends.len(),
            task.backends.len() - 1
        ),
        _ => Ok(()),
    }
}

/// Loads task `config` with only the models and encoders it uses. Every backend must load.
pub fn load_task(config: &Config, task: TaskConfig) -> anyhow::Result<Arc<Task>> {
    let models = config.resolved_models()?;
    let mut served = Vec::new();
    for backend in &task.backends {
        if let BackendConfig::LlmLabels { model, .. } = backend {
            if served.iter().any(|s: &ServedModel| &s.id == model) {
                continue;
            }
            let Some(model_config) = models.iter().find(|m| &m.id == model) else {
                bail!("task `{}` uses model `{model}`, which is not configured", task.name);
            };
            served.push(ServedModel::load(model_config, config.server.queue_capacity, &config.server.prompt_cache)?);
        }
    }
    let registry = Registry::new(served);
    let encoders = config.resolved_encoders()?;
    let name = task.name.clone();
    let mut task = task;
    // Offline commands need every backend, so a built-in task must load in full here too.
    task.builtin = false;
    let tasks = load_tasks(vec![task], &encoders, &registry, &config.server.encoder_batching(), None, None)?;
    let task = tasks.get(&name).with_context(|| format!("task `{name}` did not load"))?;
    Ok(task)
}
