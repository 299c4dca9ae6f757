//! Evaluation of classifier predictions: accuracy, macro-F1, expected calibration error, and
//! accuracy against coverage at confidence thresholds, with Wilson score intervals.
//!
//! `tierd eval` prints these, and threshold calibration picks thresholds from the coverage rows.
//! A metric that averages over an empty set is NaN (or `None` where the type is an `Option`),
//! because 0 would read as a measured score. Confidences are expected to lie in [0, 1].

use std::cmp::Ordering;

use serde::Serialize;

/// The z value of a two-sided 95 % normal interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// One classified sample: the predicted class index, the true class index and the confidence of
/// the prediction (usually the top softmax probability).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub predicted: usize,
    pub truth: usize,
    pub confidence: f64,
}

impl Prediction {
    pub fn is_correct(&self) -> bool {
        self.predicted == self.truth
    }
}

/// Returns the share of correct predictions, or NaN for no predictions.
pub fn accuracy(predictions: &[Prediction]) -> f64 {
    let correct = predictions.iter().filter(|p| p.is_correct()).count();
    ratio(correct, predictions.len()).unwrap_or(f64::NAN)
}

/// Per-class counts of true positives, predictions and true occurrences (support), from which
/// precision, recall and F1 follow.
///
/// Only classes below `classes` get counts, but an invalid index still lowers the scores instead
/// of vanishing. A prediction with a larger index counts as a miss for its true class. A true
/// class with a larger index counts as a false positive for the predicted class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassCounts {
    pub true_positives: Vec<usize>,
    /// Number of predictions of each class.
    pub predicted: Vec<usize>,
    /// Number of samples whose true class is each class.
    pub support: Vec<usize>,
}

impl ClassCounts {
    pub fn new(predictions: &[Prediction], classes: usize) -> Self {
        let mut counts = Self {
            true_positives: vec![0; classes],
            predicted: vec![0; classes],
            support: vec![0; classes],
        };
        for prediction in predictions {
            if let Some(count) = counts.predicted.get_mut(prediction.predicted) {
                *count += 1;
            }
            if let Some(count) = counts.support.get_mut(prediction.truth) {
                *count += 1;
            }
            if prediction.is_correct() {
                if let Some(count) = counts.true_positives.get_mut(prediction.truth) {
                    *count += 1;
                }
            }
        }
        counts
    }

    pub fn classes(&self) -> usize {
        self.support.len()
    }

    /// Returns `TP / predicted`, or `None` when the class was never predicted or is out of
    /// range.
    pub fn precision(&self, class: usize) -> Option<f64> {
        let predicted = *self.predicted.get(class)?;
        ratio(self.true_positives[class], predicted)
    }

    /// Returns `TP / support`, or `None` when the class never occurs as truth or is out of
    /// range.
    pub fn recall(&self, class: usize) -> Option<f64> {
        let support = *self.support.get(class)?;
        ratio(self.true_positives[class], support)
    }

    /// Returns `2·TP / (predicted + support)`, which equals `2·TP / (2·TP + FP + FN)`. It is
    /// `None` when the class occurs neither as truth nor as prediction, and 0 when it occurs
    /// but is never predicted correctly.
    pub fn f1(&self, class: usize) -> Option<f64> {
        let occurrences = self.predicted.get(class)? + self.support[class];
        ratio(2 * self.true_positives[class], occurrences)
    }
}

fn ratio(numerator: usize, denominator: usize) -> Option<f64> {
    if denominator == 0 {
        return None;
    }
    Some(numerator as f64 / denominator as f64)
}

/// Returns the unweighted mean of the per-class F1 over the classes below `classes` that occur in
/// the truth or in the predictions, as scikit-learn's `f1_score(average="macro")` does with its
/// default labels. A class that occurs only as truth, never predicted, contributes an F1 of 0.
/// Returns NaN when no class occurs, which includes empty input.
pub fn macro_f1(predictions: &[Prediction], classes: usize) -> f64 {
    let counts = ClassCounts::new(predictions, classes);
    let scores: Vec<f64> = (0..classes).filter_map(|class| counts.f1(class)).collect();
    if scores.is_empty() {
        return f64::NAN;
    }
    scores.iter().sum::<f64>() / scores.len() as f64
}

