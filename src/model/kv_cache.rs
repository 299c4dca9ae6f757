//! Per-sequence key/value cache for the decoder's attention layers.

use candle_core::{Device, Result, Tensor};

/// Keys and values of one layer, shaped `(n_kv_head, capacity, head_dim)`.
///
/// The buffers grow by doubling up to the context length, so a short request does not pay for
/// the whole context window.
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    capacity: usize,
}

pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
    max_len: usize,
    n_kv_head: usize,
    head_dim: usize,
    device: Device,
}

/// Initial number of positions allocated per layer.
const INITIAL_CAPACITY: usize = 256;

impl KvCache {
    pub fn new(n_layer: usize, n_kv_head: usize, head_dim: usize, max_len: usize) -> Self {
        Self {
            layers: (0..n_layer).map(|_| None).collect(),
            len: 0,
            max_len,
            n_kv_head,
            head_dim,
            device: Device::Cpu,
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

    /// Stores `keys` and `values` (each `(n_kv_head, seq, head_dim)`) for layer `layer` at the
    /// current position, and returns views of the positions `start..len + seq`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
        start: usize,
    ) -> Result<(Tensor, Tensor)> {
        let seq = keys.dim(1)?;
        let end = self.len + seq;
        if end > self.max_len {
            candle_core::bail!("KV cache is full: {end} positions exceed {}", self.max_len);
        }
        self.reserve(layer, end)?;

        let Some(cache) = self.layers[layer].as_mut() else {
            candle_core::bail!("KV cache layer {layer} was not allocated");
        };
        cache.keys.slice_set(&keys.contiguous()?, 1, self.len)?;
        cache.values.slice_set(&values.contiguous()?, 1, self.len)?;

        let keys = cache.keys.narrow(1, start, end - start)?;
        let values = cache.values.narrow(1, start, end - start)?;
        Ok((keys, values))
    }

    fn reserve(&mut self, layer: usize, needed: usize) -> Result<()> {
        let current = self.layers[layer].as_ref().map_or(0, |cache| cache.capacity);
        if needed <= current {
            return Ok(());
        }

        let capacity = needed
            .max(current * 2)
            .max(INITIAL_CAPACITY)
            .min(self.max_len);
        let shape = (self.n_kv_head, capacity, self.head_dim);
        let keys = Tensor::zeros(shape, candle_core::DType::F32, &self.device)?;
        let values = Tensor::zeros(shape, candle_core::DType::F32, &self.device)?;
        if let Some(old) = &self.layers[layer] {
            keys.slice_set(&old.keys.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            values.slice_set(&old.values.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
        }
        self.layers[layer] = Some(LayerCache {
            keys,
            values,
            capacity,
        });
        Ok(())
    }
}
