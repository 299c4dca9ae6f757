//! Next-token selection: greedy at temperature 0, otherwise temperature, top-k and top-p
//! sampling from a seeded generator so a request with a `seed` is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// A chosen token with its log-probability and, when requested, the most likely alternatives.
#[derive(Debug, Clone)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Picks the next token from raw `logits`. With `logprobs`, it also returns the token's
    /// log-probability and that many alternatives, from the unmodified distribution as OpenAI
    /// reports them. Without it, `logprob` is 0 and the full-vocabulary normalisation is skipped.
    pub fn sample(&mut self, logits: &[f32], logprobs: Option<usize>) -> SampledToken {
        let id = if self.is_greedy() {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        let Some(top_logprobs) = logprobs else {
            return SampledToken {
                id,
                logprob: 0.0,
                top: Vec::new(),
            };
        };

        let log_norm = log_sum_exp(logits);
        let logprob = logits[id as usize] - log_norm;
        let top = if top_logprobs == 0 {
            Vec::new()
        } else {
            top_k_indices(logits, top_logprobs)
                .into_iter()
                .map(|i| (i as u32, logits[i] - log_norm))
                .collect()
        };
        SampledToken { id, logprob, top }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.params.temperature;
        if self.params.top_k == 0 && self.params.top_p >= 1.0 {
            return self.sample_full(logits);
        }
        let mut candidates: Vec<usize> = if self.params.top_k > 0 {
            top_k_indices(logits, self.params.top_k)
        } else {
            let mut all: Vec<usize> = (0..logits.len()).collect();
            all.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            all
        };

        let max = logits[candidates[0]];
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|&i| ((logits[i] - max) / temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);

        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (index, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p {
                    keep = index + 1;
                    break;
                }
            }
            candidates.truncate(keep);
            probs.truncate(keep);
        }

        let total: f32 = probs.iter().sum();
        let mut threshold = self.rng.random::<f32>() * total;
        for (index, p) in probs.iter().enumerate() {
            threshold -= p;
            if threshold <= 0.0 {
                return candidates[index] as u32;
            }
        }
        candidates[probs.len() - 1] as u32
    }
}

impl Sampler {
    /// Samples from the whole vocabulary in one linear pass: no sorting is needed when neither
    /// top-k nor top-p cuts the distribution.
    fn sample_full(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = logits.iter().map(|l| ((l - max) / temperature).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut threshold = self.rng.random::<f32>() * total;
        for (index, weight) in weights.iter().enumerate() {
            threshold -= weight;
            if threshold <= 0.0 {
                return index as u32;
            }
        }
        argmax(logits)
    }
}

/// Index of the largest logit; ties go to the lower id, as in llama.cpp's greedy sampler.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in logits.iter().enumerate() {
        if *value > logits[best] {
            best = index;
        }
    }
    best as u32
}

/// Indices of the `k` largest logits, largest first.
pub fn top_k_indices(logits: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(logits.len());
    let mut indices: Vec<usize> = (0..logits.len()).collect();
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k < indices.len() {
        indices.select_nth_unstable_by(k, order);
        indices.truncate(k);
    }
    indices.sort_unstable_by(order);
    indices
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_first_maximum() {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(sampler.sample(&[0.5, 2.0, 2.0, -1.0], None).id, 1);
    }

    #[test]
    fn seeded_sampling_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            seed: Some(42),
        };
        let run = |params: &SamplingParams| {
            let mut sampler = Sampler::new(params.clone());
            (0..20).map(|_| sampler.sample(&logits, None).id).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
    }

    #[test]
    fn full_sampling_follows_the_distribution() {
        // Token 1 has probability e^2 / (1 + e^2 + 1) = 0.79 at temperature 1.
        let logits = [0.0, 2.0, 0.0];
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(3),
            ..Default::default()
        });
        let draws = 2000;
        let ones = (0..draws).filter(|_| sampler.sample(&logits, None).id == 1).count();
        let share = ones as f64 / draws as f64;
        assert!((share - 0.787).abs() < 0.04, "token 1 drawn {share:.3} of the time");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 3.0, 0.2, 2.9];
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: Some(7),
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(sampler.sample(&logits, None).id, 1);
        }
    }

    #[test]
    fn logprobs_are_normalised() {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        let token = sampler.sample(&[1.0, 2.0, 3.0], Some(3));
        let total: f32 = token.top.iter().map(|(_, lp)| lp.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
        assert_eq!(token.top[0].0, 2);
    }
}
