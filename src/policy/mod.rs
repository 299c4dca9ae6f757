//! The live policy: every part of the config that may change while the server runs, checked
//! as a whole and swapped in at once.
//!
//! A request takes the policy in force when it starts and keeps it until it ends, so a change
//! never applies to half a request. `reload` re-reads the config file when it changes or on
//! SIGHUP, and `locate` finds the line of the field that a validation error names.
//!
//! `[server]`, `[audit]` and `[metrics]` are fixed when the server starts. A changed file
//! applies the rest, and the log names the sections that need a restart. Changed models,
//! encoders and tasks are loaded before the swap, and unchanged ones are kept as they are.

pub mod changes;
pub mod locate;
pub mod reload;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use crate::audit::PriceTable;
use crate::budget::Budgets;
use crate::classify::{TaskConfig, TaskSet};
use crate::client_keys::ClientKeys;
use crate::config::{Config, ConfigError, EncoderConfig, ModelConfig};
use crate::routing::config::RouteMode;
use crate::routing::route::Route;
use crate::routing::upstreams::Upstreams;

/// The parts of the config in force for new requests.
pub struct Policy {
    /// The config this policy was built from.
    pub config: Config,
    /// Routes by the model name clients request.
    pub routes: HashMap<String, Route>,
    pub client_keys: ClientKeys,
    /// Tokens of the admin API; none configured disables it.
    pub admin_tokens: ClientKeys,
    pub budgets: Budgets,
    /// Confidence threshold of each task, by task name.
    pub thresholds: HashMap<String, f64>,
    pub prices: PriceTable,
    /// Remote providers; kept from the previous policy while their config is unchanged, so
    /// breaker states and latency averages survive a reload.
    pub upstreams: Arc<Upstreams>,
    /// The models, tasks and encoders the config resolves to. A reload that changes them loads
    /// what changed before the policy is swapped in.
    pub models: Vec<ModelConfig>,
    pub tasks: Vec<TaskConfig>,
    pub encoders: Vec<EncoderConfig>,
    /// Counts the policies since the start: 1 for the first.
    pub generation: u64,
}

impl Policy {
    /// Checks `config` in full and builds its policy. `previous` is the policy in force, whose
    /// providers are kept when their config is unchanged. The message names the field at fault.
    pub fn build(config: Config, previous: Option<&Policy>) -> Result<Self, String> {
        let models = config.resolved_models().map_err(message)?;
        let tasks = config.resolved_tasks().map_err(message)?;
        let encoders = config.encoders_for(&tasks).map_err(message)?;
        let resilience = config.validate_routing(&models, &tasks).map_err(message)?;
        let routes = config
            .routes
            .iter()
            .map(|route| Route::new(route.clone()).map(|route| (route.name().to_string(), route)))
            .collect::<Result<HashMap<_, _>, _>>()?;
        let client_keys = ClientKeys::new(&config.client_keys)?;
        let admin_tokens = ClientKeys::from_tables(&config.admin_tokens, "admin_token")?;
        let budgets = Budgets::new(&config.workflows)?;
        let prices = config.pricing.table(&config.providers)?;
        let served: Vec<&str> = models
            .iter()
            .map(|m| m.id.as_str())
            .chain(encoders.iter().map(|e| e.id.as_str()))
            .collect();
        if let Some(unknown) = config.pricing.local.keys().find(|id| !served.contains(&id.as_str())) {
            return Err(format!(
                "`pricing.local` prices `{unknown}`, which is not a served model or encoder ({})",
                served.join(", ")
            ));
        }
        if config.audit.queue_capacity == 0 {
            return Err("`audit.queue_capacity` must be at least 1".into());
        }
        let thresholds = tasks.iter().map(|task| (task.name.clone(), task.threshold)).collect();

        let upstreams = match previous {
            Some(previous)
                if same(&previous.config.providers, &config.providers)
                    && same(&previous.config.resilience, &config.resilience) =>
            {
                previous.upstreams.clone()
            }
            _ => Arc::new(Upstreams::new(&config.providers, resilience).map_err(|e| e.to_string())?),
        };
        Ok(Self {
            config,
            routes,
            client_keys,
            admin_tokens,
            budgets,
            thresholds,
            prices,
            upstreams,
            models,
            tasks,
            encoders,
            generation: previous.map_or(1, |p| p.generation + 1),
        })
    }

