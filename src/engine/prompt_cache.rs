//! Prompt prefix cache of one model's generation worker: the KV caches of earlier requests,
//! keyed by their token sequences. A request that starts with the same tokens (a long system
//! prompt, a task's instructions) runs only the tokens after them.
//!
//! Reuse gives exactly the logits of a full prefill, because the transformer computes each
//! token's attention row the same way whether the prompt arrives in one batch or in pieces.
//! Entries are bounded by a byte budget per model and evicted least recently used first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use serde::Deserialize;

use crate::model::{KvCache, LanguageModel};

/// The `[server.prompt_cache]` table of the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptCacheConfig {
    /// Whether the generation workers keep the KV caches of earlier requests.
    pub enabled: bool,
    /// Budget for the stored keys and values of each model, in bytes.
    pub max_bytes: usize,
    /// Shortest shared prefix, in tokens, that a request reuses; shorter sequences are not
    /// stored.
    pub min_tokens: usize,
    /// Whether an entry also keeps the generated tokens, so that the next turn of a
    /// conversation finds the previous assistant message cached.
    pub include_completion: bool,
}

impl Default for PromptCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            min_tokens: 16,
            include_completion: true,
        }
    }
}

impl PromptCacheConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.min_tokens == 0 {
            return Err("`server.prompt_cache.min_tokens` must be at least 1".into());
        }
        Ok(())
    }

    /// Returns the bytes that `min_tokens` positions of `bytes_per_position` need when
    /// `max_bytes` is smaller, because [`PromptCache::insert`] then never stores an entry.
    /// Returns `None` when they fit in the budget.
    pub fn min_tokens_shortfall(&self, bytes_per_position: usize) -> Option<usize> {
        // The same arithmetic as `insert`, so the warning matches what the cache does.
        let per_position = bytes_per_position.max(1);
        if self.max_bytes / per_position >= self.min_tokens {
            return None;
        }
        Some(self.min_tokens.saturating_mul(per_position))
    }
}

/// Tokens and the KV cache that contains their keys and values: `tokens.len() == cache.len()`.
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub cache: KvCache,
}

impl Sequence {
    /// Creates an empty sequence of at most `max_len` positions.
    pub fn new(network: &dyn LanguageModel, max_len: usize) -> Self {
        Self {
            tokens: Vec::new(),
            cache: network.new_cache(max_len),
        }
    }

    /// Runs `tokens` after the stored ones and returns the logits of the last one.
    pub fn forward(&mut self, network: &dyn LanguageModel, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let logits = network.forward(tokens, &mut self.cache)?;
        self.tokens.extend_from_slice(tokens);
        Ok(logits)
    }
}

/// Counters of one model's prompt cache, read by `/metrics`.
#[derive(Debug, Default)]
pub struct PromptCacheStats {
    /// Requests that reused a stored prefix.
    pub hits: AtomicU64,
    /// Requests that found no stored prefix of at least `min_tokens`.
    pub misses: AtomicU64,
    /// Prompt tokens whose keys and values were copied instead of computed.
    pub cached_tokens: AtomicU64,
    /// Bytes of keys and values stored now.
    pub bytes: AtomicU64,
    /// Entries dropped to stay within the budget.
    pub evictions: AtomicU64,
}

struct Entry {
    sequence: Sequence,
    /// Value of the cache's clock when the entry was last stored or reused.
    last_used: u64,
}

/// The stored sequences of one model, within `max_bytes` of keys and values.
pub struct PromptCache {
    config: PromptCacheConfig,
    entries: Vec<Entry>,
    /// Sum of the entries' `KvCache::size_bytes`.
    bytes: usize,
    /// Counts lookups and inserts; orders the entries by last use.
    clock: u64,
    stats: Arc<PromptCacheStats>,
}

impl PromptCache {
    pub fn new(config: PromptCacheConfig, stats: Arc<PromptCacheStats>) -> Self {
        Self {
            config,
            entries: Vec::new(),
            bytes: 0,
            clock: 0,
            stats,
        }
    }

