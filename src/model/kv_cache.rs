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

    /// Bytes of keys and values that one position takes over all layers (f32 keys and values).
    pub fn bytes_per_position(&self) -> usize {
        self.layers.len() * self.row * std::mem::size_of::<f32>() * 2
    }

    /// Bytes of keys and values of the stored positions, not counting spare capacity.
    pub fn size_bytes(&self) -> usize {
        self.len * self.bytes_per_position()
    }

    /// Returns a new cache of at most `max_len` positions that contains a copy of the first `len`
    /// positions of this one. `len` is clamped to the stored positions and to `max_len`.
    pub fn copy_prefix(&self, len: usize, max_len: usize) -> KvCache {
        let len = len.min(self.len).min(max_len);
        let values = len * self.row;
        let layers = self
            .layers
            .iter()
            .map(|layer| LayerCache {
                keys: layer.keys[..values].to_vec(),
                values: layer.values[..values].to_vec(),
            })
            .collect();
        KvCache {
            layers,
            len,
            max_len,
            row: self.row,
        }
    }

    /// Drops the keys and values past the stored positions (left by [`KvCache::truncate`]) and
    /// releases spare capacity, so that a cache kept for later takes only
    /// [`KvCache::size_bytes`].
    pub fn shrink_to_fit(&mut self) {
        let values = self.len * self.row;
        for layer in &mut self.layers {
            layer.keys.truncate(values);
            layer.keys.shrink_to_fit();
            layer.values.truncate(values);
            layer.values.shrink_to_fit();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers, two heads of three values: six values per position.
    fn filled(positions: usize) -> KvCache {
        let mut cache = KvCache::new(2, 2, 3, 64);
        for position in 0..positions {
            for layer in 0..2 {
                let base = (layer * 1000 + position * 10) as f32;
                let keys: Vec<f32> = (0..6).map(|i| base + i as f32).collect();
                let values: Vec<f32> = keys.iter().map(|k| -k).collect();
                cache.append(layer, &keys, &values).unwrap();
            }
            cache.advance(1);
        }
        cache
    }

    #[test]
    fn size_counts_keys_and_values_of_every_layer() {
        let cache = filled(5);
        assert_eq!(cache.bytes_per_position(), 2 * 6 * 4 * 2);
        assert_eq!(cache.size_bytes(), 5 * 96);
        assert_eq!(KvCache::new(2, 2, 3, 64).size_bytes(), 0);
    }

    #[test]
    fn copy_prefix_keeps_first_positions() {
        let cache = filled(5);
        let mut copy = cache.copy_prefix(3, 10);
        assert_eq!(copy.len(), 3);
        assert_eq!(copy.max_len(), 10);
        assert_eq!(copy.size_bytes(), 3 * 96);

        // Appending to the copy returns the original's first three positions, then the new one.
        let (keys, values) = copy.append(1, &[7.0; 6], &[8.0; 6]).unwrap();
        let (original_keys, original_values) = {
            let layer = &cache.layers[1];
            (&layer.keys[..18], &layer.values[..18])
        };
        assert_eq!(&keys[..18], original_keys);
        assert_eq!(&values[..18], original_values);
        assert_eq!(&keys[18..], &[7.0; 6]);
        assert_eq!(&values[18..], &[8.0; 6]);
    }

    #[test]
    fn copy_prefix_is_clamped() {
        let cache = filled(4);
        assert_eq!(cache.copy_prefix(9, 64).len(), 4);
        assert_eq!(cache.copy_prefix(4, 2).len(), 2);
    }

    #[test]
    fn shrink_drops_truncated_positions() {
        let mut cache = filled(6);
        cache.truncate(2);
        cache.shrink_to_fit();
        for layer in &cache.layers {
            assert_eq!(layer.keys.len(), 12);
            assert_eq!(layer.values.len(), 12);
            assert!(layer.keys.capacity() < 6 * 6, "capacity {} was not released", layer.keys.capacity());
        }
        assert_eq!(cache.size_bytes(), 2 * 96);
    }
}
