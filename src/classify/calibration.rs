//! Threshold calibration: the accuracy and coverage of the answers kept at every confidence
//! threshold, and the threshold that keeps the most answers while their accuracy, as the lower
//! bound of its Wilson interval, still reaches a target.
//!
//! A task answers locally when the confidence is at least its threshold and escalates below
//! it, so the answers kept at threshold `t` are those with confidence `>= t`. The curve has one
//! point per distinct confidence, because only there does the kept set change.

use std::cmp::Ordering;

use serde::Serialize;

use super::metrics::{wilson_interval, Prediction, Z_95};

/// The answers kept at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    pub threshold: f64,
    /// Answers with a confidence of at least `threshold`.
    pub kept: usize,
    /// `kept` as a share of all answers.
    pub coverage: f64,
    /// Accuracy of the kept answers.
    pub accuracy: f64,
    /// The 95 % Wilson interval of `accuracy`.
    pub lower: f64,
    pub upper: f64,
}

/// Returns one point per distinct confidence, from the highest threshold (fewest answers kept)
/// to the lowest (all kept). Predictions with a NaN confidence are never kept but count in the
/// coverage's denominator.
pub fn curve(predictions: &[Prediction]) -> Vec<CurvePoint> {
    let total = predictions.len();
    let mut order: Vec<&Prediction> = predictions.iter().filter(|p| !p.confidence.is_nan()).collect();
    order.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    let mut points = Vec::new();
    let mut correct = 0;
    for (index, prediction) in order.iter().enumerate() {
        correct += usize::from(prediction.is_correct());
        let kept = index + 1;
        // A point stands for all predictions of its confidence, so it is added after the last.
        let next_is_tie = order
            .get(kept)
            .is_some_and(|next| next.confidence.total_cmp(&prediction.confidence) == Ordering::Equal);
        if next_is_tie {
            continue;
        }
        let Some((lower, upper)) = wilson_interval(correct, kept, Z_95) else {
            continue;
        };
        points.push(CurvePoint {
            threshold: prediction.confidence,
            kept,
            coverage: kept as f64 / total as f64,
            accuracy: correct as f64 / kept as f64,
            lower,
            upper,
        });
    }
    points
}

/// Returns the point that keeps the most answers while the lower bound of their accuracy is at
/// least `target`, or `None` when no threshold gets there.
///
/// The lower bound is not monotone in the threshold, so every point is checked rather than
/// stopping at the first that falls short.
pub fn choose(curve: &[CurvePoint], target: f64) -> Option<CurvePoint> {
    curve
        .iter()
        .filter(|point| point.lower >= target)
        .max_by_key(|point| point.kept)
        .copied()
}

/// Returns the point with the highest lower bound, which tells how far from the target the
/// data is when [`choose`] finds nothing. Ties go to the larger coverage.
pub fn best_lower_bound(curve: &[CurvePoint]) -> Option<CurvePoint> {
    curve
        .iter()
        .max_by(|a, b| a.lower.total_cmp(&b.lower).then(a.kept.cmp(&b.kept)))
        .copied()
}

/// Returns a threshold to configure for `point`: the number with the fewest decimals (up to
/// six) that keeps the same answers, so that the config reads `0.9973` rather than
/// `0.997228914521003`. Returns the exact confidence when no such number exists.
pub fn configured_threshold(curve: &[CurvePoint], point: &CurvePoint) -> f64 {
    let next_lower = curve
        .iter()
        .map(|p| p.threshold)
        .filter(|&t| t < point.threshold)
        .max_by(f64::total_cmp);
    (1..=6)
        .map(|decimals| {
            let scale = 10f64.powi(decimals);
            (point.threshold * scale).floor() / scale
        })
        .find(|&rounded| next_lower.is_none_or(|next| rounded > next))
        .unwrap_or(point.threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(correct: bool, confidence: f64) -> Prediction {
        Prediction {
            predicted: 0,
            truth: usize::from(!correct),
            confidence,
        }
    }

    #[test]
    fn curve_has_one_point_per_distinct_confidence() {
        let predictions = [
            prediction(true, 0.9),
            prediction(false, 0.6),
            prediction(true, 0.9),
            prediction(true, 0.7),
            prediction(false, f64::NAN),
        ];
        let points = curve(&predictions);
        let summary: Vec<(f64, usize, f64)> = points.iter().map(|p| (p.threshold, p.kept, p.accuracy)).collect();
        assert_eq!(summary, vec![(0.9, 2, 1.0), (0.7, 3, 1.0), (0.6, 4, 0.75)]);
        assert_eq!(points[2].coverage, 4.0 / 5.0);
        let (lower, upper) = wilson_interval(3, 4, Z_95).expect("interval");
        assert_eq!((points[2].lower, points[2].upper), (lower, upper));
    }

    #[test]
    fn choice_skips_a_dip_in_the_lower_bound() {
        // 40 correct answers at 0.99, then 10 at 0.9 of which 5 are wrong, then 50 correct at
        // 0.8: the lower bound dips at 0.9 and recovers at 0.8.
        let mut predictions = vec![prediction(true, 0.99); 40];
        predictions.extend((0..10).map(|i| prediction(i % 2 == 0, 0.9)));
        predictions.extend(vec![prediction(true, 0.8); 50]);
        let points = curve(&predictions);
        assert_eq!(points.len(), 3);
        let target = points[2].lower - 1e-9;
        assert!(points[1].lower < target, "the middle point falls short: {points:?}");
        let chosen = choose(&points, target).expect("a threshold reaches the target");
        assert_eq!((chosen.threshold, chosen.kept), (0.8, 100));
    }

    #[test]
    fn small_data_does_not_reach_a_high_target() {
        // Ten correct answers are 100 % accurate, but their 95 % lower bound is about 0.72.
        let predictions = vec![prediction(true, 0.95); 10];
        let points = curve(&predictions);
        assert!(choose(&points, 0.95).is_none());
        let best = best_lower_bound(&points).expect("one point");
        assert!((best.lower - 0.7225).abs() < 1e-3, "{best:?}");
    }

    #[test]
    fn configured_threshold_is_shortest_decimal() {
        let predictions = [prediction(true, 0.973_118), prediction(true, 0.9), prediction(true, 0.973_15)];
        let points = curve(&predictions);
        assert_eq!(configured_threshold(&points, &points[1]), 0.97);
        assert_eq!(configured_threshold(&points, &points[0]), 0.97315);
        assert_eq!(configured_threshold(&points, &points[2]), 0.9);
        let close = [prediction(true, 0.973_118_4), prediction(true, 0.973_118_1)];
        let points = curve(&close);
        assert_eq!(configured_threshold(&points, &points[0]), 0.973_118_4);
    }
}
