//! `AuditWriter`: a bounded queue in front of the audit store, drained by one thread that
//! writes records in batches. `record` uses `try_send`, so a full queue drops and counts the
//! record instead of blocking the request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::record::AuditRecord;
use super::store::AuditStore;

/// Records written in one transaction at most.
const MAX_BATCH: usize = 256;

/// First pause after a failed batch write; each later pause doubles, up to `MAX_RETRY_PAUSE`.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(200);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Request ids of a lost batch named in its log line; the rest are counted.
const LOGGED_IDS: usize = 10;

enum Message {
    /// A record and the time it was queued.
    Record(Box<AuditRecord>, Instant),
    /// Write everything queued before this message, then signal on the channel.
    Flush(mpsc::Sender<()>),
}

/// Counters of the writer, shared with metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Records accepted into the queue.
    pub queued: AtomicU64,
    /// Records written to the store.
    pub written: AtomicU64,
    /// Records rejected because the queue was full.
    pub dropped_full: AtomicU64,
    /// Records lost because the store failed to write them.
    pub failed: AtomicU64,
    /// Queue time of the oldest record in the batch being written; `None` while the writer waits.
    writing_since: Mutex<Option<Instant>>,
}

impl WriterStats {
    /// Returns the records accepted but not yet written or lost.
    pub fn lag(&self) -> u64 {
        let done = self.written.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(done)
    }

    /// Returns how long the oldest record not yet written has waited: zero while the writer is
    /// idle, because it takes every queued record as soon as it is free.
    pub fn oldest_unwritten_age(&self) -> Duration {
        self.writing_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    fn set_writing_since(&self, since: Option<Instant>) {
        *self.writing_since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }
}

/// The sending side of the audit queue. Cloning is cheap; the thread stops when every clone
/// has been dropped, after writing what is queued.
#[derive(Clone)]
pub struct AuditWriter {
    sender: SyncSender<Message>,
    stats: Arc<WriterStats>,
}

impl AuditWriter {
    /// Starts the writer thread over `store`, with room for `capacity` queued records. A batch
    /// that fails is retried for `retry_window` before its records are counted as lost; records
    /// arriving meanwhile wait in the queue.
    pub fn spawn(
        store: Box<dyn AuditStore>,
        capacity: usize,
        retry_window: Duration,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (sender, receiver) = mpsc::sync_channel(capacity);
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("tierd-audit".into())
            .spawn(move || run(store, receiver, &thread_stats, retry_window))?;
        Ok((Self { sender, stats }, handle))
    }

    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    /// Queues `record` without waiting. A full queue drops it, counts it and logs a warning,
    /// because serving must not stall behind the disk.
    pub fn record(&self, record: AuditRecord) {
        match self.sender.try_send(Message::Record(Box::new(record), Instant::now())) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(Message::Record(record, _))) => {
                let dropped = self.stats.dropped_full.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(request_id = %record.id, dropped_total = dropped, "audit queue is full; the record was dropped");
            }
            Err(TrySendError::Full(Message::Flush(_))) => {}
            Err(TrySendError::Disconnected(_)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("the audit writer has stopped; the record was lost");
            }
        }
    }

    /// Waits until every record queued before this call is written or counted as lost.
    /// Blocking; returns false when the writer has stopped.
    pub fn flush(&self) -> bool {
        let (done, wait) = mpsc::channel();
        if self.sender.send(Message::Flush(done)).is_err() {
            return false;
        }
        wait.recv().is_ok()
    }
}

