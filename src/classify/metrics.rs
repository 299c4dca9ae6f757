//! Evaluation of classifier predictions: accuracy, macro-F1, expected calibration error, and
//! accuracy against coverage when only answers above a confidence threshold are kept.

use serde::Serialize;

/// One classified example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub predicted: usize,
    pub truth: usize,
    /// Probability the classifier gave its predicted label, in 0..=1.
    pub confidence: f64,
}

impl Prediction {
    pub fn correct(&self) -> bool {
        self.predicted == self.truth
    }
}

/// Share of correct predictions; 0 for no predictions.
pub fn accuracy(predictions: &[Prediction]) -> f64 {
    if predictions.is_empty() {
        return 0.0;
    }
    predictions.iter().filter(|p| p.correct()).count() as f64 / predictions.len() as f64
}

/// Mean F1 over the classes below `classes` that occur as a truth or a prediction. A class
/// that never occurs has no defined F1 and is left out rather than counted as 0 or 1.
/// Returns 0 for no predictions.
pub fn macro_f1(predictions: &[Prediction], classes: usize) -> f64 {
    let mut true_positive = vec![0usize; classes];
    let mut predicted = vec![0usize; classes];
    let mut actual = vec![0usize; classes];
    for p in predictions {
        if p.predicted < classes {
            predicted[p.predicted] += 1;
        }
        if p.truth < classes {
            actual[p.truth] += 1;
        }
        if p.correct() && p.truth < classes {
            true_positive[p.truth] += 1;
        }
    }
    let mut sum = 0.0;
    let mut counted = 0;
    for class in 0..classes {
        if predicted[class] == 0 && actual[class] == 0 {
            continue;
        }
        counted += 1;
        // F1 = 2·TP / (2·TP + FP + FN) = 2·TP / (predicted + actual); 0 when TP is 0.
        sum += 2.0 * true_positive[class] as f64 / (predicted[class] + actual[class]) as f64;
    }
    if counted == 0 {
        0.0
    } else {
        sum / counted as f64
    }
}

/// Expected calibration error: predictions are put in `bins` equal-width confidence bins over
/// [0, 1] (a confidence of exactly 1 goes to the last bin), and the gap between each bin's
/// accuracy and mean confidence is averaged, weighted by the bin's share of predictions.
/// Returns 0 for no predictions.
pub fn expected_calibration_error(predictions: &[Prediction], bins: usize) -> f64 {
    if predictions.is_empty() || bins == 0 {
        return 0.0;
    }
    let mut count = vec![0usize; bins];
    let mut correct = vec![0usize; bins];
    let mut confidence = vec![0f64; bins];
    for p in predictions {
        let bin = ((p.confidence.clamp(0.0, 1.0) * bins as f64) as usize).min(bins - 1);
        count[bin] += 1;
        confidence[bin] += p.confidence;
        if p.correct() {
            correct[bin] += 1;
        }
    }
    let total = predictions.len() as f64;
    (0..bins)
        .filter(|&bin| count[bin] > 0)
        .map(|bin| {
            let n = count[bin] as f64;
            (count[bin] as f64 / total) * (correct[bin] as f64 / n - confidence[bin] / n).abs()
        })
        .sum()
}

/// Accuracy of the answers kept at one confidence threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CoverageRow {
    /// Lowest confidence kept.
    pub threshold: f64,
    /// Predictions kept: those with confidence at or above the threshold.
    pub answered: usize,
    /// `answered` as a share of all predictions.
    pub coverage: f64,
    /// Accuracy of the kept predictions; `None` when none are kept.
    pub accuracy: Option<f64>,
    /// 95 % Wilson score interval of that accuracy.
    pub interval: Option<(f64, f64)>,
}

/// z of a two-sided 95 % normal interval.
const Z_95: f64 = 1.959964;

fn row(threshold: f64, kept: &[&Prediction], total: usize) -> CoverageRow {
    let correct = kept.iter().filter(|p| p.correct()).count();
    let answered = kept.len();
    CoverageRow {
        threshold,
        answered,
        coverage: if total == 0 { 0.0 } else { answered as f64 / total as f64 },
        accuracy: (answered > 0).then(|| correct as f64 / answered as f64),
        interval: wilson_interval(correct, answered, Z_95),
    }
}

/// One row per threshold: the predictions with confidence ≥ threshold and their accuracy.
pub fn coverage_table(predictions: &[Prediction], thresholds: &[f64]) -> Vec<CoverageRow> {
    thresholds
        .iter()
        .map(|&threshold| {
            let kept: Vec<&Prediction> = predictions.iter().filter(|p| p.confidence >= threshold).collect();
            row(threshold, &kept, predictions.len())
        })
        .collect()
}

/// The most confident `coverage` share of the predictions (rounded up to whole predictions;
/// ties in confidence keep input order) and their accuracy. The row's threshold is the lowest
/// confidence kept.
pub fn most_confident(predictions: &[Prediction], coverage: f64) -> CoverageRow {
    let mut order: Vec<&Prediction> = predictions.iter().collect();
    order.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    let keep = ((coverage.clamp(0.0, 1.0) * predictions.len() as f64).ceil() as usize).min(predictions.len());
    let kept = &order[..keep];
    let threshold = kept.last().map_or(1.0, |p| p.confidence);
    row(threshold, kept, predictions.len())
}

