//! One generation thread per loaded model, fed by a bounded queue.
//!
//! Candle's CPU kernels parallelise each matmul over all cores, so running one sequence at a
//! time per model uses the machine fully while keeping outputs of concurrent requests separate.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::generate::{generate, GenerationEvent, GenerationRequest};
use super::prompt_cache::{PromptCache, PromptCacheConfig, PromptCacheStats};
use super::queue::{job_queue, JobQueue, QueueFull};
use crate::classify::label_scoring::{score_prompt, LabelSet, PrefixCache, PromptScores};
use crate::model::LoadedModel;

enum Job {
    Generate {
        request: GenerationRequest,
        events: mpsc::Sender<GenerationEvent>,
        enqueued: Instant,
        span: tracing::Span,
    },
    Score {
        prompts: Vec<Vec<u32>>,
        labels: Arc<LabelSet>,
        reply: oneshot::Sender<Result<Vec<PromptScores>, String>>,
        span: tracing::Span,
    },
}

/// Warns when the prompt cache budget of `model` is too small for `min_tokens` positions,
/// because such a cache stores nothing and nothing else reports it.
fn warn_if_cache_stores_nothing(model_id: &str, model: &LoadedModel, config: &PromptCacheConfig) {
    // An empty cache allocates nothing and has the model's bytes per position.
    let bytes_per_position = model.network.new_cache(0).bytes_per_position();
    if let Some(needed_bytes) = config.min_tokens_shortfall(bytes_per_position) {
        tracing::warn!(
            model = model_id,
            max_bytes = config.max_bytes,
            min_tokens = config.min_tokens,
            needed_bytes,
            "the prompt cache budget cannot hold min_tokens positions of this model, so the cache \
             stores nothing. Raise server.prompt_cache.max_bytes to at least needed_bytes or lower \
             min_tokens"
        );
    }
}

/// Handle to a model's generation thread.
pub struct ModelWorker {
    queue: JobQueue<Job>,
    prompt_cache: Arc<PromptCacheStats>,
}

/// Events buffered between the generation thread and the HTTP response.
const EVENT_BUFFER: usize = 64;

impl ModelWorker {
    /// Starts the generation thread of `model`, with a queue of `capacity` jobs and, when
    /// `prompt_cache.enabled`, a prompt cache for its generation requests.
    pub fn spawn(
        model_id: &str,
        model: Arc<LoadedModel>,
        capacity: usize,
        prompt_cache: &PromptCacheConfig,
    ) -> std::io::Result<Self> {
        let (queue, receiver) = job_queue::<Job>(model_id, capacity);
        let stats = Arc::new(PromptCacheStats::default());
        if prompt_cache.enabled {
            warn_if_cache_stores_nothing(model_id, &model, prompt_cache);
        }
        let mut generation_cache = prompt_cache
            .enabled
            .then(|| PromptCache::new(prompt_cache.clone(), stats.clone()));
        std::thread::Builder::new()
            .name(format!("generate-{model_id}"))
            .spawn(move || {
                // Built on the first scoring job: generation does not use it.
                // NOTE: one cached prefix per model, so two tasks that alternate on one model
                // evict each other's instructions.
                let mut prefix: Option<PrefixCache> = None;
                while let Ok(job) = receiver.recv() {
                    match job {
                        Job::Generate {
                            request,
                            events,
                            enqueued,
                            span,
                        } => {
                            let _enter = span.enter();
                            if events.is_closed() {
                                tracing::info!("client left while queued, skipping");
                                continue;
                            }
                            generate(&model, &request, enqueued.elapsed(), &events, generation_cache.as_mut());
                        }
                        Job::Score {
                            prompts,
                            labels,
                            reply,
                            span,
                        } => {
                            let _enter = span.enter();
                            let network = model.network.as_ref();
                            let prefix = prefix.get_or_insert_with(|| {
                                PrefixCache::new(network, network.hparams().context_length)
                            });
                            let mut scores = Vec::with_capacity(prompts.len());
                            let mut failure = None;
                            for prompt in &prompts {
                                if reply.is_closed() {
                                    break;
                                }
                                match score_prompt(network, prefix, prompt, &labels) {
                                    Ok(score) => scores.push(score),
                                    Err(error) => {
                                        failure = Some(error.to_string());
                                        break;
                                    }
                                }
                            }
                            if reply.is_closed() {
                                tracing::info!("client left during label scoring, stopped");
                                continue;
                            }
                            // A failed run may leave the cache in any state, so it starts over.
                            let result = match failure {
                                Some(message) => {
                                    *prefix = PrefixCache::new(network, network.hparams().context_length);
                                    Err(message)
                                }
                                None => Ok(scores),
                            };
                            let _ = reply.send(result);
                        }
                    }
                }
            })?;
        Ok(Self {
            queue,
            prompt_cache: stats,
        })
    }

    /// Queues `request`; returns the stream of its events, or [`QueueFull`] at once when the
    /// queue is at capacity.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::Receiver<GenerationEvent>, QueueFull> {
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let job = Job::Generate {
            request,
            events,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        self.queue.push(job)?;
        Ok(receiver)
    }

    /// Queues label scoring of `prompts`; the receiver gets one [`PromptScores`] per prompt,
    /// or the error that stopped the job. Dropping the receiver stops the job after the
    /// current prompt.
    pub fn submit_scoring(
        &self,
        prompts: Vec<Vec<u32>>,
        labels: Arc<LabelSet>,
    ) -> Result<oneshot::Receiver<Result<Vec<PromptScores>, String>>, QueueFull> {
        let (reply, receiver) = oneshot::channel();
        let job = Job::Score {
            prompts,
            labels,
            reply,
            span: tracing::Span::current(),
        };
        self.queue.push(job)?;
        Ok(receiver)
    }

    /// Counters of the prompt cache; they stay at zero when it is disabled.
    pub fn prompt_cache_stats(&self) -> &PromptCacheStats {
        &self.prompt_cache
    }

    /// Requests waiting for the generation thread, not counting the one it runs.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }
}
