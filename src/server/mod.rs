//! The HTTP server: an OpenAI-compatible API over the served models.
//!
//! `chat` and `completions` contain the two generation endpoints, with `routed` for chat
//! requests to a route and `served` for the record of how each was served. `classify` contains the
//! classification endpoints, with `classify_escalation` for results sent to providers, and
//! `models` the listing and health routes. `json` and `error` turn bad input into OpenAI-style
//! errors, and `params` validates the sampling fields that both endpoints share. The `audit`
//! middleware starts each inference request's audit record, `auth` checks client keys,
//! `budget` applies the workflow prompt budgets and `metrics` serves `/metrics`.

mod admin;
mod audit;
mod auth;
mod budget;
mod chat;
mod classify;
mod classify_escalation;
mod completions;
pub mod error;
mod json;
mod metrics;
mod models;
pub mod openai;
mod params;
mod routed;
pub mod served;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::sse::Event;
use axum::response::Response;
use axum::routing::{get, patch, post, put};
use axum::Router;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::audit::handle::{AuditHandle, AuditSink};
use crate::classify::TaskSet;
use crate::audit::{AuditError, AuditStore, PolicyChange};
use crate::policy::reload::{ConfigSource, Reloaded};
use crate::policy::Policy;
use crate::engine::generate::Timings;
use crate::engine::{GenerationEvent, GenerationRequest, TokenLogprob};
use crate::registry::{Registry, ServedModel};
use error::ApiError;
use json::BodyLimit;
use openai::Usage;
use served::LOCAL_PROVIDER;

pub const SYSTEM_FINGERPRINT: &str = concat!("tierd-", env!("CARGO_PKG_VERSION"));

pub struct AppState {
    /// The policy in force for new requests; `policy::reload` swaps it.
    pub policy: ArcSwap<Policy>,
    /// The config file and command-line options that reloads read; `None` without `--config`.
    pub config_source: Option<ConfigSource>,
    /// Serialises reloads, which may come from the file watcher, SIGHUP and the admin API at
    /// once.
    pub reload_lock: Mutex<()>,
    /// SHA-256 of the config file content that the last reload applied, so that the file
    /// watcher skips the edits that the admin API has already applied.
    pub applied_config: Mutex<Option<[u8; 32]>>,
    /// The audit store's connection for the history of policy changes; `None` when the audit
    /// trail is disabled.
    pub history: Option<Mutex<Box<dyn AuditStore>>>,
    /// Destination of finished requests' records: the metrics, and the audit store unless
    /// `[audit] enabled = false`.
    pub audit: Arc<AuditSink>,
    /// Set once every model has loaded, and replaced by reloads that change `[[model]]`.
    /// Until then the generation routes return 503.
    pub registry: ArcSwapOption<Registry>,
    /// Set once the tasks' encoders and heads have loaded, after the models, and replaced by
    /// reloads that change models, encoders or tasks.
    pub tasks: ArcSwapOption<TaskSet>,
}

impl AppState {
    pub fn new(
        policy: Policy,
        config_source: Option<ConfigSource>,
        audit: Arc<AuditSink>,
        history: Option<Box<dyn AuditStore>>,
    ) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            config_source,
            reload_lock: Mutex::new(()),
            applied_config: Mutex::new(None),
            history: history.map(Mutex::new),
            audit,
            registry: ArcSwapOption::empty(),
            tasks: ArcSwapOption::empty(),
        }
    }

    /// Returns the policy in force. A request keeps the one it started with.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Appends the changes of a reload to the history, made by `actor`. Blocking. A failed
    /// write is logged, because the change itself has been applied.
    pub fn record_changes(&self, actor: &str, reloaded: &Reloaded) -> Result<(), AuditError> {
        if reloaded.changes.is_empty() {
            return Ok(());
        }
        let Some(history) = &self.history else {
            return Ok(());
        };
        let time_ms = audit::unix_time_ms();
        let changes: Vec<PolicyChange> = reloaded
            .changes
            .iter()
            .map(|change| PolicyChange {
                time_ms,
                actor: actor.to_string(),
                setting: change.setting.clone(),
                old_value: change.old_value.clone(),
                new_value: change.new_value.clone(),
                generation: reloaded.generation,
            })
            .collect();
        let mut store = history.lock().unwrap_or_else(|p| p.into_inner());
        let written = store.write_policy_changes(&changes);
        if let Err(error) = &written {
            tracing::error!(%error, actor, changes = changes.len(), "failed to record policy changes in the history");
        }
        written
    }

    fn registry(&self) -> Result<Arc<Registry>, ApiError> {
        self.registry.load_full().ok_or_else(ApiError::loading)
    }

    fn tasks(&self) -> Result<Arc<TaskSet>, ApiError> {
        self.tasks.load_full().ok_or_else(ApiError::loading)
    }
}

