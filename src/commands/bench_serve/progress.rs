//! Progress of a run on standard error: a bar when standard error is a terminal, otherwise a
//! line per finished batch.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use super::request::Outcome;

/// Counts finished requests; cheap to clone into request tasks.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    failed: Arc<AtomicU64>,
}

impl Progress {
    /// Starts a bar over `planned` requests when standard error is a terminal.
    pub fn new(planned: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(planned);
            let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} requests {msg}")
                .map(|style| style.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Self {
            bar,
            failed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Shows what runs now: the endpoint, the load level and the round.
    pub fn set_stage(&self, stage: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{stage}, {} failed", self.failed.load(Ordering::Relaxed)));
        }
    }

    pub fn finished(&self, outcome: &Outcome) {
        if outcome.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Reports a finished batch: as the bar's message on a terminal, else as a line.
    pub fn batch_done(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("{line}, {} failed so far", self.failed.load(Ordering::Relaxed))),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar, so that the report starts on a clean line.
    pub fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