/// Computes the expected calibration error over `bins` equal-width confidence bins on [0, 1]:
/// the mean over bins of `|accuracy − mean confidence|`, weighted by the share of predictions in
/// each bin.
///
/// Bin `k` contains the confidences in `[k/bins, (k+1)/bins)`, as computed by
/// `floor(confidence · bins)`, except that the last bin also contains 1.0. Confidences below 0 fall
/// in the first bin and those above 1 in the last. A NaN confidence makes the result NaN.
/// Returns NaN for no predictions or 0 bins.
pub fn expected_calibration_error(predictions: &[Prediction], bins: usize) -> f64 {
    if predictions.is_empty() || bins == 0 {
        return f64::NAN;
    }

    let mut counts = vec![0usize; bins];
    let mut correct = vec![0usize; bins];
    let mut confidence_sums = vec![0.0f64; bins];
    for prediction in predictions {
        // `as usize` saturates, so negative values and NaN land in bin 0.
        let bin = ((prediction.confidence * bins as f64).floor() as usize).min(bins - 1);
        counts[bin] += 1;
        confidence_sums[bin] += prediction.confidence;
        if prediction.is_correct() {
            correct[bin] += 1;
        }
    }

    let total = predictions.len() as f64;
    let mut error = 0.0;
    for bin in 0..bins {
        if counts[bin] == 0 {
            continue;
        }
        let size = counts[bin] as f64;
        let gap = (correct[bin] as f64 / size - confidence_sums[bin] / size).abs();
        error += size / total * gap;
    }
    error
}

/// Accuracy of the predictions answered at one confidence threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CoverageRow {
    pub threshold: f64,
    /// Number of predictions answered (kept) at this threshold.
    pub answered: usize,
    /// `answered` as a share of all predictions, 0 when there are none.
    pub coverage: f64,
    /// Accuracy of the answered predictions, `None` when none is answered.
    pub accuracy: Option<f64>,
    /// 95 % Wilson score interval of `accuracy`, `None` when none is answered.
    pub interval: Option<(f64, f64)>,
}

impl CoverageRow {
    fn new(threshold: f64, answered: usize, correct: usize, total: usize) -> Self {
        let coverage = if total == 0 {
            0.0
        } else {
            answered as f64 / total as f64
        };
        Self {
            threshold,
            answered,
            coverage,
            accuracy: ratio(correct, answered),
            interval: wilson_interval(correct, answered, Z_95),
        }
    }
}

/// Builds one row per threshold, in the order given. A prediction counts as answered at a
/// threshold when its confidence is at least the threshold, so a NaN confidence is never
/// answered.
pub fn coverage_table(predictions: &[Prediction], thresholds: &[f64]) -> Vec<CoverageRow> {
    thresholds
        .iter()
        .map(|&threshold| {
            let answered: Vec<&Prediction> = predictions
                .iter()
                .filter(|p| p.confidence >= threshold)
                .collect();
            let correct = answered.iter().filter(|p| p.is_correct()).count();
            CoverageRow::new(threshold, answered.len(), correct, predictions.len())
        })
        .collect()
}

/// Keeps the `coverage` share of predictions with the highest confidence and returns their row.
///
/// The number kept is the smallest `k` with `k / n ≥ coverage`, where a product `coverage · n`
/// within 1e-9 of an integer counts as that integer, so that 0.7 of 10 keeps 7 and not 8.
/// Coverage is clamped to [0, 1], and NaN keeps nothing. Ties in confidence are broken by input
/// order, and NaN confidences sort last. The row's threshold is the lowest kept confidence, or
/// infinity when nothing is kept, and its coverage is `k / n`. Unlike [`coverage_table`] at the
/// same threshold, the row excludes tied predictions beyond the first `k`.
pub fn most_confident(predictions: &[Prediction], coverage: f64) -> CoverageRow {
    let total = predictions.len();
    let answered = answered_count(total, coverage);

    let mut order: Vec<&Prediction> = predictions.iter().collect();
    // `sort_by` is stable, so equal confidences keep their input order.
    order.sort_by(|a, b| descending_nan_last(a.confidence, b.confidence));
    let top = &order[..answered];

    let threshold = top.last().map_or(f64::INFINITY, |p| p.confidence);
    let correct = top.iter().filter(|p| p.is_correct()).count();
    CoverageRow::new(threshold, answered, correct, total)
}

