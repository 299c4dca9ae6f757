//! Decoder-only transformer over quantized GGUF weights, shared by llama, qwen2 and gemma3.
//!
//! The architectures differ only in details that [`HParams`] records: rope pairing, QKV biases,
//! per-head Q/K norms, post-attention and post-feed-forward norms, embedding scaling, the
//! activation, and Gemma 3's sliding-window layers. Attention reads the shared key/value heads
//! straight from the cache (see [`causal_attention`]), and computes each token's row the same
//! way whether the token arrives alone or in a batch.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::{Device, Tensor};

use super::hparams::{Activation, HParams};
use super::kv_cache::KvCache;
use super::rope::{Angles, RopeTables};
use super::tensor_loader::{read_dense_tensor, read_weight};
use crate::kernels::attention::{causal_attention, AttentionShape};
use crate::kernels::gelu::gelu_mul;
use crate::kernels::QWeight;
use super::ModelError;

struct Attention {
    wq: QWeight,
    wk: QWeight,
    wv: QWeight,
    wo: QWeight,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

struct FeedForward {
    gate: QWeight,
    up: QWeight,
    down: QWeight,
}

struct Layer {
    attn_norm: Tensor,
    attention: Attention,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    feed_forward: FeedForward,
    post_ffn_norm: Option<Tensor>,
    /// Sliding-window size of this layer; `None` for full attention.
    window: Option<usize>,
}

pub struct Transformer {
    hparams: HParams,
    embeddings: Arc<QWeight>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Arc<QWeight>,
    rope_global: RopeTables,
    rope_local: RopeTables,
}

struct TensorReader<'a> {
    content: &'a Content,
    file: File,
}

