//! Label scoring with a causal language model: the log-probability of each label's tokens
//! after a prompt, computed by teacher forcing over the vocabulary rows the labels need.
//!
//! The labels form a token trie. At each trie node the model's logits are computed only for
//! the node's children, and a softmax over those children gives the probability of each
//! branch. A label's score is the sum of the log-probabilities along its path, which is the
//! log-probability that decoding constrained to the label set produces that label. The scores
//! of all labels therefore form a distribution, and the prompt is run once for all of them.
//!
//! When one label's tokens are a prefix of another's, the caller appends an end token to every
//! label (see [`LabelSet::new`]), so the shorter label is a branch of its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::model::{KvCache, LanguageModel};

/// Prompt tokens run through the model in one forward pass, as in generation.
const PREFILL_CHUNK: usize = 512;

/// The token sequences of a task's labels for one model.
#[derive(Debug, Clone)]
pub struct LabelSet {
    sequences: Vec<Vec<u32>>,
    /// Children of every trie node, keyed by the node's token prefix, in sorted order.
    children: HashMap<Vec<u32>, Vec<u32>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelSetError {
    #[error("label {index} has no tokens")]
    Empty { index: usize },
    #[error("labels {first} and {second} have the same tokens")]
    Duplicate { first: usize, second: usize },
}

impl LabelSet {
    /// Builds the trie of `sequences`. When one sequence is a prefix of another, `end_token`
    /// is appended to all of them so that every label ends at a leaf.
    pub fn new(mut sequences: Vec<Vec<u32>>, end_token: u32) -> Result<Self, LabelSetError> {
        if let Some(index) = sequences.iter().position(|s| s.is_empty()) {
            return Err(LabelSetError::Empty { index });
        }
        for (first, a) in sequences.iter().enumerate() {
            if let Some(offset) = sequences[first + 1..].iter().position(|b| b == a) {
                return Err(LabelSetError::Duplicate {
                    first,
                    second: first + 1 + offset,
                });
            }
        }
        let has_prefix = sequences.iter().enumerate().any(|(i, a)| {
            sequences
                .iter()
                .enumerate()
                .any(|(j, b)| i != j && b.len() > a.len() && b.starts_with(a))
        });
        if has_prefix {
            for sequence in &mut sequences {
                sequence.push(end_token);
            }
        }

        let mut children: HashMap<Vec<u32>, Vec<u32>> = HashMap::new();
        for sequence in &sequences {
            for k in 0..sequence.len() {
                let entry = children.entry(sequence[..k].to_vec()).or_default();
                if !entry.contains(&sequence[k]) {
                    entry.push(sequence[k]);
                }
            }
        }
        for tokens in children.values_mut() {
            tokens.sort_unstable();
        }
        Ok(Self { sequences, children })
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Length of the longest label, in tokens.
    pub fn max_len(&self) -> usize {
        self.sequences.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Vocabulary rows whose logits one scoring computes, summed over the trie nodes.
    pub fn scored_rows(&self) -> usize {
        self.children.values().map(Vec::len).sum()
    }
}

/// The scores of one prompt.
#[derive(Debug, Clone)]
pub struct PromptScores {
    /// Log-probability of each label, in label order; their exponentials sum to one.
    pub log_probs: Vec<f64>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the previous prompt.
    pub cached_tokens: usize,
    pub elapsed: Duration,
}

/// A model's cached sequence: the tokens whose keys and values `cache` holds. Consecutive
/// prompts of one task share their instructions and examples, so only the part after the
/// longest common prefix runs again.
pub struct PrefixCache {
    tokens: Vec<u32>,
    cache: KvCache,
}

impl PrefixCache {
    pub fn new(model: &dyn LanguageModel, max_len: usize) -> Self {
        Self {
            tokens: Vec::new(),
            cache: model.new_cache(max_len),
        }
    }
}

/// Scores every label of `labels` after `prompt`.
pub fn score_prompt(
    model: &dyn LanguageModel,
    prefix: &mut PrefixCache,
    prompt: &[u32],
    labels: &LabelSet,
) -> candle_core::Result<PromptScores> {
    let started = Instant::now();
    if prompt.is_empty() {
        candle_core::bail!("label scoring needs a non-empty prompt");
    }

    // Reuse the longest common prefix, but always run at least the last prompt token, whose
    // hidden state starts the label trie.
    let common = prefix
        .tokens
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len() - 1);
    prefix.cache.truncate(common);
    prefix.tokens.truncate(common);
    let mut root = None;
    for chunk in prompt[common..].chunks(PREFILL_CHUNK) {
        let hidden = model.forward_hidden(chunk, &mut prefix.cache)?;
        prefix.tokens.extend_from_slice(chunk);
        root = Some(hidden.narrow(0, chunk.len() - 1, 1)?);
    }
    let Some(root) = root else {
        candle_core::bail!("no prompt tokens were run");
    };

    let hidden = label_hidden_states(model, prefix, prompt.len(), labels, root)?;
    // The label tokens stay out of the reusable prefix.
    prefix.cache.truncate(prompt.len());

    let mut branch_log_probs: HashMap<&[u32], HashMap<u32, f64>> = HashMap::new();
    let mut log_probs = Vec::with_capacity(labels.len());
    for sequence in &labels.sequences {
        let mut total = 0.0;
        for k in 0..sequence.len() {
            let node = &sequence[..k];
            if !branch_log_probs.contains_key(node) {
                let (key, children) = labels
                    .children
                    .get_key_value(node)
                    .ok_or_else(|| candle_core::Error::Msg("label trie node is missing".into()))?;
                let state = hidden
                    .get(node)
                    .ok_or_else(|| candle_core::Error::Msg("label hidden state is missing".into()))?;
                let logits: Vec<f32> = model.output_rows(state, children)?.squeeze(0)?.to_vec1()?;
                branch_log_probs.insert(key.as_slice(), log_softmax(children, &logits));
            }
            total += branch_log_probs[node][&sequence[k]];
        }
        log_probs.push(total);
    }

    Ok(PromptScores {
        log_probs,
        prompt_tokens: prompt.len(),
        cached_tokens: common,
        elapsed: started.elapsed(),
    })
}

/// Runs the label tokens after the prompt and returns the final hidden state `(1, n_embd)` at
/// every inner trie node, keyed by the node's prefix. Labels are visited in sorted order, so a
/// label reuses the cached keys and values of the prefix it shares with the previous one.
fn label_hidden_states(
    model: &dyn LanguageModel,
    prefix: &mut PrefixCache,
    prompt_len: usize,
    labels: &LabelSet,
    root: Tensor,
) -> candle_core::Result<HashMap<Vec<u32>, Tensor>> {
    let mut hidden: HashMap<Vec<u32>, Tensor> = HashMap::new();
    hidden.insert(Vec::new(), root);

    let mut sorted: Vec<&Vec<u32>> = labels.sequences.iter().collect();
    sorted.sort();
    let mut fed: Vec<u32> = Vec::new();
    for sequence in sorted {
        // The last token of a label is only predicted, never run.
        let path = &sequence[..sequence.len() - 1];
        if (1..=path.len()).all(|k| hidden.contains_key(&path[..k])) {
            continue;
        }
        let common = fed.iter().zip(path).take_while(|(a, b)| a == b).count();
        prefix.cache.truncate(prompt_len + common);
        fed.truncate(common);
        let states = model.forward_hidden(&path[common..], &mut prefix.cache)?;
        fed.extend_from_slice(&path[common..]);
        for j in 0..path.len() - common {
            hidden.insert(path[..common + j + 1].to_vec(), states.narrow(0, j, 1)?);
        }
    }
    Ok(hidden)
}

/// Log-softmax of `logits` over the branch tokens `children`, keyed by token.
fn log_softmax(children: &[u32], logits: &[f32]) -> HashMap<u32, f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    children
        .iter()
        .zip(logits)
        .map(|(&token, &l)| (token, l as f64 - log_sum))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_labels_get_end_token() {
        let set = LabelSet::new(vec![vec![5], vec![5, 6], vec![7]], 99).unwrap();
        assert_eq!(set.sequences, vec![vec![5, 99], vec![5, 6, 99], vec![7, 99]]);
        assert_eq!(set.children[&vec![]], vec![5, 7]);
        assert_eq!(set.children[&vec![5]], vec![6, 99]);
    }

    #[test]
    fn distinct_labels_stay_unchanged() {
        let set = LabelSet::new(vec![vec![5, 1], vec![5, 2], vec![7]], 99).unwrap();
        assert_eq!(set.sequences, vec![vec![5, 1], vec![5, 2], vec![7]]);
        assert_eq!(set.scored_rows(), 4);
        assert_eq!(set.max_len(), 2);
    }

    #[test]
    fn empty_and_duplicate_labels_rejected() {
        assert!(matches!(
            LabelSet::new(vec![vec![1], vec![]], 0),
            Err(LabelSetError::Empty { index: 1 })
        ));
        assert!(matches!(
            LabelSet::new(vec![vec![1, 2], vec![3], vec![1, 2]], 0),
            Err(LabelSetError::Duplicate { first: 0, second: 2 })
        ));
    }
}
