//! Detection of `stop` strings in streamed text, across token boundaries.

/// Buffers generated text so that no part of a stop string is ever emitted.
///
/// Text that could still be the start of a stop string is held back until the next delta
/// decides it. When a stop string appears, the text before it is released and the rest dropped.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

pub enum StopOutcome {
    /// Text that is safe to emit now.
    Continue(String),
    /// A stop string was found; this is the last text to emit.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return StopOutcome::Continue(std::mem::take(&mut self.pending));
        }

        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min();
        if let Some(position) = earliest {
            let text = self.pending[..position].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(text);
        }

        let keep = self.longest_partial_suffix();
        let split = self.pending.len() - keep;
        let ready = self.pending[..split].to_string();
        self.pending.drain(..split);
        StopOutcome::Continue(ready)
    }

    /// Returns the held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of the pending text that is a proper prefix of a
    /// stop string.
    fn longest_partial_suffix(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            let prefixes = stop.char_indices().skip(1);
            for (boundary, _) in prefixes.take_while(|(boundary, _)| *boundary <= self.pending.len()) {
                let prefix = &stop[..boundary];
                if boundary > longest && self.pending.ends_with(prefix) {
                    longest = boundary;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for delta in deltas {
            match matcher.push(delta) {
                StopOutcome::Continue(text) => out.push_str(&text),
                StopOutcome::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&matcher.finish());
        (out, false)
    }

    #[test]
    fn stop_split_across_deltas() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".into(), true));
    }

    #[test]
    fn partial_stop_released_when_it_diverges() {
        assert_eq!(run(&["END"], &["abc EN", "x"]), ("abc ENx".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn multibyte_stop_string() {
        assert_eq!(run(&["。"], &["你好", "。再见"]), ("你好".into(), true));
    }
}
