//! `tierd bench serve`: a load generator for OpenAI-compatible servers. It sends streamed chat
//! requests (or tierd classifications) at fixed request rates (open loop) or fixed concurrency
//! (closed loop), and reports time to first token, inter-token latency, end-to-end latency,
//! throughput and failures by kind. With several endpoints it runs the same workload against
//! each in alternating rounds and reports ratios against the first.
//!
//! `args` defines the command line, `endpoint` checks and resolves the URLs, `workload` and `synthetic` build the requests,
//! `schedule` spaces open-loop sends, `load` drives the requests that `request` sends and
//! `stream` times, and `report` and `stats` turn the outcomes into rows.

pub mod args;
pub mod endpoint;
pub mod load;
pub mod progress;
pub mod report;
pub mod request;
pub mod schedule;
pub mod stats;
pub mod stream;
pub mod synthetic;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::chart::latency::{self as chart, EndpointSeries, LatencyChart, LatencyPoint};
use crate::config::Config;
pub use args::{BenchServeArgs, ReportFormat};
use endpoint::{Api, Endpoint};
use load::Batch;
use progress::Progress;
use report::{EndpointInfo, Level, Report, Row, RowBuilder, Setup};
use request::Sender;
use workload::Workload;

/// Rounds per level when several endpoints are compared and `--rounds` is not given.
const COMPARE_ROUNDS: usize = 3;

/// Distinct synthetic prompts per level; a level of more requests reuses them in turn. This
/// bounds the time spent tokenizing prompts for runs that `--duration` ends early.
const MAX_PROMPTS_PER_LEVEL: usize = 1000;

