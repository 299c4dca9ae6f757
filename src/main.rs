//! The `tierd` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tierd::classify::setup::load_tasks;
use tierd::commands::bench_model::{BenchModelArgs, OutputFormat as BenchFormat};
use tierd::commands::bench_serve::BenchServeArgs;
use tierd::commands::{self, calibrate::CalibrateArgs, eval::EvalArgs, train::TrainArgs};
use tierd::audit::handle::AuditSink;
use tierd::audit::AuditWriter;
use tierd::audit::report::GroupBy;
use tierd::audit::PriceTable;
use tierd::metrics::{LabelBounds, Metrics};
use tierd::policy::reload::{self, ConfigSource};
use tierd::policy::{locate, Policy};
use tierd::server::served::LOCAL_PROVIDER;
use tierd::commands::policy::{AdminTarget, PolicyCommand, PolicyEdit};
use tierd::commands::report::{Format, ReportArgs};
use tierd::config::Config;
use tierd::registry::{self, Registry, ServedModel};
use tierd::server::{self, AppState};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "tierd", version, about = "Local tier-3 inference server with an OpenAI-compatible API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the configured models and serve the HTTP API.
    Serve {
        /// TOML configuration file; without it every model in <models-dir>/models.toml is served.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1, or the config's server.host].
        #[arg(long)]
        host: Option<String>,
        /// Port to listen on [default: 8080, or the config's server.port].
        #[arg(long)]
        port: Option<u16>,
        /// Folder with models.toml and the fetched models [default: models].
        #[arg(long)]
        models_dir: Option<PathBuf>,
        /// SQLite file of the audit trail [default: tierd-audit.db, or the config's audit.path].
        #[arg(long)]
        audit_db: Option<PathBuf>,
    },
    /// Train a task's embedding head on labelled JSONL data and write it as safetensors.
    Train {
        /// Task whose first embedding_head backend is trained.
        #[arg(long)]
        task: String,
        /// JSONL file of {"text", "label"} lines; repeat to train on several files.
        #[arg(long, required = true)]
        data: Vec<PathBuf>,
        /// Head file to write [default: the backend's `head` path].
        #[arg(long)]
        out: Option<PathBuf>,
        /// L2 penalty on the weights [default: the backend's `l2`, or the trainer's default].
        #[arg(long)]
        l2: Option<f64>,
        /// Weight each class by the inverse of its frequency.
        #[arg(long)]
        balance_classes: bool,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run a task on labelled JSONL data and report accuracy, macro-F1, calibration and
    /// accuracy against coverage.
    Eval {
        #[arg(long)]
        task: String,
        /// JSONL file of {"text", "label"} lines; repeat to evaluate on several files.
        #[arg(long, required = true)]
        data: Vec<PathBuf>,
        /// Run only this backend of the task's chain (0 is the first) on every input.
        #[arg(long)]
        backend: Option<usize>,
        /// Evaluate only the first N examples.
        #[arg(long)]
        limit: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also ask this remote model (PROVIDER/MODEL of the config's [[provider]] tables) for
        /// the label of every example, and report accuracy, local share and cost per threshold.
        #[arg(long, value_name = "PROVIDER/MODEL")]
        escalate_to: Option<String>,
        /// Comma-separated confidence thresholds of the tables
        /// [default: 0,0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.97,0.99].
        #[arg(long, value_delimiter = ',')]
        thresholds: Option<Vec<f64>>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Pick a task's threshold from labelled JSONL data: the one that keeps the most answers
    /// local while the lower bound of their accuracy (95 % Wilson interval) reaches the target.
    Calibrate {
        #[arg(long)]
        task: String,
        /// JSONL file of {"text", "label"} lines; repeat to calibrate on several files.
        #[arg(long, required = true)]
        data: Vec<PathBuf>,
        /// Accuracy the answers kept local must reach, from 0 to 1.
        #[arg(long)]
        target_accuracy: f64,
        /// Share of the data set aside, after a seeded shuffle, to check the chosen threshold on.
        #[arg(long, default_value_t = 0.0)]
        holdout: f64,
        /// Seed of the shuffle of --holdout.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Run only this backend of the task's chain (0 is the first) on every input.
        #[arg(long)]
        backend: Option<usize>,
        /// Use only the first N examples.
        #[arg(long)]
        limit: Option<usize>,
        /// PNG file of the accuracy and coverage curves [default: calibration-TASK.png].
        #[arg(long)]
        chart: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Set the chosen threshold on the server at --url through its admin API.
        #[arg(long)]
        apply: bool,
        /// Base URL of the server --apply changes.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Environment variable that contains an admin token of the server's [[admin_token]] tables.
        #[arg(long, default_value = "TIERD_ADMIN_TOKEN")]
        token_env: String,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Measure speed: of the engine on this machine, or of a running server.
    Bench {
        #[command(subcommand)]
        action: BenchAction,
    },
    /// Print cost, savings, escalation and latency totals from the audit trail.
    Report {
        /// SQLite file of the audit trail, or the postgres:// URL of a shared audit database
        /// (without a password in the URL, PGPASSWORD is used).
        #[arg(long, default_value = "tierd-audit.db")]
        db: String,
        /// Window ending now, such as 7d, 12h or 30m.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// Field the rows are grouped by.
        #[arg(long, value_enum, default_value = "tier")]
        by: GroupBy,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Workflows listed as the largest token consumers.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Create client API keys, or hash existing ones, for the config's [[client_key]] tables.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Show or change the live policy of a running server through its admin API.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
        /// Base URL of the server.
        #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Environment variable that contains an admin token of the server's [[admin_token]] tables.
        #[arg(long, global = true, default_value = "TIERD_ADMIN_TOKEN")]
        token_env: String,
    },
}

#[derive(Subcommand)]
enum BenchAction {
    /// Prefill and decode speed of each model, like llama-bench: mean ± standard deviation
    /// over the repetitions, with load time, memory, the CPU and its SIMD features.
    Model {
        /// A configured model id or a GGUF file; repeat for several [default: every configured model].
        #[arg(long = "model")]
        models: Vec<String>,
        /// Comma-separated prompt lengths timed for prefill.
        #[arg(long, value_delimiter = ',', default_value = "512")]
        prompt_tokens: Vec<usize>,
        /// Tokens decoded one at a time from an empty context; 0 skips the decode test.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Threads of the matmuls [default: the number of logical CPUs].
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        #[arg(long, value_enum, default_value = "table")]
        format: BenchFormat,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Load-test an OpenAI-compatible server: streamed chat requests (or tierd
    /// classifications) at fixed request rates or fixed concurrency, with time to first token,
    /// inter-token and end-to-end latency percentiles, throughput and failures by kind.
    /// Nothing is retried. Only loopback addresses are accepted unless --allow-remote is given.
    Serve {
        // Boxed because its many options would make every `BenchAction` as large.
        #[command(flatten)]
        args: Box<BenchServeArgs>,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Print the task thresholds and route criteria in force.
    Show,
    /// Change a task's threshold, or a route's criteria; the server writes it into its config file.
    Set {
        /// Task whose threshold changes.
        #[arg(long, conflicts_with = "route", required_unless_present = "route")]
        task: Option<String>,
        /// Route whose criteria change.
        #[arg(long)]
        route: Option<String>,
        /// Confidence threshold, from 0 to 1.
        #[arg(long)]
        threshold: Option<f64>,
        /// Route only: mean, min or margin.
        #[arg(long)]
        confidence: Option<String>,
        /// Route only: cascade or pre_route.
        #[arg(long)]
        mode: Option<String>,
        /// Route only: local or redact.
        #[arg(long)]
        pii: Option<String>,
        /// Route only: whether the local answer is returned when every provider fails.
        #[arg(long)]
        local_fallback: Option<bool>,
    },
    /// Print the latest changes, newest first: who, when, old and new values.
    History {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Print a new random key and the [[client_key]] table that accepts it.
    New {
        /// Name that audit records and reports show for requests with this key.
        #[arg(long)]
        name: String,
    },
    /// Print the SHA-256 of the key on standard input, for a [[client_key]] table.
    Hash,
}

#[derive(clap::Args)]
struct CommonArgs {
    /// TOML configuration file; without it the built-in tasks and manifest models are used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder with models.toml and the fetched models [default: models].
    #[arg(long)]
    models_dir: Option<PathBuf>,
}

impl CommonArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(dir) = &self.models_dir {
            config.models_dir = dir.clone();
        }
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            host,
            port,
            models_dir,
            audit_db,
        } => {
            let source = ConfigSource {
                path: config.clone().unwrap_or_default(),
                host,
                port,
                models_dir,
                audit_db,
            };
            let (mut loaded, text) = match &config {
                Some(path) => (Config::load(path)?, std::fs::read_to_string(path).unwrap_or_default()),
                None => (Config::default(), String::new()),
            };
            source.apply_overrides(&mut loaded);
            let policy = Policy::build(loaded, None).map_err(|message| match locate::line_of(&text, &message) {
                Some(line) => anyhow::anyhow!("invalid config file {}, line {line}: {message}", source.path.display()),
                None => anyhow::anyhow!("invalid configuration: {message}"),
            })?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("failed to start the async runtime")?
                .block_on(serve(policy, config.map(|_| source)))
        }
        Command::Train {
            task,
            data,
            out,
            l2,
            balance_classes,
            common,
        } => {
            let config = common.load()?;
            let args = TrainArgs {
                task,
                data,
                out,
                l2,
                balance_classes,
            };
            commands::train::run(&config, &args)
        }
        Command::Eval {
            task,
            data,
            backend,
            limit,
            json,
            escalate_to,
            thresholds,
            common,
        } => {
            let config = common.load()?;
            let args = EvalArgs {
                task,
                data,
                backend,
                limit,
                json,
                escalate_to,
                thresholds,
            };
            commands::eval::run(&config, &args)
        }
        Command::Calibrate {
            task,
            data,
            target_accuracy,
            holdout,
            seed,
            backend,
            limit,
            chart,
            json,
            apply,
            url,
            token_env,
            common,
        } => {
            let config = common.load()?;
            let args = CalibrateArgs {
                chart: chart.unwrap_or_else(|| PathBuf::from(format!("calibration-{task}.png"))),
                task,
                data,
                target_accuracy,
                holdout,
                seed,
                backend,
                limit,
                json,
                apply: apply.then_some(AdminTarget { url, token_env }),
            };
            commands::calibrate::run(&config, &args)
        }
        Command::Bench {
            action:
                BenchAction::Model {
                    models,
                    prompt_tokens,
                    decode_tokens,
                    threads,
                    repetitions,
                    format,
                    common,
                },
        } => {
            let config = common.load()?;
            let args = BenchModelArgs {
                models,
                prompt_tokens,
                decode_tokens,
                threads: threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                repetitions,
                format,
            };
            commands::bench_model::run(&config, &args)
        }
        Command::Bench {
            action: BenchAction::Serve { args, common },
        } => {
            let config = common.load()?;
            commands::bench_serve::run(&config, &args)
        }
        Command::Key { action } => run_key(action),
        Command::Policy {
            action,
            url,
            token_env,
        } => run_policy(action, AdminTarget { url, token_env }),
        Command::Report {
            db,
            since,
            by,
            format,
            top,
        } => commands::report::run(&ReportArgs {
            db,
            since,
            by,
            format,
            top,
        }),
    }
}

async fn serve(mut policy: Policy, source: Option<ConfigSource>) -> anyhow::Result<()> {
    let (models, tasks, encoders) = (policy.models.clone(), policy.tasks.clone(), policy.encoders.clone());
    let config = &policy.config;
    // Fail before binding when a local file is missing, rather than after a partial load.
    for model in &models {
        registry::local_path(model)?;
    }

    let address = format!("{}:{}", config.server.host, config.server.port);
    let address: SocketAddr = tokio::net::lookup_host(&address)
        .await
        .with_context(|| format!("invalid listen address `{address}`"))?
        .next()
        .with_context(|| format!("listen address `{address}` resolves to nothing"))?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to listen on {address}"))?;
    tracing::info!(%address, models = models.len(), "listening; loading models");

    let queue_capacity = config.server.queue_capacity;
    let encoder_batching = config.server.encoder_batching();
    let prompt_cache = config.server.prompt_cache.clone();
    let labels = LabelBounds::new(
        models
            .iter()
            .map(|m| m.id.clone())
            .chain(config.providers.iter().flat_map(|p| p.models.iter().map(|m| m.id.clone())))
            .chain(encoders.iter().map(|e| e.id.clone())),
        config.providers.iter().map(|p| p.name.clone()).chain([LOCAL_PROVIDER.to_string()]),
        tasks.iter().map(|t| t.name.clone()),
        policy.budgets.workflows().map(str::to_string),
        config.metrics.max_workflows,
    );
    let metrics = Arc::new(Metrics::new(labels).context("failed to register the metrics")?);
    let audit = open_audit(config, &policy.prices, metrics).await?;
    if policy.prices.baseline == tierd::audit::Price::default() {
        tracing::warn!(
            "no baseline price: no provider model has tier 1 and `pricing.baseline` is not set, so \
             counterfactual costs and savings read 0"
        );
    }
    if policy.client_keys.required() {
        tracing::info!(keys = config.client_keys.len(), "client keys are required on every endpoint but /health");
    }
    let poll = Duration::from_millis(config.server.config_poll_ms);
    let history = open_history(config).await?;
    // Generations continue from the history, so that its entries never share a number. The
    // stores are blocking clients (PostgreSQL's runs its own runtime), so the read runs off the
    // async threads.
    let (history, latest) = match history {
        Some(store) => tokio::task::spawn_blocking(move || {
            let latest = store.policy_changes(1);
            (Some(store), latest)
        })
        .await
        .context("reading the policy history panicked")?,
        None => (None, Ok(Vec::new())),
    };
    match latest {
        Ok(latest) => {
            if let Some(change) = latest.first() {
                policy.generation = change.generation + 1;
            }
        }
        Err(error) => tracing::warn!(%error, "failed to read the latest policy generation; counting from 1"),
    }
    let state = Arc::new(AppState::new(policy, source, audit.clone(), history));
    if state.config_source.is_some() {
        let interval = (!poll.is_zero()).then_some(poll);
        tokio::spawn(reload::watch(state.clone(), interval));
    }
    let loader_state = state.clone();
    tokio::task::spawn_blocking(move || {
        // Reloads wait until the first models and tasks are in place, because they build on them.
        let _loading = loader_state.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut served = Vec::with_capacity(models.len());
        for model in &models {
            match ServedModel::load(model, queue_capacity, &prompt_cache) {
                Ok(loaded) => served.push(loaded),
                Err(error) => {
                    tracing::error!(%error, "failed to load a model; exiting");
                    std::process::exit(1);
                }
            }
        }
        let registry = Arc::new(Registry::new(served));
        loader_state.registry.store(Some(registry.clone()));
        tracing::info!("all models loaded");

        let metrics = Some(loader_state.audit.metrics.as_ref());
        match load_tasks(tasks, &encoders, &registry, &encoder_batching, metrics, None) {
            Ok(tasks) => {
                if let Err(error) = loader_state.policy().check_route_tasks(&tasks) {
                    tracing::error!(%error, "invalid route; exiting");
                    std::process::exit(1);
                }
                loader_state.tasks.store(Some(Arc::new(tasks)));
                tracing::info!("ready");
            }
            Err(error) => {
                tracing::error!(%error, "failed to load the classification tasks; exiting");
                std::process::exit(1);
            }
        }
    });

    // NOTE: no header-read or idle timeout is set, so a client that sends nothing keeps its
    // connection open. Fine on 127.0.0.1; a public listener needs a proxy that enforces them.
    axum::serve(listener, server::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server failed")?;
    // Every request has finished, so every record is queued: write them before exiting.
    if let Some(writer) = audit.writer.clone() {
        let stats = writer.stats().clone();
        tokio::task::spawn_blocking(move || writer.flush())
            .await
            .context("the audit flush panicked")?;
        tracing::info!(
            written = stats.written.load(std::sync::atomic::Ordering::Relaxed),
            dropped_full = stats.dropped_full.load(std::sync::atomic::Ordering::Relaxed),
            failed = stats.failed.load(std::sync::atomic::Ordering::Relaxed),
            "audit trail flushed"
        );
    }
    tracing::info!("server stopped");
    Ok(())
}

fn run_policy(action: PolicyAction, target: AdminTarget) -> anyhow::Result<()> {
    let command = match action {
        PolicyAction::Show => PolicyCommand::Show,
        PolicyAction::History { limit } => PolicyCommand::History { limit },
        PolicyAction::Set {
            task: Some(task),
            threshold,
            confidence,
            mode,
            pii,
            local_fallback,
            ..
        } => {
            if confidence.is_some() || mode.is_some() || pii.is_some() || local_fallback.is_some() {
                anyhow::bail!("--confidence, --mode, --pii and --local-fallback apply to --route, not --task");
            }
            let threshold = threshold.context("--task needs --threshold")?;
            PolicyCommand::Set(PolicyEdit::TaskThreshold { task, threshold })
        }
        PolicyAction::Set {
            route,
            threshold,
            confidence,
            mode,
            pii,
            local_fallback,
            ..
        } => {
            let route = route.context("give --task or --route")?;
            let mut fields = serde_json::Map::new();
            if let Some(threshold) = threshold {
                fields.insert("threshold".into(), threshold.into());
            }
            for (field, value) in [("confidence", confidence), ("mode", mode), ("pii", pii)] {
                if let Some(value) = value {
                    fields.insert(field.into(), value.into());
                }
            }
            if let Some(local_fallback) = local_fallback {
                fields.insert("local_fallback".into(), local_fallback.into());
            }
            PolicyCommand::Set(PolicyEdit::Route { route, fields })
        }
    };
    commands::policy::run(&target, command)
}

fn run_key(action: KeyAction) -> anyhow::Result<()> {
    match action {
        KeyAction::New { name } => commands::key::print_new_key(&name),
        KeyAction::Hash => commands::key::print_hash_of_stdin(),
    }
}

/// Opens a second connection to the audit store for the history of policy changes, which the
/// admin API writes and reads while the writer thread holds the first.
async fn open_history(config: &Config) -> anyhow::Result<Option<Box<dyn tierd::audit::AuditStore>>> {
    if !config.audit.enabled {
        return Ok(None);
    }
    let audit_config = config.audit.clone();
    let store = tokio::task::spawn_blocking(move || audit_config.open_store())
        .await
        .context("opening the policy history store panicked")??;
    Ok(Some(store))
}

/// Opens the audit database and starts its writer, unless `[audit] enabled = false`; records
/// then feed only `metrics`.
async fn open_audit(config: &Config, prices: &PriceTable, metrics: Arc<Metrics>) -> anyhow::Result<Arc<AuditSink>> {
    let prices = ArcSwap::from_pointee(prices.clone());
    if !config.audit.enabled {
        tracing::info!("the audit trail is disabled; requests are only counted in the metrics");
        return Ok(Arc::new(AuditSink {
            writer: None,
            metrics,
            prices,
            store_text: config.audit.store_text,
        }));
    }
    // The PostgreSQL client blocks on a runtime of its own, which must not start on this one.
    let audit_config = config.audit.clone();
    let store = tokio::task::spawn_blocking(move || audit_config.open_store())
        .await
        .context("opening the audit store panicked")??;
    let retry_window = Duration::from_secs(config.audit.retry_seconds);
    let (writer, _thread) = AuditWriter::spawn(store, config.audit.queue_capacity, retry_window)
        .context("failed to start the audit writer thread")?;
    tracing::info!(store = %config.audit.location(), "writing the audit trail");
    Ok(Arc::new(AuditSink {
        writer: Some(writer),
        metrics,
        prices,
        store_text: config.audit.store_text,
    }))
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown requested; finishing open requests");
}
