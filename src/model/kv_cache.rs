//! Per-sequence key/value cache for the decoder's attention layers.

use candle_core::Result;

/// Keys and values of one layer, position-major: `(positions, n_kv_head, head_dim)`, so that
/// appending a batch is one copy and growing keeps every stored position in place.
#[derive(Default)]
struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    max_len: usize,
    /// Values per position: `n_kv_head * head_dim`.
    row: usize,
}

/// Number of positions allocated per layer at the first append.
const INITIAL_CAPACITY: usize = 256;

impl KvCache {
    pub fn new(n_layer: usize, n_kv_head: usize, head_dim: usize, max_len: usize) -> Self {
        Self {
            layers: (0..n_layer).map(|_| LayerCache::default()).collect(),
            len: 0,
            max_len,
            row: n_kv_head * head_dim,
        }
    }

    /// Number of positions already stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position from `len` on, so a shared prompt prefix can be reused.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Marks `count` more positions as stored once every layer has appended them.
    pub(crate) fn advance(&mut self, count: usize) {
        self.len += count;
    }

    /// Stores `keys` and `values`, each `(seq, n_kv_head, head_dim)`, for layer `layer` at the
    /// current position, and returns the layer's keys and values of positions `0..len + seq`.
    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) -> Result<(&[f32], &[f32])> {
        let row = self.row;
        if keys.len() != values.len() || !keys.len().is_multiple_of(row) {
            candle_core::bail!(
                "invalid KV cache append: {} keys and {} values for positions of {row} values",
                keys.len(),
                values.len()
            );
        }
        let end = self.len + keys.len() / row;
        if end > self.max_len {
            candle_core::bail!("KV cache is full: {end} positions exceed {}", self.max_len);
        }
        let Some(cache) = self.layers.get_mut(layer) else {
            candle_core::bail!("KV cache has no layer {layer}");
        };
        // Grow by doubling, from a small start, up to the maximum length: a short request
        // does not pay for the whole context window.
        let capacity = cache.keys.capacity() / row;
        if end > capacity {
            let grown = end.max(capacity * 2).max(INITIAL_CAPACITY).min(self.max_len);
            cache.keys.reserve_exact(grown * row - cache.keys.len());
            cache.values.reserve_exact(grown * row - cache.values.len());
        }
        let start = self.len * row;
        cache.keys.truncate(start);
        cache.values.truncate(start);
        cache.keys.extend_from_slice(keys);
        cache.values.extend_from_slice(values);
        Ok((&cache.keys, &cache.values))
    }
}
