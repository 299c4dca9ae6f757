//! A bounded job queue between request handlers and a worker thread, with its depth visible to
//! `/health` and a [`QueueFull`] error instead of blocking when it is full.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("The queue of model `{model}` is full ({capacity} requests waiting)")]
pub struct QueueFull {
    pub model: String,
    pub capacity: usize,
}

/// The sending side, held by the request handlers.
pub struct JobQueue<J> {
    name: String,
    sender: SyncSender<J>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// The receiving side, owned by the worker thread.
pub struct JobReceiver<J> {
    receiver: Receiver<J>,
    queued: Arc<AtomicUsize>,
}

/// Creates a queue of `capacity` jobs for the model or encoder `name`.
pub fn job_queue<J>(name: &str, capacity: usize) -> (JobQueue<J>, JobReceiver<J>) {
    let (sender, receiver) = sync_channel(capacity);
    let queued = Arc::new(AtomicUsize::new(0));
    let queue = JobQueue {
        name: name.to_string(),
        sender,
        queued: queued.clone(),
        capacity,
    };
    (queue, JobReceiver { receiver, queued })
}

impl<J> JobQueue<J> {
    /// Adds `job`, or returns [`QueueFull`] at once when the queue is at capacity.
    pub fn push(&self, job: J) -> Result<(), QueueFull> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(QueueFull {
                    model: self.name.clone(),
                    capacity: self.capacity,
                })
            }
        }
    }

    /// Jobs waiting, not counting the one the worker runs.
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

impl<J> JobReceiver<J> {
    /// Waits for the next job; fails once every sender is gone.
    pub fn recv(&self) -> Result<J, RecvError> {
        let job = self.receiver.recv()?;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        Ok(job)
    }

    /// Waits up to `timeout` for the next job; returns `None` when none came or every sender
    /// is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<J> {
        let job = self.receiver.recv_timeout(timeout).ok()?;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        Some(job)
    }

    /// Returns a job that is already waiting, without blocking.
    pub fn try_recv(&self) -> Option<J> {
        let job = self.receiver.try_recv().ok()?;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_rejects_and_counts() {
        let (queue, receiver) = job_queue::<u32>("m", 2);
        queue.push(1).unwrap();
        queue.push(2).unwrap();
        let full = queue.push(3).unwrap_err();
        assert_eq!(full.capacity, 2);
        assert_eq!(full.model, "m");
        assert_eq!(queue.depth(), 2);
        assert_eq!(receiver.recv().unwrap(), 1);
        assert_eq!(queue.depth(), 1);
        assert_eq!(receiver.try_recv(), Some(2));
        assert_eq!(receiver.try_recv(), None);
        assert_eq!(queue.depth(), 0);
    }

    #[test]
    fn recv_timeout_waits_then_gives_up() {
        let (queue, receiver) = job_queue::<u32>("m", 2);
        let started = std::time::Instant::now();
        assert_eq!(receiver.recv_timeout(Duration::from_millis(30)), None);
        assert!(started.elapsed() >= Duration::from_millis(30), "{:?}", started.elapsed());

        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            queue.push(7).unwrap();
            queue
        });
        assert_eq!(receiver.recv_timeout(Duration::from_secs(10)), Some(7));
        let queue = sender.join().unwrap();
        assert_eq!(queue.depth(), 0);
    }
}