fn run(mut store: Box<dyn AuditStore>, receiver: Receiver<Message>, stats: &WriterStats, retry_window: Duration) {
    let mut batch: Vec<AuditRecord> = Vec::with_capacity(MAX_BATCH);
    let mut flushes = Vec::new();
    loop {
        // Wait for the first message, then take whatever else is already queued.
        let first = match receiver.recv() {
            Ok(message) => message,
            Err(_) => break,
        };
        let mut next = Some(first);
        let mut oldest: Option<Instant> = None;
        while let Some(message) = next.take() {
            match message {
                Message::Record(record, queued) => {
                    batch.push(*record);
                    oldest = Some(oldest.map_or(queued, |o| o.min(queued)));
                }
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            next = receiver.try_recv().ok();
        }
        stats.set_writing_since(oldest);
        write(store.as_mut(), &mut batch, stats, retry_window);
        stats.set_writing_since(None);
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
    write(store.as_mut(), &mut batch, stats, retry_window);
    tracing::info!(
        written = stats.written.load(Ordering::Relaxed),
        dropped_full = stats.dropped_full.load(Ordering::Relaxed),
        failed = stats.failed.load(Ordering::Relaxed),
        "audit writer stopped"
    );
}

/// Writes `batch`, retrying a failed transaction with growing pauses until `retry_window` has
/// passed, then counting its records as lost.
fn write(store: &mut dyn AuditStore, batch: &mut Vec<AuditRecord>, stats: &WriterStats, retry_window: Duration) {
    if batch.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let mut pause = FIRST_RETRY_PAUSE;
    for attempt in 1.. {
        let error = match store.write_batch(batch) {
            Ok(()) => {
                stats.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
                return;
            }
            Err(error) => error,
        };
        if started.elapsed() + pause > retry_window {
            let ids: Vec<&str> = batch.iter().take(LOGGED_IDS).map(|r| r.id.as_str()).collect();
            tracing::error!(%error, attempt, records = batch.len(), first_ids = ?ids, "failed to write audit records; they are lost");
            stats.failed.fetch_add(batch.len() as u64, Ordering::Relaxed);
            batch.clear();
            return;
        }
        tracing::warn!(%error, attempt, records = batch.len(), retry_in_ms = pause.as_millis() as u64, "failed to write audit records; retrying");
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::store::AuditError;
    use crate::audit::PolicyChange;
    use std::sync::Mutex;

    /// A store that keeps records in memory, and blocks its writes while `gate` is held.
    #[derive(Clone, Default)]
    struct MemoryStore {
        records: Arc<Mutex<Vec<AuditRecord>>>,
        batches: Arc<Mutex<Vec<usize>>>,
        gate: Arc<Mutex<()>>,
    }

    impl AuditStore for MemoryStore {
        fn write_batch(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
            let _open = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            self.batches.lock().unwrap_or_else(|p| p.into_inner()).push(records.len());
            self.records.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(records);
            Ok(())
        }

        fn records_since(&self, _since_ms: i64) -> Result<Vec<AuditRecord>, AuditError> {
            Ok(self.records.lock().unwrap_or_else(|p| p.into_inner()).clone())
        }

        fn write_policy_changes(&mut self, _changes: &[PolicyChange]) -> Result<(), AuditError> {
            Err(AuditError::Config("the writer tests keep no policy history".into()))
        }

        fn policy_changes(&self, _limit: usize) -> Result<Vec<PolicyChange>, AuditError> {
            Ok(Vec::new())
        }
    }

    fn record(id: usize) -> AuditRecord {
        AuditRecord {
            id: id.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn queued_records_are_written_in_batches() {
        let store = MemoryStore::default();
        let gate = store.gate.lock().expect("gate");
        let (writer, thread) = AuditWriter::spawn(Box::new(store.clone()), 1_000, Duration::from_secs(1)).expect("spawn");
        for id in 0..600 {
            writer.record(record(id));
        }
        // The writer was blocked, so the records waited together and go out in full batches.
        drop(gate);
        assert!(writer.flush());
        drop(writer);
        thread.join().expect("writer thread");

        let written = store.records.lock().expect("records");
        let ids: Vec<String> = written.iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids, (0..600).map(|id| id.to_string()).collect::<Vec<_>>());
        let batches = store.batches.lock().expect("batches");
        assert!(batches.iter().all(|&size| size <= MAX_BATCH), "{batches:?}");
        assert!(batches.len() < 600, "records were written one at a time: {batches:?}");
    }

    /// A store that fails its first `failures` writes.
    struct FlakyStore {
        failures: usize,
        written: Arc<Mutex<usize>>,
    }

    impl AuditStore for FlakyStore {
        fn write_batch(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(AuditError::Config("the database is down".into()));
            }
            *self.written.lock().unwrap_or_else(|p| p.into_inner()) += records.len();
            Ok(())
        }

        fn records_since(&self, _since_ms: i64) -> Result<Vec<AuditRecord>, AuditError> {
            Ok(Vec::new())
        }

        fn write_policy_changes(&mut self, _changes: &[PolicyChange]) -> Result<(), AuditError> {
            Err(AuditError::Config("the writer tests keep no policy history".into()))
        }

        fn policy_changes(&self, _limit: usize) -> Result<Vec<PolicyChange>, AuditError> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn failed_batch_is_retried_within_the_window() {
        let written = Arc::new(Mutex::new(0));
        let store = FlakyStore { failures: 3, written: written.clone() };
        let (writer, thread) = AuditWriter::spawn(Box::new(store), 10, Duration::from_secs(10)).expect("spawn");
        writer.record(record(1));
        assert!(writer.flush());
        let stats = writer.stats().clone();
        drop(writer);
        thread.join().expect("writer thread");
        assert_eq!(*written.lock().expect("written"), 1);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn batch_failing_past_the_window_is_counted_lost() {
        let written = Arc::new(Mutex::new(0));
        let store = FlakyStore { failures: usize::MAX, written: written.clone() };
        let (writer, thread) = AuditWriter::spawn(Box::new(store), 10, Duration::from_millis(500)).expect("spawn");
        writer.record(record(1));
        writer.record(record(2));
        assert!(writer.flush());
        let stats = writer.stats().clone();
        drop(writer);
        thread.join().expect("writer thread");
        assert_eq!(*written.lock().expect("written"), 0);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 2);
        assert_eq!(stats.lag(), 0);
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let store = MemoryStore::default();
        let gate = store.gate.lock().expect("gate");
        let (writer, thread) = AuditWriter::spawn(Box::new(store.clone()), 4, Duration::from_secs(1)).expect("spawn");
        for id in 0..50 {
            writer.record(record(id));
        }
        let dropped = writer.stats().dropped_full.load(Ordering::Relaxed);
        assert!(dropped > 0, "a queue of 4 took 50 records while its writer was blocked");
        drop(gate);
        assert!(writer.flush());
        let stats = writer.stats().clone();
        drop(writer);
        thread.join().expect("writer thread");
        let written = store.records.lock().expect("records").len() as u64;
        assert_eq!(written + dropped, 50);
        assert_eq!(stats.lag(), 0);
    }
}