    /// Returns the threshold of `task`, or `fallback` (the loaded task's own) when the policy
    /// has none, which happens only for a task the running server did not load from the config.
    pub fn threshold(&self, task: &str, fallback: f64) -> f64 {
        self.thresholds.get(task).copied().unwrap_or(fallback)
    }

    /// Checks each pre-routing route against the labels of its route task as loaded, because a
    /// built-in task whose models are missing is left out when the tasks load.
    pub fn check_route_tasks(&self, tasks: &TaskSet) -> Result<(), String> {
        for route in self.routes.values() {
            let labels: Vec<String> = tasks
                .get(&route.config.route_task)
                .map(|task| task.labels.iter().map(|l| l.name.clone()).collect())
                .unwrap_or_default();
            if route.config.mode == RouteMode::PreRoute && labels.is_empty() {
                return Err(format!(
                    "route `{}`: its route task `{}` did not load",
                    route.name(),
                    route.config.route_task
                ));
            }
            route.check_route_labels(&labels)?;
        }
        Ok(())
    }

    /// Returns whether the models, encoders or task definitions (other than thresholds) of
    /// `self` differ from those of `running`, so that a reload must load models or tasks.
    pub fn changes_what_is_loaded(&self, running: &Policy) -> bool {
        self.changes_models(running)
            || !same(&self.encoders, &running.encoders)
            || !same(&without_thresholds(&self.tasks), &without_thresholds(&running.tasks))
    }

    pub fn changes_models(&self, running: &Policy) -> bool {
        !same(&self.models, &running.models)
    }

    /// Returns the sections of `self` that differ from `running` and that only a restart
    /// applies; `self` keeps the running values of those sections.
    pub fn restart_only_changes(&self, running: &Policy) -> Vec<&'static str> {
        let (new, old) = (&self.config, &running.config);
        let mut changed = Vec::new();
        if !same(&new.server, &old.server) {
            changed.push("[server]");
        }
        if !same(&new.audit, &old.audit) {
            changed.push("[audit]");
        }
        if !same(&new.metrics, &old.metrics) {
            changed.push("[metrics]");
        }
        changed
    }
}

/// Returns the text of a config error, without the "invalid configuration" prefix that the
/// caller adds with the file and line.
fn message(error: ConfigError) -> String {
    match error {
        ConfigError::Invalid(message) => message,
        other => other.to_string(),
    }
}

/// Compares two config values by their `Debug` text, which lists every field, so that the
/// config types need not all implement `PartialEq`.
fn same<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn without_thresholds(tasks: &[TaskConfig]) -> Vec<TaskConfig> {
    tasks
        .iter()
        .cloned()
        .map(|mut task| {
            task.threshold = 0.0;
            task
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "builtin_tasks = false\n[[model]]\nid = \"qwen\"\npath = \"qwen.gguf\"\n{extra}"
        );
        toml::from_str(&text).expect("config")
    }

    #[test]
    fn local_price_of_an_unknown_model_is_rejected() {
        let priced = config("[pricing.local]\nqwen = { input_per_mtok = 1.0, output_per_mtok = 1.0 }\n");
        assert!(Policy::build(priced, None).is_ok());
        let typo = config("[pricing.local]\nqwne = { input_per_mtok = 1.0, output_per_mtok = 1.0 }\n");
        let error = Policy::build(typo, None).err().expect("unknown model");
        assert!(error.contains("`qwne`"), "{error}");
    }

    #[test]
    fn restart_only_sections_are_named() {
        let running = Policy::build(config(""), None).expect("running");
        let mut changed = config("[server]\nport = 9999\n");
        changed.tasks = running.config.tasks.clone();
        let candidate = Policy::build(changed, Some(&running)).expect("candidate");
        assert_eq!(candidate.restart_only_changes(&running), ["[server]"]);
        assert_eq!(candidate.generation, 2);
    }
}