fn answered_count(total: usize, coverage: f64) -> usize {
    if coverage.is_nan() || coverage <= 0.0 {
        return 0;
    }
    let exact = coverage.min(1.0) * total as f64;
    let nearest = exact.round();
    let count = if (exact - nearest).abs() <= 1e-9 {
        nearest
    } else {
        exact.ceil()
    };
    (count as usize).min(total)
}

fn descending_nan_last(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => b.total_cmp(&a),
    }
}

/// Computes the Wilson score interval for a binomial proportion of `correct` successes in
/// `total` trials at normal quantile `z` (use [`Z_95`] for 95 %). Unlike the normal
/// approximation, it stays inside [0, 1] and is usable for small `total` and proportions near 0
/// or 1. Returns `None` when `total` is 0, `correct > total`, or `z` is negative or not finite.
pub fn wilson_interval(correct: usize, total: usize, z: f64) -> Option<(f64, f64)> {
    if total == 0 || correct > total || !(z.is_finite() && z >= 0.0) {
        return None;
    }
    let n = total as f64;
    let p = correct as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denominator;
    let half_width = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    // Rounding can push a bound a few ulps outside [0, 1] when p is 0 or 1.
    Some((
        (center - half_width).max(0.0),
        (center + half_width).min(1.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(predicted: usize, truth: usize, confidence: f64) -> Prediction {
        Prediction {
            predicted,
            truth,
            confidence,
        }
    }

    fn assert_close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "expected {expected}, got {actual}"
        );
    }

    fn assert_some_close(actual: Option<f64>, expected: f64) {
        match actual {
            Some(value) => assert_close(value, expected, 1e-12),
            None => panic!("expected {expected}, got None"),
        }
    }

    #[test]
    fn accuracy_counts_correct_share() {
        let predictions = [
            prediction(0, 0, 0.9),
            prediction(1, 0, 0.8),
            prediction(2, 2, 0.7),
            prediction(1, 1, 0.6),
        ];

        assert_close(accuracy(&predictions), 0.75, 1e-12);
        assert!(accuracy(&[]).is_nan());
    }

    #[test]
    fn macro_f1_with_class_never_predicted() {
        // truth     0 0 1 1 2
        // predicted 0 0 0 1 1
        // class 0: TP 2, predicted 3, support 2 → F1 = 4/5 = 0.8
        // class 1: TP 1, predicted 2, support 2 → F1 = 2/4 = 0.5
        // class 2: TP 0, predicted 0, support 1 → F1 = 0
        // class 3 occurs nowhere and is left out: (0.8 + 0.5 + 0) / 3.
        let predictions = [
            prediction(0, 0, 0.9),
            prediction(0, 0, 0.9),
            prediction(0, 1, 0.9),
            prediction(1, 1, 0.9),
            prediction(1, 2, 0.9),
        ];

        assert_close(macro_f1(&predictions, 4), 1.3 / 3.0, 1e-12);
    }

    #[test]
    fn macro_f1_empty_is_nan() {
        assert!(macro_f1(&[], 3).is_nan());
        assert!(macro_f1(&[prediction(0, 0, 1.0)], 0).is_nan());
    }

    #[test]
    fn out_of_range_class_counts_as_error() {
        // Class 5 is outside the 2 classes: the first sample is a miss for class 0, and the
        // second a false positive for class 1.
        let predictions = [
            prediction(5, 0, 0.9),
            prediction(1, 5, 0.9),
            prediction(1, 1, 0.9),
        ];

        let counts = ClassCounts::new(&predictions, 2);

        assert_eq!(counts.true_positives, vec![0, 1]);
        assert_eq!(counts.predicted, vec![0, 2]);
        assert_eq!(counts.support, vec![1, 1]);
        assert_eq!(counts.precision(5), None);
        // Class 0 has F1 = 0 / 1 = 0 and class 1 has F1 = 2 / 3.
        assert_close(macro_f1(&predictions, 2), (0.0 + 2.0 / 3.0) / 2.0, 1e-12);
    }

    #[test]
    fn class_counts_precision_recall_f1() {
        // truth     0 0 1 1
        // predicted 0 1 1 1
        let predictions = [
            prediction(0, 0, 0.9),
            prediction(1, 0, 0.9),
            prediction(1, 1, 0.9),
            prediction(1, 1, 0.9),
        ];

        let counts = ClassCounts::new(&predictions, 3);

        assert_eq!(counts.classes(), 3);
        assert_some_close(counts.precision(0), 1.0);
        assert_some_close(counts.recall(0), 0.5);
        assert_some_close(counts.f1(0), 2.0 / 3.0);
        assert_some_close(counts.precision(1), 2.0 / 3.0);
        assert_some_close(counts.recall(1), 1.0);
        assert_some_close(counts.f1(1), 0.8);
        assert_eq!(counts.precision(2), None);
        assert_eq!(counts.recall(2), None);
        assert_eq!(counts.f1(2), None);
    }

    #[test]
    fn ece_matches_hand_computation() {
        // 4 bins of width 0.25:
        // bin 0: 0.1 wrong, 0.2 right → accuracy 0.5, mean confidence 0.15, gap 0.35
        // bin 1: empty
        // bin 2: 0.6 right, 0.7 wrong → accuracy 0.5, mean confidence 0.65, gap 0.15
        // bin 3: 0.9 right, 1.0 right → accuracy 1.0, mean confidence 0.95, gap 0.05
        // Each non-empty bin contains 2 of 6 predictions: (0.35 + 0.15 + 0.05) / 3 = 0.55 / 3.
        let predictions = [
            prediction(1, 0, 0.1),
            prediction(0, 0, 0.2),
            prediction(0, 0, 0.6),
            prediction(1, 0, 0.7),
            prediction(0, 0, 0.9),
            prediction(0, 0, 1.0),
        ];

        assert_close(
            expected_calibration_error(&predictions, 4),
            0.55 / 3.0,
            1e-12,
        );
    }

    #[test]
    fn ece_bin_edge_goes_to_upper_bin() {
        // 2 bins. The two 0.5 predictions belong to bin 1 ([0.5, 1]): accuracy 1, confidence
        // 0.5, gap 0.5, weight 2/3. Bin 0 contains 0.4 wrong: gap 0.4, weight 1/3.
        // ECE = 1/3 + 0.4/3 = 1.4 / 3. With 0.5 in bin 0 it would be |2/3 − 1.4/3| = 0.2.
        let predictions = [
            prediction(0, 0, 0.5),
            prediction(0, 0, 0.5),
            prediction(1, 0, 0.4),
        ];

        assert_close(
            expected_calibration_error(&predictions, 2),
            1.4 / 3.0,
            1e-12,
        );
    }

    #[test]
    fn ece_empty_or_zero_bins_is_nan() {
        assert!(expected_calibration_error(&[], 10).is_nan());
        assert!(expected_calibration_error(&[prediction(0, 0, 0.5)], 0).is_nan());
    }

    #[test]
    fn ece_perfect_calibration_is_zero() {
        // One bin: accuracy 0.5 and mean confidence 0.5.
        let predictions = [prediction(0, 0, 0.5), prediction(1, 0, 0.5)];

        assert_eq!(expected_calibration_error(&predictions, 1), 0.0);
    }

    #[test]
    fn coverage_table_rows() {
        let predictions = [
            prediction(0, 0, 0.9),
            prediction(1, 0, 0.8),
            prediction(0, 0, 0.7),
            prediction(0, 0, 0.6),
            prediction(1, 0, 0.3),
        ];

        let rows = coverage_table(&predictions, &[0.0, 0.6, 0.85, 0.95]);

        assert_eq!(rows.len(), 4);
        // Threshold 0: all 5 answered, 3 correct.
        assert_eq!(rows[0].answered, 5);
        assert_close(rows[0].coverage, 1.0, 1e-12);
        assert_some_close(rows[0].accuracy, 0.6);
        assert_eq!(rows[0].interval, wilson_interval(3, 5, Z_95));
        // Threshold 0.6 includes the prediction at exactly 0.6: 4 answered, 3 correct.
        assert_eq!(rows[1].answered, 4);
        assert_close(rows[1].coverage, 0.8, 1e-12);
        assert_some_close(rows[1].accuracy, 0.75);
        // Threshold 0.85: only the 0.9 prediction.
        assert_eq!(rows[2].answered, 1);
        assert_some_close(rows[2].accuracy, 1.0);
        // Threshold 0.95: nothing answered.
        assert_eq!(rows[3].threshold, 0.95);
        assert_eq!(rows[3].answered, 0);
        assert_eq!(rows[3].coverage, 0.0);
        assert_eq!(rows[3].accuracy, None);
        assert_eq!(rows[3].interval, None);
    }

    #[test]
    fn coverage_table_empty_input() {
        let rows = coverage_table(&[], &[0.5]);

        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].answered, 0);
        assert_eq!(rows[0].coverage, 0.0);
        assert_eq!(rows[0].accuracy, None);
    }

    #[test]
    fn most_confident_breaks_ties_by_input_order() {
        // Predictions 1 and 2 tie at 0.8, and prediction 1 (wrong) comes first in the input.
        let predictions = [
            prediction(0, 0, 0.9),
            prediction(1, 0, 0.8),
            prediction(0, 0, 0.8),
            prediction(0, 0, 0.6),
            prediction(1, 0, 0.3),
        ];

        // 0.4 of 5 keeps 2: the 0.9 and the first 0.8.
        let row = most_confident(&predictions, 0.4);
        assert_eq!(row.answered, 2);
        assert_eq!(row.threshold, 0.8);
        assert_close(row.coverage, 0.4, 1e-12);
        assert_some_close(row.accuracy, 0.5);

        // 0.5 of 5 is 2.5, rounded up to 3.
        let row = most_confident(&predictions, 0.5);
        assert_eq!(row.answered, 3);
        assert_eq!(row.threshold, 0.8);
        assert_close(row.coverage, 0.6, 1e-12);
        assert_some_close(row.accuracy, 2.0 / 3.0);

        let row = most_confident(&predictions, 1.0);
        assert_eq!(row.answered, 5);
        assert_eq!(row.threshold, 0.3);
        assert_some_close(row.accuracy, 0.6);
    }

    #[test]
    fn most_confident_ignores_rounding_in_share() {
        // 0.7 · 10 is 7.000000000000001 in f64, which must keep 7, not 8.
        let predictions: Vec<Prediction> = (0..10)
            .map(|i| prediction(0, 0, 1.0 - f64::from(i) * 0.05))
            .collect();

        let row = most_confident(&predictions, 0.7);

        assert_eq!(row.answered, 7);
        assert_eq!(row.threshold, predictions[6].confidence);
    }

    #[test]
    fn most_confident_edge_cases() {
        let predictions = [prediction(0, 0, 0.9), prediction(1, 0, f64::NAN)];

        let nothing = most_confident(&predictions, 0.0);
        assert_eq!(nothing.answered, 0);
        assert_eq!(nothing.threshold, f64::INFINITY);
        assert_eq!(nothing.accuracy, None);

        // NaN confidence sorts last, so half keeps the 0.9 prediction.
        let half = most_confident(&predictions, 0.5);
        assert_eq!(half.answered, 1);
        assert_eq!(half.threshold, 0.9);

        assert_eq!(most_confident(&predictions, f64::NAN).answered, 0);
        assert_eq!(most_confident(&predictions, 2.0).answered, 2);

        let empty = most_confident(&[], 0.5);
        assert_eq!(empty.answered, 0);
        assert_eq!(empty.coverage, 0.0);
        assert_eq!(empty.accuracy, None);
        assert_eq!(empty.interval, None);
    }

    #[test]
    fn wilson_interval_known_values() {
        // 8 of 10 at z = 1.96: center 0.99208 / 1.38416, half-width
        // 1.96 / 1.38416 · sqrt(0.016 + 0.009604) → (0.4902, 0.9433).
        let (low, high) = wilson_interval(8, 10, 1.96).expect("total > 0");
        assert_close(low, 0.490_16, 1e-5);
        assert_close(high, 0.943_32, 1e-5);

        // 0 of 10: lower bound 0, upper bound z² / (n + z²) = 3.8416 / 13.8416.
        let (low, high) = wilson_interval(0, 10, 1.96).expect("total > 0");
        assert_eq!(low, 0.0);
        assert_close(high, 3.8416 / 13.8416, 1e-12);

        // 10 of 10: lower bound n / (n + z²), upper bound 1.
        let (low, high) = wilson_interval(10, 10, 1.96).expect("total > 0");
        assert_close(low, 10.0 / 13.8416, 1e-12);
        assert_eq!(high, 1.0);
    }

    #[test]
    fn wilson_interval_invalid_input() {
        assert_eq!(wilson_interval(0, 0, Z_95), None);
        assert_eq!(wilson_interval(3, 2, Z_95), None);
        assert_eq!(wilson_interval(1, 2, -1.0), None);
        assert_eq!(wilson_interval(1, 2, f64::NAN), None);
    }
}
