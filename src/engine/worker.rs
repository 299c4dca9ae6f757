//! One generation thread per loaded model, fed by a bounded queue.
//!
//! Candle's CPU kernels parallelise each matmul over all cores, so running one sequence at a
//! time per model uses the machine fully while keeping outputs of concurrent requests separate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::generate::{generate, GenerationEvent, GenerationRequest};
use crate::model::LoadedModel;

struct Job {
    request: GenerationRequest,
    events: mpsc::Sender<GenerationEvent>,
    enqueued: Instant,
    span: tracing::Span,
}

/// Handle to a model's generation thread.
pub struct ModelWorker {
    sender: SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("The queue of model `{model}` is full ({capacity} requests waiting)")]
pub struct QueueFull {
    pub model: String,
    pub capacity: usize,
}

/// Events buffered between the generation thread and the HTTP response.
const EVENT_BUFFER: usize = 64;

impl ModelWorker {
    pub fn spawn(model_id: &str, model: Arc<LoadedModel>, capacity: usize) -> std::io::Result<Self> {
        let (sender, receiver) = sync_channel::<Job>(capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let thread_queued = queued.clone();
        std::thread::Builder::new()
            .name(format!("generate-{model_id}"))
            .spawn(move || {
                while let Ok(job) = receiver.recv() {
                    thread_queued.fetch_sub(1, Ordering::SeqCst);
                    let _enter = job.span.enter();
                    if job.events.is_closed() {
                        tracing::info!("client left while queued, skipping");
                        continue;
                    }
                    generate(&model, &job.request, job.enqueued.elapsed(), &job.events);
                }
            })?;
        Ok(Self {
            sender,
            queued,
            capacity,
        })
    }

    /// Queues `request`; returns the stream of its events, or [`QueueFull`] at once when the
    /// queue is at capacity.
    pub fn submit(
        &self,
        model_id: &str,
        request: GenerationRequest,
    ) -> Result<mpsc::Receiver<GenerationEvent>, QueueFull> {
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let job = Job {
            request,
            events,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(job) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(QueueFull {
                    model: model_id.to_string(),
                    capacity: self.capacity,
                })
            }
        }
    }

    /// Requests waiting for the generation thread, not counting the one it runs.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}