/// The id of one request: the client's `X-Request-Id` when it sends one, otherwise a new UUID.
#[derive(Clone)]
pub struct RequestId(pub String);

static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.policy().config.server.max_body_bytes;
    let admin = Router::new()
        .route("/admin/policy", get(admin::show_policy))
        .route("/admin/tasks/{task}/threshold", put(admin::set_task_threshold))
        .route("/admin/routes/{route}", patch(admin::change_route))
        .route("/admin/history", get(admin::history))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin::authenticate_admin));
    Router::new()
        .merge(admin)
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/classify", post(classify::classify))
        .route("/v1/tasks", get(classify::list_tasks))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{id}", get(models::retrieve_model))
        .route("/metrics", get(metrics::metrics))
        .route("/health", get(models::health))
        .fallback(models::not_found)
        .method_not_allowed_fallback(models::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        // Each layer wraps the ones above it, so the audit record exists before authentication
        // and a rejected key is recorded too.
        .layer(middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), audit::audit_request))
        .layer(middleware::from_fn(move |mut request: Request, next: Next| {
            request.extensions_mut().insert(BodyLimit(limit));
            request_span(request, next)
        }))
        .with_state(state)
}

/// Wraps each request in a `tracing` span carrying its id, and echoes the id in the response.
async fn request_span(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let path_is_health = request.uri().path() == "/health";

    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = std::time::Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let ms = started.elapsed().as_millis() as u64;
    span.in_scope(|| {
        // Health probes arrive every few seconds from load balancers; keep them out of the
        // default log.
        if path_is_health {
            tracing::debug!(status, ms, "response");
        } else {
            tracing::info!(status, ms, "response");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER.clone(), value);
    }
    response
}

/// A request accepted by a model's worker.
pub struct Submitted {
    pub events: mpsc::Receiver<GenerationEvent>,
    model: String,
    /// Logged with the result, because a stream outlives the request's span.
    request_id: String,
    /// The request's audit record, updated when the generation finishes or is cut.
    audit: Option<AuditHandle>,
    prompt_tokens: usize,
    produced: Arc<AtomicUsize>,
    finished: bool,
}

/// The whole output of a non-streamed request.
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: &'static str,
    pub usage: Usage,
}

pub fn submit(
    served: &Arc<ServedModel>,
    request: GenerationRequest,
    audit: Option<AuditHandle>,
) -> Result<Submitted, ApiError> {
    let request_id = request.request_id.clone();
    let prompt_tokens = request.prompt_tokens.len();
    let produced = request.produced.clone();
    let events = served
        .worker
        .submit(request)
        .map_err(|full| ApiError::overloaded(format!("{full}; retry later."), 1))?;
    Ok(Submitted {
        events,
        model: served.id.clone(),
        request_id,
        audit,
        prompt_tokens,
        produced,
        finished: false,
    })
}

impl Drop for Submitted {
    /// Records a generation that the client left before it finished, with the tokens that
    /// were generated by then.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(audit) = &self.audit {
            let produced = self.produced.load(Ordering::Relaxed) as u64;
            let (prompt, model) = (self.prompt_tokens as u64, self.model.clone());
            audit.update(|record| {
                record.tier = 3;
                record.provider = LOCAL_PROVIDER.to_string();
                record.model = model;
                record.input_tokens = prompt;
                record.output_tokens = produced;
                record.status = CLIENT_CLOSED;
                record.error = Some("the client closed the connection before the generation finished".into());
            });
        }
    }
}

