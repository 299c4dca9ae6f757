//! Confidence of a generated completion, computed from its tokens' log-probabilities.

use super::config::ConfidenceMetric;
use crate::engine::TokenLogprob;

/// Alternatives per token that the engine must report for every metric to be computed: the
/// margin needs the two most likely tokens.
pub const TOP_LOGPROBS_NEEDED: usize = 2;

/// Returns the completion's confidence in [0, 1] under `metric`. A completion without scored
/// tokens gets 0, because the model ended its turn at once and nothing argues for keeping it.
pub fn answer_confidence(metric: ConfidenceMetric, tokens: &[TokenLogprob]) -> f64 {
    if tokens.is_empty() {
        return 0.0;
    }
    let count = tokens.len() as f64;
    let value = match metric {
        ConfidenceMetric::Mean => {
            let mean = tokens.iter().map(|t| f64::from(t.logprob)).sum::<f64>() / count;
            mean.exp()
        }
        ConfidenceMetric::Min => tokens
            .iter()
            .map(|t| f64::from(t.logprob).exp())
            .fold(f64::INFINITY, f64::min),
        ConfidenceMetric::Margin => {
            tokens
                .iter()
                .map(|t| {
                    let first = t.top.first().map_or(f64::from(t.logprob), |(_, lp, _)| f64::from(*lp));
                    let second = t.top.get(1).map_or(f64::NEG_INFINITY, |(_, lp, _)| f64::from(*lp));
                    first.exp() - second.exp()
                })
                .sum::<f64>()
                / count
        }
    };
    value.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(logprob: f32, top: &[f32]) -> TokenLogprob {
        TokenLogprob {
            token: String::new(),
            bytes: Vec::new(),
            logprob,
            top: top.iter().map(|lp| (String::new(), *lp, Vec::new())).collect(),
        }
    }

    #[test]
    fn metrics_follow_their_definitions() {
        let tokens = [
            token(0.5f32.ln(), &[0.5f32.ln(), 0.3f32.ln()]),
            token(0.8f32.ln(), &[0.8f32.ln(), 0.1f32.ln()]),
        ];
        let mean = answer_confidence(ConfidenceMetric::Mean, &tokens);
        assert!((mean - (0.5f64 * 0.8).sqrt()).abs() < 1e-6, "{mean}");
        let min = answer_confidence(ConfidenceMetric::Min, &tokens);
        assert!((min - 0.5).abs() < 1e-6, "{min}");
        let margin = answer_confidence(ConfidenceMetric::Margin, &tokens);
        assert!((margin - (0.2 + 0.7) / 2.0).abs() < 1e-6, "{margin}");
    }

    #[test]
    fn empty_answer_has_no_confidence() {
        assert_eq!(answer_confidence(ConfidenceMetric::Mean, &[]), 0.0);
    }

    #[test]
    fn sampled_token_below_the_top_gets_a_small_margin() {
        // A sampled token that is not the most likely one still yields the top-two gap.
        let tokens = [token(0.2f32.ln(), &[0.6f32.ln(), 0.2f32.ln()])];
        let margin = answer_confidence(ConfidenceMetric::Margin, &tokens);
        assert!((margin - 0.4).abs() < 1e-6, "{margin}");
    }
}
