//! Latency percentiles of a result row.

use std::time::Duration;

use serde::Serialize;

/// Mean and percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Values the figures are computed from.
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Summarizes `values`, or returns `None` when there are none.
    pub fn of(values: &[Duration]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut millis: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        millis.sort_by(f64::total_cmp);
        let mean = millis.iter().sum::<f64>() / millis.len() as f64;
        Some(Self {
            count: millis.len(),
            mean,
            p50: percentile(&millis, 50.0),
            p90: percentile(&millis, 90.0),
            p99: percentile(&millis, 99.0),
            max: millis[millis.len() - 1],
        })
    }
}

/// Returns the `p`-th percentile (0 to 100) of `sorted`, which must be sorted ascending and
/// not empty, interpolating linearly between the two closest ranks. This is the default
/// method of numpy's `percentile` (Hyndman and Fan's definition 7).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    debug_assert!(!sorted.is_empty(), "percentile of an empty set");
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lower = rank.floor() as usize;
    let upper = rank.ceil() as usize;
    let fraction = rank - lower as f64;
    sorted[lower] + (sorted[upper] - sorted[lower]) * fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_of_one_value_is_that_value() {
        for p in [0.0, 50.0, 90.0, 99.0, 100.0] {
            assert_eq!(percentile(&[7.0], p), 7.0, "p{p}");
        }
    }

    #[test]
    fn percentile_interpolates_between_ranks() {
        // numpy.percentile([1, 2, 3, 4], q) gives 2.5, 3.7 and 3.97 for q = 50, 90 and 99.
        let values = [1.0, 2.0, 3.0, 4.0];
        assert!((percentile(&values, 50.0) - 2.5).abs() < 1e-12);
        assert!((percentile(&values, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile(&values, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&values, 100.0), 4.0);
    }

    #[test]
    fn percentile_of_hundred_and_one_values_hits_ranks() {
        let values: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 90.0), 90.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
    }

    #[test]
    fn latency_sorts_before_ranking() {
        let values: Vec<Duration> = [30, 10, 20].into_iter().map(Duration::from_millis).collect();
        let latency = Latency::of(&values).expect("three values");
        assert_eq!(latency.count, 3);
        assert!((latency.p50 - 20.0).abs() < 1e-9, "{latency:?}");
        assert!((latency.mean - 20.0).abs() < 1e-9, "{latency:?}");
        assert!((latency.max - 30.0).abs() < 1e-9, "{latency:?}");
        assert!(latency.p50 <= latency.p90, "{latency:?}");
        assert!(latency.p90 <= latency.p99, "{latency:?}");
        assert!(latency.p99 <= latency.max, "{latency:?}");
    }

    #[test]
    fn latency_of_nothing_is_none() {
        assert_eq!(Latency::of(&[]), None);
    }
}
