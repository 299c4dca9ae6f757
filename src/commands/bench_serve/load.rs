//! The two load shapes: open loop, which sends on a schedule whatever is outstanding, and
//! closed loop, which keeps a fixed number of requests in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinSet;

use super::endpoint::{Api, Endpoint};
use super::progress::Progress;
use super::request::{Outcome, Sender};

/// Requests of one run against one endpoint.
pub struct Batch {
    pub sender: Arc<Sender>,
    pub endpoint: Arc<Endpoint>,
    pub api: Api,
    /// Request bodies in sending order; the batch sends at most this many.
    pub bodies: Vec<Arc<Value>>,
    /// No request is sent once this much time has passed since the batch started. Requests
    /// in flight then run to their end or their timeout.
    pub duration: Duration,
}

/// Outcomes and timing of a batch.
#[derive(Debug, Default)]
pub struct BatchResult {
    pub outcomes: Vec<Outcome>,
    /// From the first send to the end of the last response.
    pub wall: Duration,
    /// Maximum delay between a request's scheduled send time and its actual send, open loop
    /// only. A large value means the load generator itself could not keep up.
    pub max_send_delay: Option<Duration>,
}

/// Sends the batch's requests at `offsets` from its start, without waiting for earlier ones.
pub async fn open_loop(batch: Batch, offsets: &[Duration], progress: &Progress) -> BatchResult {
    let started = Instant::now();
    let start = tokio::time::Instant::from_std(started);
    let mut tasks = JoinSet::new();
    let mut max_send_delay = Duration::ZERO;
    for (body, &offset) in batch.bodies.iter().zip(offsets) {
        if offset >= batch.duration {
            break;
        }
        tokio::time::sleep_until(start + offset).await;
        max_send_delay = max_send_delay.max(started.elapsed().saturating_sub(offset));
        let (sender, endpoint, body, progress) = (batch.sender.clone(), batch.endpoint.clone(), body.clone(), progress.clone());
        let api = batch.api;
        tasks.spawn(async move {
            let outcome = sender.send(&endpoint, api, &body).await;
            progress.finished(&outcome);
            outcome
        });
    }
    BatchResult {
        outcomes: collect(tasks).await,
        wall: started.elapsed(),
        max_send_delay: Some(max_send_delay),
    }
}

/// Runs `concurrency` workers that each send their next request as soon as the previous one
/// ends.
pub async fn closed_loop(batch: Batch, concurrency: usize, progress: &Progress) -> BatchResult {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(batch.bodies);
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (sender, endpoint, bodies, next, progress) =
            (batch.sender.clone(), batch.endpoint.clone(), bodies.clone(), next.clone(), progress.clone());
        let (api, duration) = (batch.api, batch.duration);
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                if started.elapsed() >= duration {
                    break;
                }
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else {
                    break;
                };
                let outcome = sender.send(&endpoint, api, body).await;
                progress.finished(&outcome);
                outcomes.push(outcome);
            }
            outcomes
        });
    }
    let outcomes = collect(tasks).await.into_iter().flatten().collect();
    BatchResult {
        outcomes,
        wall: started.elapsed(),
        max_send_delay: None,
    }
}

/// Waits for every task. A task that panicked is a bug in the benchmark, not a request
/// failure, so its panic is passed on.
async fn collect<T: 'static>(mut tasks: JoinSet<T>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => tracing::error!(%error, "a request task was cancelled"),
        }
    }
    results
}