/// Status recorded for a request whose client left before the response ended, as nginx logs it.
pub const CLIENT_CLOSED: u16 = 499;

impl Submitted {
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(event) = self.events.recv().await {
            match event {
                GenerationEvent::Delta {
                    text: delta,
                    logprobs: tokens,
                } => {
                    text.push_str(&delta);
                    logprobs.extend(tokens);
                }
                GenerationEvent::Finished {
                    reason,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    timings,
                } => {
                    self.log_finished(reason.as_str(), prompt_tokens, cached_tokens, completion_tokens, &timings);
                    self.record_finished(prompt_tokens, completion_tokens, &timings, &text);
                    return Ok(Collected {
                        text,
                        logprobs,
                        finish_reason: reason.as_str(),
                        usage: Usage::new(prompt_tokens, completion_tokens).with_cached(cached_tokens),
                    });
                }
                GenerationEvent::Failed(message) => {
                    self.record_failed(&message);
                    return Err(ApiError::internal(message));
                }
            }
        }
        Err(ApiError::internal("generation ended without finishing"))
    }

    /// Writes a finished generation into the audit record; `completion` is its text.
    pub fn record_finished(&mut self, prompt: usize, completion: usize, timings: &Timings, text: &str) {
        self.finished = true;
        let Some(audit) = &self.audit else { return };
        let model = self.model.clone();
        let ms = |d: Duration| Some(d.as_secs_f64() * 1000.0);
        audit.update(|record| {
            record.tier = 3;
            record.provider = LOCAL_PROVIDER.to_string();
            record.model = model;
            record.input_tokens = prompt as u64;
            record.output_tokens = completion as u64;
            record.queue_ms = ms(timings.queue);
            record.prefill_ms = ms(timings.prefill);
            record.decode_ms = ms(timings.decode);
        });
        audit.set_completion(text);
    }

    /// Records a generation that failed in the worker, so that the audit record shows a server
    /// error rather than a client that left. A streamed response already has status 200.
    pub fn record_failed(&mut self, message: &str) {
        self.finished = true;
        let Some(audit) = &self.audit else { return };
        let (produced, prompt, model) = (
            self.produced.load(Ordering::Relaxed) as u64,
            self.prompt_tokens as u64,
            self.model.clone(),
        );
        let error = format!("generation failed: {message}");
        audit.update(|record| {
            record.tier = 3;
            record.provider = LOCAL_PROVIDER.to_string();
            record.model = model;
            record.input_tokens = prompt;
            record.output_tokens = produced;
            record.status = 500;
            record.error = Some(error);
        });
    }

    /// Logs a finished generation. `cached` prompt tokens came from the prompt cache, so
    /// `prefill_tok_s` divides only `prefill_tokens`, the prompt tokens the model computed, by
    /// the prefill time. The log names that count because a cache hit that leaves a few tokens
    /// to compute shows a low rate.
    pub fn log_finished(&self, reason: &str, prompt: usize, cached: usize, completion: usize, timings: &Timings) {
        let per_second = |tokens: usize, time: Duration| {
            let seconds = time.as_secs_f64();
            if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            }
        };
        let prefill_tokens = prompt.saturating_sub(cached);
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            finish_reason = reason,
            prompt_tokens = prompt,
            cached_tokens = cached,
            prefill_tokens,
            completion_tokens = completion,
            queue_ms = timings.queue.as_millis() as u64,
            prefill_ms = timings.prefill.as_millis() as u64,
            decode_ms = timings.decode.as_millis() as u64,
            prefill_tok_s = format!("{:.1}", per_second(prefill_tokens, timings.prefill)),
            decode_tok_s = format!("{:.1}", per_second(completion, timings.decode)),
            "generation finished"
        );
    }
}

fn sse_json<T: serde::Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(error) => Event::default().data(ApiError::internal(error).body().to_string()),
    }
}

pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