pub fn run(config: &Config, args: &BenchServeArgs) -> anyhow::Result<()> {
    let levels = check_args(args)?;
    let rounds = args.rounds.unwrap_or(if args.urls().len() > 1 { COMPARE_ROUNDS } else { 1 });
    if rounds == 0 || rounds > args.requests {
        bail!("--rounds {rounds} must be from 1 to --requests ({})", args.requests);
    }

    // Every level gets its own prompts, so that no server can answer one level from a prompt
    // cache filled by another. The warm-up requests get their own too.
    let per_level = args.requests.min(MAX_PROMPTS_PER_LEVEL);
    let distinct = levels.len() * per_level + args.warmup;
    let (workload, mut setup) = build_workload(config, args, distinct)?;
    setup.rounds = rounds;
    if workload.api == Api::Chat && args.models.is_empty() && !workload.every_request_has_model() {
        bail!("--model is required: chat requests must name a model (llama.cpp's server accepts any name)");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let report = runtime.block_on(run_levels(args, &levels, rounds, per_level, workload, setup))?;

    match args.format {
        ReportFormat::Table => print!("{}", report::table(&report)),
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    if let Some(path) = &args.output {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("failed to write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.chart {
        draw_chart(&report, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Checks the arguments that clap cannot, and returns the load levels in order.
fn check_args(args: &BenchServeArgs) -> anyhow::Result<Vec<Level>> {
    let endpoints = args.urls().len();
    if args.models.len() > 1 && args.models.len() != endpoints {
        bail!(
            "{} --model values for {endpoints} endpoints: give one for all, or one per endpoint in order",
            args.models.len()
        );
    }
    if args.requests == 0 {
        bail!("--requests must be at least 1");
    }
    if args.duration.is_zero() || args.timeout.is_zero() {
        bail!("--duration and --timeout must be above 0");
    }
    if args.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 1");
    }
    if let Some(rate) = args.rates.iter().find(|rate| !(rate.is_finite() && **rate > 0.0)) {
        bail!("--rate {rate}: a request rate must be a positive number of requests per second");
    }
    if args.concurrency.contains(&0) {
        bail!("--concurrency must be at least 1");
    }
    let levels: Vec<Level> = match (args.rates.is_empty(), args.concurrency.is_empty()) {
        (false, true) => args.rates.iter().map(|&rate| Level::Rate(rate)).collect(),
        (true, false) => args.concurrency.iter().map(|&c| Level::Concurrency(c)).collect(),
        (true, true) => vec![Level::Concurrency(1)],
        (false, false) => bail!("give either --rate (open loop) or --concurrency (closed loop), not both"),
    };
    Ok(levels)
}

/// Reads the prompts file, or builds synthetic prompts, and describes them for the report.
fn build_workload(config: &Config, args: &BenchServeArgs, distinct: usize) -> anyhow::Result<(Workload, Setup)> {
    let mut setup = Setup {
        api: "chat",
        prompts: "synthetic".into(),
        distinct_prompts: distinct,
        prompt_tokens: None,
        prompt_length: None,
        max_tokens: args.max_tokens,
        load: if args.rates.is_empty() { "closed loop" } else { "open loop" },
        arrivals: (!args.rates.is_empty()).then_some(args.arrivals),
        seed: args.seed,
        requests: args.requests,
        duration_seconds: args.duration.as_secs_f64(),
        timeout_seconds: args.timeout.as_secs_f64(),
        rounds: 1,
        warmup_requests: args.warmup,
    };

    let workload = match &args.prompts {
        Some(path) => {
            let workload = Workload::read(path, args.task.as_deref())?;
            if workload.api == Api::Chat && args.task.is_some() {
                bail!("--task applies to classification inputs, but {} contains chat requests", path.display());
            }
            setup.prompts = path.display().to_string();
            setup.distinct_prompts = workload.bodies.len();
            workload
        }
        None => {
            let texts = match tokenizer_file(config, args)? {
                Some((name, file)) => {
                    let tokenizer = load_tokenizer(&file)?;
                    let (texts, miss) = synthetic::exact(&tokenizer, args.prompt_tokens, distinct)?;
                    setup.prompt_length = Some(if miss == 0 {
                        format!("exact, counted by the tokenizer of {name}")
                    } else {
                        format!("counted by the tokenizer of {name}, within {miss} tokens")
                    });
                    texts
                }
                None => {
                    setup.prompt_length = Some(
                        "approximate, at 1.3 tokens per word; name a local model with --tokenizer for exact lengths".into(),
                    );
                    synthetic::approximate(args.prompt_tokens, distinct)
                }
            };
            setup.prompt_tokens = Some(args.prompt_tokens);
            Workload::from_texts(texts, args.task.as_deref())
        }
    };
    if workload.api == Api::Classify {
        setup.api = "classify";
        setup.max_tokens = None;
    }
    Ok((workload, setup))
}

/// Returns the GGUF file whose tokenizer measures synthetic prompts: `--tokenizer`, or else the
/// first `--model` when it names a configured model whose file is here.
fn tokenizer_file(config: &Config, args: &BenchServeArgs) -> anyhow::Result<Option<(String, PathBuf)>> {
    let configured = config.resolved_models()?;
    let local_file = |id: &str| -> Option<PathBuf> {
        let model = configured.iter().find(|m| m.id == id)?;
        crate::registry::model_file(model).ok().filter(|path| path.is_file())
    };
    if let Some(name) = &args.tokenizer {
        if let Some(path) = local_file(name) {
            return Ok(Some((name.clone(), path)));
        }
        let path = PathBuf::from(name);
        if path.is_file() {
            return Ok(Some((name.clone(), path)));
        }
        let ids: Vec<&str> = configured.iter().map(|m| m.id.as_str()).collect();
        bail!("--tokenizer {name}: neither a configured model with a local file ({}) nor a GGUF file", ids.join(", "));
    }
    Ok(args.models.first().and_then(|id| Some((id.clone(), local_file(id)?))))
}

fn load_tokenizer(path: &Path) -> anyhow::Result<tokenizers::Tokenizer> {
    let mut file = std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("failed to read the GGUF metadata of {}", path.display()))?;
    let (tokenizer, _) = crate::tokenizer::load(path, &content)?;
    Ok(tokenizer)
}

/// Runs every level against every endpoint and returns the report. Request `i` of level `l`
/// sends prompt `l * per_level + i % per_level`; the warm-up requests send the prompts after
/// those of the last level.
async fn run_levels(
    args: &BenchServeArgs,
    levels: &[Level],
    rounds: usize,
    per_level: usize,
    workload: Workload,
    setup: Setup,
) -> anyhow::Result<Report> {
    let mut endpoints = Vec::with_capacity(args.urls().len());
    for (index, url) in args.urls().iter().enumerate() {
        let model = args.models.get(index).or(args.models.first()).cloned();
        endpoints.push(Arc::new(Endpoint::resolve(url, workload.api, model, args.allow_remote).await?));
    }
    let plain: Vec<Endpoint> = endpoints.iter().map(|e| Endpoint::clone(e)).collect();
    let sender = Arc::new(Sender::new(&plain, args.api_key.clone(), args.timeout).context("failed to build the HTTP client")?);

    let warmup_start = levels.len() * per_level;
    for endpoint in &endpoints {
        for index in 0..args.warmup {
            let body = workload.body_for(warmup_start + index, endpoint, args.max_tokens);
            if let Err(failure) = sender.send(endpoint, workload.api, &body).await {
                bail!(
                    "the warm-up request to {} failed ({}): {}. Check the URL and --model, or give --warmup 0 to count such failures instead",
                    endpoint.api_url,
                    failure.kind,
                    failure.message
                );
            }
        }
    }

    let planned = (levels.len() * endpoints.len() * args.requests) as u64;
    let progress = Progress::new(planned);
    let mut rows = Vec::new();
    for (level_index, &level) in levels.iter().enumerate() {
        let mut builders: Vec<RowBuilder> = endpoints.iter().map(|_| RowBuilder::default()).collect();
        let mut first = 0;
        for round in 0..rounds {
            let count = args.requests / rounds + usize::from(round < args.requests % rounds);
            let duration = args.duration / rounds as u32;
            let seed = args.seed.wrapping_add(1000 * level_index as u64 + round as u64);
            // Each round starts with the next endpoint, so that none always runs first.
            for step in 0..endpoints.len() {
                let index = (step + round) % endpoints.len();
                let endpoint = &endpoints[index];
                let stage = format!("endpoint {} at {level}, round {}/{rounds}", index + 1, round + 1);
                progress.set_stage(&stage);
                let bodies = (first..first + count)
                    .map(|request| {
                        let prompt = level_index * per_level + request % per_level;
                        Arc::new(workload.body_for(prompt, endpoint, args.max_tokens))
                    })
                    .collect();
                let batch = Batch {
                    sender: sender.clone(),
                    endpoint: endpoint.clone(),
                    api: workload.api,
                    bodies,
                    duration,
                };
                let result = match level {
                    Level::Rate(rate) => {
                        let offsets = schedule::send_offsets(args.arrivals, rate, count, seed);
                        load::open_loop(batch, &offsets, &progress).await
                    }
                    Level::Concurrency(concurrency) => load::closed_loop(batch, concurrency, &progress).await,
                };
                let failed = result.outcomes.iter().filter(|o| o.is_err()).count();
                progress.batch_done(&format!("{stage}: {} sent, {failed} failed", result.outcomes.len()));
                builders[index].add(result);
            }
            first += count;
        }
        for (index, builder) in builders.into_iter().enumerate() {
            rows.push(builder.build(index, &endpoints[index].url, level, workload.api == Api::Chat));
        }
    }
    progress.clear();

    let ratios = report::ratios(&rows);
    Ok(Report {
        tierd_version: env!("CARGO_PKG_VERSION"),
        client_machine: super::machine::Machine::describe(),
        setup,
        endpoints: endpoints
            .iter()
            .map(|e| EndpointInfo {
                url: e.url.clone(),
                api_url: e.api_url.to_string(),
                model: e.model.clone(),
            })
            .collect(),
        rows,
        ratios,
    })
}

fn draw_chart(report: &Report, path: &Path) -> anyhow::Result<()> {
    let percentiles = |latency: Option<stats::Latency>| latency.map(|l| [l.p50, l.p90, l.p99]);
    let point = |row: &Row| LatencyPoint {
        rate: match row.level {
            Level::Rate(rate) => rate,
            Level::Concurrency(_) => row.requests_per_second,
        },
        ttft: percentiles(row.ttft_ms),
        e2e: percentiles(row.e2e_ms),
    };
    let endpoints = report
        .endpoints
        .iter()
        .enumerate()
        .map(|(index, endpoint)| EndpointSeries {
            name: format!("{} {}", index + 1, endpoint.url),
            points: report.rows.iter().filter(|row| row.endpoint == index).map(point).collect(),
        })
        .collect();
    let x_label = if report.setup.load == "open loop" {
        "offered request rate (req/s)"
    } else {
        "achieved request rate (req/s), closed loop"
    };
    let model = report.endpoints.first().and_then(|e| e.model.clone()).unwrap_or_default();
    let title = format!("{} latency {model}: p50 solid (circles), p90 dashed, p99 dotted (triangles)", report.setup.api);
    let chart = LatencyChart {
        title,
        x_label: x_label.into(),
        endpoints,
    };
    chart::draw(&chart, path)?;
    Ok(())
}