    /// Bytes of keys and values that the entries hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of stored sequences.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Returns a sequence of at most `max_len` positions that contains a copy of the longest
    /// stored prefix of `prompt`, or `None` when no entry shares at least `min_tokens` tokens
    /// with it. The last prompt token is never reused, because its logits start the
    /// generation. The entry stays stored, so requests that diverge after the prefix keep it.
    pub fn lookup(&mut self, prompt: &[u32], max_len: usize) -> Option<Sequence> {
        let limit = prompt.len().saturating_sub(1).min(max_len);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(index, entry)| (index, common_prefix(&entry.sequence.tokens, prompt).min(limit)))
            .max_by_key(|&(index, common)| (common, self.entries[index].last_used));
        let (index, common) = match best {
            Some((index, common)) if common >= self.config.min_tokens => (index, common),
            _ => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };

        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.last_used = self.clock;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats.cached_tokens.fetch_add(common as u64, Ordering::Relaxed);
        Some(Sequence {
            tokens: prompt[..common].to_vec(),
            cache: entry.sequence.cache.copy_prefix(common, max_len),
        })
    }

    /// Stores `sequence`, whose first `prompt_len` tokens are the prompt, after a request. The
    /// generated tokens after the prompt are kept only with `include_completion`. A sequence
    /// over the budget keeps the first positions that fit, and one shorter than `min_tokens`
    /// is not stored. Least recently used entries are evicted until the new one fits.
    pub fn insert(&mut self, mut sequence: Sequence, prompt_len: usize) {
        let mut keep = sequence.tokens.len();
        if !self.config.include_completion {
            keep = keep.min(prompt_len);
        }
        let per_position = sequence.cache.bytes_per_position().max(1);
        keep = keep.min(self.config.max_bytes / per_position);
        if keep < self.config.min_tokens {
            return;
        }
        sequence.tokens.truncate(keep);
        sequence.cache.truncate(keep);

        self.clock += 1;
        // An entry that already contains every token of the new one makes it redundant.
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|entry| entry.sequence.tokens.starts_with(&sequence.tokens))
        {
            entry.last_used = self.clock;
            return;
        }
        // Entries whose tokens all start the new one are covered by it.
        let mut index = 0;
        while index < self.entries.len() {
            if sequence.tokens.starts_with(&self.entries[index].sequence.tokens) {
                self.remove(index);
            } else {
                index += 1;
            }
        }

        sequence.cache.shrink_to_fit();
        let size = sequence.cache.size_bytes();
        while self.bytes + size > self.config.max_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(index, _)| index)
            else {
                break;
            };
            self.remove(oldest);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes += size;
        self.entries.push(Entry {
            sequence,
            last_used: self.clock,
        });
        self.stats.bytes.store(self.bytes as u64, Ordering::Relaxed);
    }

    fn remove(&mut self, index: usize) {
        let entry = self.entries.swap_remove(index);
        self.bytes -= entry.sequence.cache.size_bytes();
        self.stats.bytes.store(self.bytes as u64, Ordering::Relaxed);
    }
}

