//! Re-reads the config file when its content changes or on SIGHUP, checks it in full, and swaps
//! in its policy. An invalid file is logged with its line and field, and the policy in force
//! stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::changes::{diff, Changed};
use super::{locate, Policy};
use crate::classify::setup::load_tasks;
use crate::classify::TaskSet;
use crate::config::Config;
use crate::registry::Registry;
use crate::server::AppState;

/// The config file the server was started with, and the command-line options that override
/// parts of it on every read.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub models_dir: Option<PathBuf>,
    pub audit_db: Option<PathBuf>,
}

impl ConfigSource {
    /// Applies the command-line options to `config`.
    pub fn apply_overrides(&self, config: &mut Config) {
        if let Some(host) = &self.host {
            config.server.host = host.clone();
        }
        if let Some(port) = self.port {
            config.server.port = port;
        }
        if let Some(dir) = &self.models_dir {
            config.models_dir = dir.clone();
        }
        if let Some(path) = &self.audit_db {
            config.audit.path = path.clone();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("tierd was started without --config, so there is no file to reload")]
    NoFile,
    #[error("failed to read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The TOML parser's message with the line and column, led by the key path when the error has one.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

/// The outcome of a reload.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub generation: u64,
    /// Sections that changed but apply only after a restart.
    pub restart_needed: Vec<&'static str>,
    /// Task thresholds and route criteria that the new policy changed.
    pub changes: Vec<Changed>,
}

/// Reads the config file, builds its policy and swaps it in. Blocking: it reads the file and
/// may build HTTP clients.
pub fn reload(state: &AppState) -> Result<Reloaded, ReloadError> {
    let source = state.config_source.as_ref().ok_or(ReloadError::NoFile)?;
    let path = source.path.clone();
    let text = std::fs::read_to_string(&path).map_err(|source| ReloadError::Read {
        path: path.clone(),
        source,
    })?;
    let mut config = Config::parse(&text).map_err(|e| ReloadError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    source.apply_overrides(&mut config);

    let invalid = |message: String| ReloadError::Invalid {
        path: path.clone(),
        line: locate::line_of(&text, &message),
        message,
    };
    let running = state.policy();
    let candidate = Policy::build(config.clone(), Some(&running)).map_err(invalid)?;
    let restart_needed = candidate.restart_only_changes(&running);
    let policy = if restart_needed.is_empty() {
        candidate
    } else {
        Policy::build(keep_running_sections(config, &running.config), Some(&running)).map_err(invalid)?
    };

    let loaded = if policy.changes_what_is_loaded(&running) {
        Some(load_changes(state, &running, &policy).map_err(invalid)?)
    } else {
        None
    };

    let generation = policy.generation;
    let changes = diff(&running, &policy);
    *state.applied_config.lock().unwrap_or_else(|p| p.into_inner()) = Some(Sha256::digest(text.as_bytes()).into());
    match loaded {
        Some((registry, tasks)) => {
            // Until the new policy is in force, requests may still look up a model that it
            // drops, so the models of both serve for that moment.
            if let Some(old) = state.registry.load_full() {
                state.registry.store(Some(Arc::new(registry.with_missing_from(&old))));
            }
            state.tasks.store(Some(tasks));
            state.audit.prices.store(Arc::new(policy.prices.clone()));
            state.policy.store(Arc::new(policy));
            state.registry.store(Some(registry));
        }
        None => {
            state.audit.prices.store(Arc::new(policy.prices.clone()));
            state.policy.store(Arc::new(policy));
        }
    }
    Ok(Reloaded {
        generation,
        restart_needed,
        changes,
    })
}

/// Returns `new` with the sections that only a restart applies taken from `running`.
fn keep_running_sections(mut new: Config, running: &Config) -> Config {
    new.server = running.server.clone();
    new.audit = running.audit.clone();
    new.metrics = running.metrics.clone();
    new
}

/// Loads the models that `policy` adds or changes, keeping the unchanged ones of `running`, and
/// the task set on top of them. Blocking: loading a model reads its whole file. The error names
/// what failed to load.
fn load_changes(state: &AppState, running: &Policy, policy: &Policy) -> Result<(Arc<Registry>, Arc<TaskSet>), String> {
    let (Some(registry), Some(tasks)) = (state.registry.load_full(), state.tasks.load_full()) else {
        return Err("models or tasks are still loading; save the file again once the server is ready".into());
    };
    let server = &running.config.server;
    let registry = if policy.changes_models(running) {
        Arc::new(
            Registry::reload(
                &registry,
                &running.models,
                &policy.models,
                server.queue_capacity,
                &server.prompt_cache,
            )
            .map_err(|e| e.to_string())?,
        )
    } else {
        registry
    };
    let tasks = load_tasks(
        policy.tasks.clone(),
        &policy.encoders,
        &registry,
        &server.encoder_batching(),
        Some(state.audit.metrics.as_ref()),
        Some(&tasks),
    )
    .map_err(|e| e.to_string())?;
    policy.check_route_tasks(&tasks)?;
    Ok((registry, Arc::new(tasks)))
}

/// Actor of the policy changes that an edit of the config file makes.
pub const FILE_ACTOR: &str = "config file";

/// Reloads and logs the outcome; `cause` names the trigger.
async fn reload_and_log(state: &Arc<AppState>, cause: &str) {
    let reloading = state.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let _one_at_a_time = reloading.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let reloaded = reload(&reloading)?;
        // A failed history write is logged inside; the reload itself has been applied.
        let _ = reloading.record_changes(FILE_ACTOR, &reloaded);
        Ok::<_, ReloadError>(reloaded)
    })
    .await;
    match outcome {
        Ok(Ok(reloaded)) => {
            tracing::info!(
                cause,
                generation = reloaded.generation,
                changes = reloaded.changes.len(),
                "config reloaded; new requests use the new policy"
            );
            if !reloaded.restart_needed.is_empty() {
                tracing::warn!(
                    sections = %reloaded.restart_needed.join(", "),
                    "these config sections changed but apply only after a restart; the running values stay"
                );
            }
        }
        Ok(Err(error)) => tracing::error!(cause, %error, "config reload rejected; the policy in force stays"),
        Err(error) => tracing::error!(cause, %error, "config reload panicked; the policy in force stays"),
    }
}

/// Watches the config file: reloads on SIGHUP, and when its content changes, checked every
/// `interval` (`None` checks only on SIGHUP). Runs until the server stops.
pub async fn watch(state: Arc<AppState>, interval: Option<Duration>) {
    let Some(source) = state.config_source.clone() else {
        return;
    };
    let mut last = digest(&source.path);
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; the config file is reloaded only when it changes");
            None
        }
    };
    let mut ticker = interval.map(tokio::time::interval);
    loop {
        let hangup_received = async {
            #[cfg(unix)]
            if let Some(signal) = hangup.as_mut() {
                signal.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        let tick = async {
            match ticker.as_mut() {
                Some(ticker) => {
                    ticker.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = hangup_received => {
                last = digest(&source.path);
                reload_and_log(&state, "SIGHUP").await;
            }
            _ = tick => {
                let now = digest(&source.path);
                if now != last {
                    last = now;
                    let applied = *state.applied_config.lock().unwrap_or_else(|p| p.into_inner());
                    if now.is_some() && now == applied {
                        // The admin API wrote and applied this content already.
                        continue;
                    }
                    reload_and_log(&state, "file changed").await;
                }
            }
        }
    }
}

/// Returns the SHA-256 of the file's content, or `None` when it cannot be read (such as while an
/// editor replaces it).
fn digest(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|bytes| Sha256::digest(bytes).into())
}
