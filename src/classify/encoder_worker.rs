//! The thread that runs a sentence encoder, with dynamic batching. Requests that wait in the
//! encoder's queue, or that arrive within a short window, are embedded together in padded
//! forward passes. Each request gets back the embeddings of its own inputs, in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::oneshot;

use super::encoder::{plan_passes, EncoderError, PassLimits, SentenceEncoder};
use crate::engine::queue::{job_queue, JobQueue, JobReceiver};
use crate::engine::QueueFull;

/// Inputs gathered from queued requests into one run of the encoder. A single request with
/// more inputs still runs whole.
// NOTE: a large request holds up the requests behind it for its whole run, and it runs on
// after its client leaves. Splitting it into runs would bound both.
const MAX_GATHERED_INPUTS: usize = 256;

/// Queue and batching settings of an encoder's worker.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// Requests that may wait before new ones get [`QueueFull`].
    pub queue_capacity: usize,
    /// Maximum wait for more requests once one has arrived, while the gathered inputs do not
    /// fill a forward pass. Zero runs at once with the requests already waiting.
    pub window: Duration,
    pub limits: PassLimits,
}

/// Histograms that the worker fills: requests per run of the encoder, and sequences per
/// forward pass.
#[derive(Clone)]
pub struct BatchHistograms {
    pub requests: Histogram,
    pub sequences: Histogram,
}

/// The embeddings of one job's inputs, in order, or why they could not be computed.
type EmbedResult = Result<Vec<Vec<f32>>, EncoderError>;

struct EncodeJob {
    inputs: Vec<Vec<u32>>,
    reply: oneshot::Sender<EmbedResult>,
    span: tracing::Span,
}

/// A loaded encoder with its own thread and bounded queue, shared by every task that uses it.
pub struct EncoderWorker {
    pub id: String,
    pub encoder: Arc<SentenceEncoder>,
    queue: JobQueue<EncodeJob>,
}

impl EncoderWorker {
    /// Starts the encoder's thread. `histograms`, when given, record the size of each batch.
    pub fn spawn(
        id: &str,
        encoder: SentenceEncoder,
        settings: &BatchSettings,
        histograms: Option<BatchHistograms>,
    ) -> std::io::Result<Self> {
        let encoder = Arc::new(encoder);
        let (queue, receiver) = job_queue::<EncodeJob>(id, settings.queue_capacity);
        let thread_encoder = encoder.clone();
        let settings = settings.clone();
        std::thread::Builder::new()
            .name(format!("encode-{id}"))
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let mut jobs = gather(&receiver, first, &settings);
                    jobs.retain(|job| {
                        let open = !job.reply.is_closed();
                        if !open {
                            let _enter = job.span.enter();
                            tracing::info!("client left while queued, skipping");
                        }
                        open
                    });
                    run_jobs(&thread_encoder, jobs, settings.limits, histograms.as_ref());
                }
            })?;
        Ok(Self {
            id: id.to_string(),
            encoder,
            queue,
        })
    }

    /// Queues `inputs` for embedding; fails at once with [`QueueFull`] when the queue is full.
    pub fn submit(
        &self,
        inputs: Vec<Vec<u32>>,
    ) -> Result<oneshot::Receiver<EmbedResult>, QueueFull> {
        let (reply, receiver) = oneshot::channel();
        let job = EncodeJob {
            inputs,
            reply,
            span: tracing::Span::current(),
        };
        self.queue.push(job)?;
        Ok(receiver)
    }

    /// Requests waiting, not counting those in the run under way.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Embeds `inputs` on the encoder thread and waits for the result.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, ClassifyQueueError> {
        let receiver = self.submit(inputs).map_err(ClassifyQueueError::Full)?;
        receiver
            .await
            .map_err(|_| ClassifyQueueError::Encoder(EncoderError::Stopped))?
            .map_err(ClassifyQueueError::Encoder)
    }
}

/// Collects the jobs of one run, starting with `first`: it waits up to the window for jobs
/// that fill a forward pass, then takes the jobs already waiting, up to
/// [`MAX_GATHERED_INPUTS`] inputs.
fn gather(receiver: &JobReceiver<EncodeJob>, first: EncodeJob, settings: &BatchSettings) -> Vec<EncodeJob> {
    let mut inputs = first.inputs.len();
    let mut jobs = vec![first];

    let deadline = Instant::now() + settings.window;
    while inputs < settings.limits.max_sequences {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(job) = receiver.recv_timeout(left) else {
            break;
        };
        inputs += job.inputs.len();
        jobs.push(job);
    }

    while inputs < MAX_GATHERED_INPUTS {
        let Some(job) = receiver.try_recv() else {
            break;
        };
        inputs += job.inputs.len();
        jobs.push(job);
    }
    jobs
}