/// Number of leading tokens that `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes per position of the caches built by `sequence`: one layer, one head of two values.
    const POSITION_BYTES: usize = 2 * 4 * 2;

    /// Builds the sequence of `tokens` with keys and values derived from each token, without a
    /// model.
    fn sequence(tokens: &[u32]) -> Sequence {
        let mut cache = KvCache::new(1, 1, 2, 1024);
        for &token in tokens {
            let keys = [token as f32, token as f32 + 0.5];
            cache.append(0, &keys, &keys).unwrap();
            cache.advance(1);
        }
        Sequence {
            tokens: tokens.to_vec(),
            cache,
        }
    }

    fn prompt_cache(max_bytes: usize, min_tokens: usize) -> PromptCache {
        let config = PromptCacheConfig {
            enabled: true,
            max_bytes,
            min_tokens,
            include_completion: true,
        };
        PromptCache::new(config, Arc::default())
    }

    fn range(start: u32, end: u32) -> Vec<u32> {
        (start..end).collect()
    }

    #[test]
    fn lookup_takes_longest_common_prefix() {
        let mut cache = prompt_cache(1 << 20, 4);
        let system = range(0, 20);
        cache.insert(sequence(&[system.clone(), range(100, 110)].concat()), 30);
        cache.insert(sequence(&[system[..8].to_vec(), range(200, 220)].concat()), 28);
        assert_eq!(cache.len(), 2);

        let prompt = [system.clone(), range(300, 305)].concat();
        let reused = cache.lookup(&prompt, 64).expect("a stored prefix");
        assert_eq!(reused.tokens, system);
        assert_eq!(reused.cache.len(), 20);
        assert_eq!(reused.cache.max_len(), 64);
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.cached_tokens.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn lookup_leaves_last_prompt_token() {
        let mut cache = prompt_cache(1 << 20, 4);
        let tokens = range(0, 30);
        cache.insert(sequence(&tokens), 30);

        let reused = cache.lookup(&tokens, 64).expect("a stored prefix");
        assert_eq!(reused.tokens.len(), 29);
        let shorter = cache.lookup(&tokens[..10], 64).expect("a stored prefix");
        assert_eq!(shorter.tokens.len(), 9);
    }

    #[test]
    fn short_prefix_is_a_miss() {
        let mut cache = prompt_cache(1 << 20, 16);
        cache.insert(sequence(&range(0, 40)), 40);

        let prompt = [range(0, 15), range(500, 530)].concat();
        assert!(cache.lookup(&prompt, 64).is_none());
        assert_eq!(cache.stats.misses.load(Ordering::Relaxed), 1);

        cache.insert(sequence(&range(900, 915)), 15);
        assert_eq!(cache.len(), 1, "a sequence under min_tokens was stored");
    }

    #[test]
    fn budget_under_min_tokens_stores_nothing() {
        let mut cache = prompt_cache(15 * POSITION_BYTES, 16);
        cache.insert(sequence(&range(0, 100)), 100);
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        assert!(cache.lookup(&range(0, 100), 128).is_none());
    }

    #[test]
    fn shortfall_when_budget_under_min_tokens() {
        let config = prompt_cache(15 * POSITION_BYTES, 16).config;
        assert_eq!(config.min_tokens_shortfall(POSITION_BYTES), Some(16 * POSITION_BYTES));

        let config = prompt_cache(16 * POSITION_BYTES - 1, 16).config;
        assert_eq!(config.min_tokens_shortfall(POSITION_BYTES), Some(16 * POSITION_BYTES));
    }

    #[test]
    fn no_shortfall_when_budget_fits() {
        let config = prompt_cache(16 * POSITION_BYTES, 16).config;
        assert_eq!(config.min_tokens_shortfall(POSITION_BYTES), None);

        let config = prompt_cache(1 << 20, 16).config;
        assert_eq!(config.min_tokens_shortfall(POSITION_BYTES), None);
    }

    #[test]
    fn shortfall_matches_insert() {
        for max_bytes in [15 * POSITION_BYTES, 16 * POSITION_BYTES - 1, 16 * POSITION_BYTES] {
            let mut cache = prompt_cache(max_bytes, 16);
            cache.insert(sequence(&range(0, 100)), 100);
            let shortfall = cache.config.min_tokens_shortfall(POSITION_BYTES);
            assert_eq!(shortfall.is_some(), cache.is_empty(), "max_bytes {max_bytes}");
        }
    }

    #[test]
    fn oversized_sequence_keeps_what_fits() {
        let mut cache = prompt_cache(50 * POSITION_BYTES, 4);
        cache.insert(sequence(&range(0, 80)), 80);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 50 * POSITION_BYTES);

        let reused = cache.lookup(&range(0, 80), 128).expect("the first 50 tokens");
        assert_eq!(reused.tokens, range(0, 50));
    }

    #[test]
    fn eviction_keeps_bytes_within_budget() {
        let budget = 100 * POSITION_BYTES;
        let mut cache = prompt_cache(budget, 4);
        for start in 0..20u32 {
            let tokens = range(start * 1000, start * 1000 + 30 + start);
            cache.insert(sequence(&tokens), tokens.len());
            assert!(cache.bytes() <= budget, "{} bytes stored over the budget of {budget}", cache.bytes());
            let sum: usize = cache.entries.iter().map(|e| e.sequence.cache.size_bytes()).sum();
            assert_eq!(cache.bytes(), sum);
        }
        assert!(cache.stats.evictions.load(Ordering::Relaxed) > 0);
        assert_eq!(cache.stats.bytes.load(Ordering::Relaxed), cache.bytes() as u64);
    }

    #[test]
    fn eviction_drops_least_recently_used() {
        let mut cache = prompt_cache(100 * POSITION_BYTES, 4);
        let (first, second, third) = (range(0, 40), range(1000, 1040), range(2000, 2040));
        cache.insert(sequence(&first), 40);
        cache.insert(sequence(&second), 40);
        // Reusing `first` makes `second` the least recently used.
        assert!(cache.lookup(&first, 64).is_some());
        cache.insert(sequence(&third), 40);

        assert_eq!(cache.len(), 2);
        assert!(cache.lookup(&first, 64).is_some(), "the recently used entry was evicted");
        assert!(cache.lookup(&third, 64).is_some(), "the new entry was not stored");
        assert!(cache.lookup(&second, 64).is_none(), "the least recently used entry was kept");
    }

    #[test]
    fn extension_replaces_its_prefix() {
        let mut cache = prompt_cache(1 << 20, 4);
        cache.insert(sequence(&range(0, 20)), 20);
        cache.insert(sequence(&range(0, 30)), 20);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 30 * POSITION_BYTES);

        // A sequence that an entry already contains is not stored twice.
        cache.insert(sequence(&range(0, 25)), 25);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 30 * POSITION_BYTES);
    }

    #[test]
    fn completion_dropped_unless_included() {
        let mut cache = prompt_cache(1 << 20, 4);
        cache.config.include_completion = false;
        cache.insert(sequence(&range(0, 30)), 20);
        assert_eq!(cache.bytes(), 20 * POSITION_BYTES);
        let reused = cache.lookup(&range(0, 30), 64).expect("the prompt");
        assert_eq!(reused.tokens.len(), 20);
    }
}