/// Wilson score interval of a proportion `correct / total` at normal quantile `z`; `None` for
/// no trials. It stays inside [0, 1] and is usable at small counts and at 0 % or 100 %.
pub fn wilson_interval(correct: usize, total: usize, z: f64) -> Option<(f64, f64)> {
    if total == 0 {
        return None;
    }
    let n = total as f64;
    let p = correct as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    Some(((center - half).max(0.0), (center + half).min(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(predicted: usize, truth: usize, confidence: f64) -> Prediction {
        Prediction {
            predicted,
            truth,
            confidence,
        }
    }

    #[test]
    fn accuracy_counts_correct() {
        let predictions = [p(0, 0, 0.9), p(1, 0, 0.6), p(1, 1, 0.7), p(2, 2, 0.8)];
        assert_eq!(accuracy(&predictions), 0.75);
        assert_eq!(accuracy(&[]), 0.0);
    }

    #[test]
    fn macro_f1_skips_absent_class() {
        // Class 0: TP 1, predicted 1, actual 2 -> F1 = 2/3. Class 1: TP 1, predicted 2,
        // actual 1 -> 2/3. Class 2 never occurs and is left out, so the mean is 2/3.
        let predictions = [p(0, 0, 0.9), p(1, 0, 0.6), p(1, 1, 0.7)];
        assert!((macro_f1(&predictions, 3) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn macro_f1_counts_never_predicted_class_as_zero() {
        // Class 1 occurs as a truth but is never predicted: F1 0. Class 0: TP 1, predicted 2,
        // actual 1 -> 2/3. The mean is 1/3.
        let predictions = [p(0, 0, 0.9), p(0, 1, 0.6)];
        assert!((macro_f1(&predictions, 2) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn calibration_error_by_hand() {
        // Ten bins. Bin 9 holds 0.95 (correct) and 1.0 (wrong): accuracy 0.5, mean confidence
        // 0.975, gap 0.475, weight 2/4. Bin 6 holds 0.6 and 0.65, both correct: accuracy 1,
        // mean 0.625, gap 0.375, weight 2/4. ECE = 0.2375 + 0.1875 = 0.425.
        let predictions = [p(0, 0, 0.95), p(0, 1, 1.0), p(1, 1, 0.6), p(1, 1, 0.65)];
        assert!((expected_calibration_error(&predictions, 10) - 0.425).abs() < 1e-12);
        assert_eq!(expected_calibration_error(&[], 10), 0.0);
    }

    #[test]
    fn perfectly_calibrated_has_zero_error() {
        let predictions = [p(0, 0, 1.0), p(1, 1, 1.0)];
        assert_eq!(expected_calibration_error(&predictions, 10), 0.0);
    }

    #[test]
    fn coverage_table_keeps_at_or_above_threshold() {
        let predictions = [p(0, 0, 0.9), p(1, 0, 0.6), p(1, 1, 0.7), p(2, 2, 0.5)];
        let rows = coverage_table(&predictions, &[0.0, 0.7, 0.95]);
        assert_eq!(rows[0].answered, 4);
        assert_eq!(rows[0].accuracy, Some(0.75));
        assert_eq!(rows[1].answered, 2);
        assert_eq!(rows[1].coverage, 0.5);
        assert_eq!(rows[1].accuracy, Some(1.0));
        assert_eq!(rows[2].answered, 0);
        assert_eq!(rows[2].accuracy, None);
        assert_eq!(rows[2].interval, None);
    }

    #[test]
    fn most_confident_takes_top_share() {
        let predictions = [p(0, 0, 0.9), p(1, 0, 0.6), p(1, 1, 0.7), p(2, 2, 0.5)];
        let row = most_confident(&predictions, 0.5);
        assert_eq!(row.answered, 2);
        assert_eq!(row.threshold, 0.7);
        assert_eq!(row.accuracy, Some(1.0));
        // 70 % of 4 rounds up to 3.
        let row = most_confident(&predictions, 0.7);
        assert_eq!(row.answered, 3);
        assert_eq!(row.threshold, 0.6);
        assert!((row.accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(most_confident(&[], 0.7).answered, 0);
    }

    #[test]
    fn wilson_interval_known_value() {
        // 8 of 10 at z = 1.96: (0.490, 0.943), as tabulated for the Wilson score interval.
        let (low, high) = wilson_interval(8, 10, 1.96).unwrap();
        assert!((low - 0.4902).abs() < 5e-4, "{low}");
        assert!((high - 0.9433).abs() < 5e-4, "{high}");
        assert_eq!(wilson_interval(0, 0, 1.96), None);
        let (low, high) = wilson_interval(10, 10, 1.96).unwrap();
        assert!(high <= 1.0 && low > 0.6, "({low}, {high})");
    }
}