/// A job whose inputs are in the current run, waiting for their embeddings.
struct Waiting {
    reply: oneshot::Sender<EmbedResult>,
    span: tracing::Span,
    embeddings: Vec<Vec<f32>>,
    /// Inputs not embedded yet; the reply goes out when this reaches zero.
    remaining: usize,
}

/// Embeds the inputs of all `jobs` together, shortest first, and replies to each job as soon
/// as its last input is embedded. A job with an input the model cannot run gets its error
/// before the others start. When a forward pass fails, each job still waiting runs alone, so
/// every client gets the error of its own inputs.
fn run_jobs(encoder: &SentenceEncoder, jobs: Vec<EncodeJob>, limits: PassLimits, histograms: Option<&BatchHistograms>) {
    let mut waiting: Vec<Option<Waiting>> = Vec::with_capacity(jobs.len());
    let mut job_inputs: Vec<Vec<Vec<u32>>> = Vec::with_capacity(jobs.len());
    for job in jobs {
        if let Err(error) = job.inputs.iter().try_for_each(|ids| encoder.check(ids)) {
            let _enter = job.span.enter();
            tracing::debug!(%error, "encoder job rejected before batching");
            // The receiver may have gone; nothing is owed to it.
            let _ = job.reply.send(Err(error));
            continue;
        }
        waiting.push(Some(Waiting {
            reply: job.reply,
            span: job.span,
            embeddings: vec![Vec::new(); job.inputs.len()],
            remaining: job.inputs.len(),
        }));
        job_inputs.push(job.inputs);
    }
    if waiting.is_empty() {
        return;
    }
    if let Some(histograms) = histograms {
        histograms.requests.observe(waiting.len() as f64);
    }
    if waiting.len() > 1 {
        tracing::debug!(jobs = waiting.len(), "embedding queued jobs together");
    }

    // Each input of the run as (job, position in the job).
    let owners: Vec<(usize, usize)> = job_inputs
        .iter()
        .enumerate()
        .flat_map(|(job, inputs)| (0..inputs.len()).map(move |position| (job, position)))
        .collect();
    let lengths: Vec<usize> = owners.iter().map(|&(job, position)| job_inputs[job][position].len()).collect();
    for pass in plan_passes(&lengths, limits) {
        let batch: Vec<&[u32]> = pass
            .iter()
            .map(|&i| job_inputs[owners[i].0][owners[i].1].as_slice())
            .collect();
        if let Some(histograms) = histograms {
            histograms.sequences.observe(batch.len() as f64);
        }
        let embeddings = match encoder.embed_batch(&batch) {
            Ok(embeddings) => embeddings,
            Err(error) => {
                rerun_alone(encoder, waiting, job_inputs, limits, error);
                return;
            }
        };
        for (&i, embedding) in pass.iter().zip(embeddings) {
            let (job, position) = owners[i];
            let Some(entry) = waiting[job].as_mut() else {
                continue;
            };
            entry.embeddings[position] = embedding;
            entry.remaining -= 1;
            if entry.remaining == 0 {
                let done = waiting[job].take().expect("the job is still waiting");
                let _ = done.reply.send(Ok(done.embeddings));
            }
        }
    }
}

/// Runs each job that has not had its reply on its own, after a forward pass of the combined
/// run failed with `error`. A lone job gets `error` itself, since running it again would
/// repeat the same pass.
fn rerun_alone(
    encoder: &SentenceEncoder,
    waiting: Vec<Option<Waiting>>,
    job_inputs: Vec<Vec<Vec<u32>>>,
    limits: PassLimits,
    error: EncoderError,
) {
    let left: Vec<(Waiting, Vec<Vec<u32>>)> = waiting
        .into_iter()
        .zip(job_inputs)
        .filter_map(|(entry, inputs)| entry.map(|entry| (entry, inputs)))
        .collect();
    if left.len() == 1 {
        let (entry, _) = left.into_iter().next().expect("one job is left");
        let _enter = entry.span.enter();
        tracing::warn!(%error, "encoder forward pass failed");
        let _ = entry.reply.send(Err(error));
        return;
    }
    tracing::warn!(%error, jobs = left.len(), "combined encoder batch failed; running its jobs one by one");
    for (entry, inputs) in left {
        let _enter = entry.span.enter();
        let _ = entry.reply.send(encoder.embed_with(&inputs, limits));
    }
}

/// Failure of a queued encoder job.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyQueueError {
    #[error(transparent)]
    Full(QueueFull),
    #[error(transparent)]
    Encoder(EncoderError),
}