impl TensorReader<'_> {
    fn info<'c>(content: &'c Content, name: &str) -> Result<&'c TensorInfo, ModelError> {
        content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn matmul(&mut self, name: &str) -> Result<QWeight, ModelError> {
        let content = self.content;
        let info = Self::info(content, name)?;
        read_weight(&mut self.file, self.content.tensor_data_offset, info).map_err(|source| {
            ModelError::Tensor {
                name: name.to_string(),
                source,
            }
        })
    }

    /// Reads a small tensor (norm weight or bias) as dense f32.
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let content = self.content;
        let info = Self::info(content, name)?;
        read_dense_tensor(&mut self.file, self.content.tensor_data_offset, info).map_err(|source| {
            ModelError::Tensor {
                name: name.to_string(),
                source,
            }
        })
    }

    fn optional_dense(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        if self.has(name) {
            self.dense(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Transformer {
    /// Loads the weights of a GGUF file whose metadata has already been read into `content`.
    pub fn load(path: &Path, content: &Content, hparams: HParams) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = TensorReader { content, file };

        let embeddings = Arc::new(reader.matmul("token_embd.weight")?);
        let output = if reader.has("output.weight") {
            Arc::new(reader.matmul("output.weight")?)
        } else {
            // Tied embeddings: the output projection shares the embedding matrix.
            embeddings.clone()
        };
        let output_norm = reader.dense("output_norm.weight")?;

        let mut layers = Vec::with_capacity(hparams.n_layer);
        for index in 0..hparams.n_layer {
            let name = |suffix: &str| format!("blk.{index}.{suffix}");
            let attention = Attention {
                wq: reader.matmul(&name("attn_q.weight"))?,
                wk: reader.matmul(&name("attn_k.weight"))?,
                wv: reader.matmul(&name("attn_v.weight"))?,
                wo: reader.matmul(&name("attn_output.weight"))?,
                q_bias: reader.optional_dense(&name("attn_q.bias"))?,
                k_bias: reader.optional_dense(&name("attn_k.bias"))?,
                v_bias: reader.optional_dense(&name("attn_v.bias"))?,
                q_norm: reader.optional_dense(&name("attn_q_norm.weight"))?,
                k_norm: reader.optional_dense(&name("attn_k_norm.weight"))?,
            };
            if hparams.qk_norm && (attention.q_norm.is_none() || attention.k_norm.is_none()) {
                return Err(ModelError::MissingTensor(name("attn_q_norm.weight")));
            }
            let feed_forward = FeedForward {
                gate: reader.matmul(&name("ffn_gate.weight"))?,
                up: reader.matmul(&name("ffn_up.weight"))?,
                down: reader.matmul(&name("ffn_down.weight"))?,
            };
            let (post_attn_norm, post_ffn_norm) = if hparams.post_norms {
                (
                    Some(reader.dense(&name("post_attention_norm.weight"))?),
                    Some(reader.dense(&name("post_ffw_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: reader.dense(&name("attn_norm.weight"))?,
                attention,
                post_attn_norm,
                ffn_norm: reader.dense(&name("ffn_norm.weight"))?,
                feed_forward,
                post_ffn_norm,
                window: hparams.layer_window(index),
            });
        }

        let rope_global = RopeTables::new(hparams.head_dim, hparams.rope_base, hparams.rope_scale);
        let rope_local = RopeTables::new(hparams.head_dim, hparams.rope_base_local, 1.0);
        Ok(Self {
            hparams,
            embeddings,
            layers,
            output_norm,
            output,
            rope_global,
            rope_local,
        })
    }

    pub fn hparams(&self) -> &HParams {
        &self.hparams
    }

    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(
            self.hparams.n_layer,
            self.hparams.n_kv_head,
            self.hparams.head_dim,
            max_len.min(self.hparams.context_length),
        )
    }

    /// Runs `tokens` at the cache's next positions and returns the logits of the last one, as
    /// an f32 vector of `n_vocab` values. The cache keeps the keys and values of every token.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let x = self.run_layers(tokens, cache)?;
        let last = x.narrow(0, tokens.len() - 1, 1)?;
        let last = rms_norm(&last, &self.output_norm, self.hparams.rms_eps)?;
        self.output.forward(&last)?.squeeze(0)
    }

    /// Runs `tokens` like [`Transformer::forward`] but returns the final hidden state of every
    /// token, after the output norm: `(tokens.len(), n_embd)`. [`Transformer::output_rows`]
    /// turns them into logits.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let x = self.run_layers(tokens, cache)?;
        rms_norm(&x, &self.output_norm, self.hparams.rms_eps)
    }

    /// Returns the logits of the vocabulary entries `ids` for each row of `hidden`:
    /// `(rows, ids.len())`, equal to those columns of the full output projection.
    pub fn output_rows(&self, hidden: &Tensor, ids: &[u32]) -> candle_core::Result<Tensor> {
        self.output.forward_rows(hidden, ids)
    }

    /// Runs the decoder layers over `tokens` and returns the residual stream `(seq, n_embd)`
    /// before the output norm.
    fn run_layers(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        if tokens.is_empty() {
            candle_core::bail!("forward called with no tokens");
        }
        let seq = tokens.len();
        let start_pos = cache.len();
        let hp = &self.hparams;

        let mut x = self.embeddings.rows_f32(tokens)?;
        if hp.scale_embeddings {
            x = (x * (hp.n_embd as f64).sqrt())?;
        }

        let angles_global = self.rope_global.angles(start_pos, seq);
        let angles_local = hp.sliding_window.is_some().then(|| self.rope_local.angles(start_pos, seq));

        for (index, layer) in self.layers.iter().enumerate() {
            let angles = match (layer.window, &angles_local) {
                (Some(_), Some(local)) => local,
                _ => &angles_global,
            };
            let h = rms_norm(&x, &layer.attn_norm, hp.rms_eps)?;
            let mut h = self.attention(layer, index, &h, angles, cache)?;
            if let Some(norm) = &layer.post_attn_norm {
                h = rms_norm(&h, norm, hp.rms_eps)?;
            }
            x = (x + h)?;

            let h = rms_norm(&x, &layer.ffn_norm, hp.rms_eps)?;
            let mut h = self.feed_forward(&layer.feed_forward, &h)?;
            if let Some(norm) = &layer.post_ffn_norm {
                h = rms_norm(&h, norm, hp.rms_eps)?;
            }
            x = (x + h)?;
        }
        cache.advance(seq);
        Ok(x)
    }

    fn feed_forward(&self, ffn: &FeedForward, x: &Tensor) -> candle_core::Result<Tensor> {
        let [gate, up]: [Tensor; 2] = QWeight::forward_many(&[&ffn.gate, &ffn.up], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("the fused gate and up product lost an output".into()))?;
        let hidden = match self.hparams.activation {
            Activation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
            Activation::GeluTanh => {
                let shape = gate.shape().clone();
                let mut gate: Vec<f32> = gate.flatten_all()?.to_vec1()?;
                let up: Vec<f32> = up.flatten_all()?.to_vec1()?;
                gelu_mul(&mut gate, &up);
                Tensor::from_vec(gate, shape, &Device::Cpu)?
            }
        };
        ffn.down.forward(&hidden)
    }

    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        angles: &Angles,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let hp = &self.hparams;
        let attn = &layer.attention;
        let seq = x.dim(0)?;
        let start_pos = cache.len();

        let [q, k, v]: [Tensor; 3] = QWeight::forward_many(&[&attn.wq, &attn.wk, &attn.wv], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("the fused q, k and v product lost an output".into()))?;
        // Each becomes `(seq, heads, head_dim)`, flattened.
        let finish = |y: Tensor, bias: &Option<Tensor>, norm: &Option<Tensor>| -> candle_core::Result<Vec<f32>> {
            let y = match bias {
                Some(bias) => y.broadcast_add(bias)?,
                None => y,
            };
            let mut values: Vec<f32> = y.flatten_all()?.to_vec1()?;
            if let Some(norm) = norm {
                rms_norm_rows(&mut values, &norm.to_vec1()?, hp.rms_eps);
            }
            Ok(values)
        };
        let mut q = finish(q, &attn.q_bias, &attn.q_norm)?;
        let mut k = finish(k, &attn.k_bias, &attn.k_norm)?;
        let v = finish(v, &attn.v_bias, &None)?;
        angles.rotate(&mut q, hp.rope_style);
        angles.rotate(&mut k, hp.rope_style);

        let (keys, values) = cache.append(index, &k, &v)?;
        let shape = AttentionShape {
            n_head: hp.n_head,
            n_kv_head: hp.n_kv_head,
            head_dim: hp.head_dim,
            start_pos,
            window: layer.window,
            scale: 1.0 / (hp.head_dim as f32).sqrt(),
        };
        let out = causal_attention(&q, keys, values, shape);
        attn.wo.forward(&Tensor::from_vec(out, (seq, hp.n_head * hp.head_dim), &Device::Cpu)?)
    }
}

/// RMS norm over the last dimension, computed as llama.cpp's CPU backend does: the sum of
/// squares in f64, `x * (1 / sqrt(mean + eps))`, then the weight in a separate multiply.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let shape = x.shape().clone();
    let weight: Vec<f32> = weight.to_vec1()?;
    let mut values: Vec<f32> = x.flatten_all()?.to_vec1()?;
    rms_norm_rows(&mut values, &weight, eps);
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Applies [`rms_norm`] in place to each run of `weight.len()` values.
fn rms_norm_rows(values: &mut [f32], weight: &[f32], eps: f64) {
    let eps = eps as f32;
    for row in values.chunks_exact_mut(weight.len()) {
        let sum: f64 = row.iter().map(|v| (v * v) as f64).sum();
        let mean = (sum / weight.len() as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
}
