//! Hyperparameters of a decoder-only model, read from GGUF metadata.

use candle_core::quantized::gguf_file::{Content, Value};

use super::ModelError;

/// Architecture families that tierd's own decoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Gemma3,
}

impl Architecture {
    pub fn from_gguf_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "gemma3" => Ok(Self::Gemma3),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// Pairing of a head's dimensions in rotary position embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1). GGUF llama files store Q/K permuted for this layout.
    Interleaved,
    /// Pairs (i, i + d/2), as in GPT-NeoX, Qwen2 and Gemma.
    Halves,
}

/// Feed-forward activation applied to the gate projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation, as Gemma uses.
    GeluTanh,
}

#[derive(Debug, Clone)]
pub struct HParams {
    pub architecture: Architecture,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_base: f64,
    /// Rope base of the sliding-window layers (Gemma 3 uses 10,000 there).
    pub rope_base_local: f64,
    /// Positions are divided by this factor on global layers (linear rope scaling).
    pub rope_scale: f64,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    /// Sliding-window size, for architectures that have sliding-window layers.
    pub sliding_window: Option<usize>,
    /// Every `swa_period`-th layer (1-based) is global; the others use the window.
    pub swa_period: usize,
    /// Gemma scales token embeddings by sqrt(n_embd).
    pub scale_embeddings: bool,
    /// Gemma 3 normalises the attention and feed-forward outputs before the residual add.
    pub post_norms: bool,
    /// Gemma 3 applies RMS norm to each query and key head.
    pub qk_norm: bool,
    /// Qwen2 has biases on the Q, K and V projections.
    pub qkv_bias: bool,
}

impl HParams {
    pub fn from_gguf(content: &Content) -> Result<Self, ModelError> {
        let arch_name = metadata_string(content, "general.architecture")?;
        let architecture = Architecture::from_gguf_name(&arch_name)?;
        let key = |suffix: &str| format!("{arch_name}.{suffix}");

        let n_layer = metadata_usize(content, &key("block_count"))?;
        let n_embd = metadata_usize(content, &key("embedding_length"))?;
        let n_head = metadata_usize(content, &key("attention.head_count"))?;
        let n_kv_head = metadata_usize(content, &key("attention.head_count_kv"))?;
        let head_dim = match content.metadata.get(&key("attention.key_length")) {
            Some(value) => value_usize(value, &key("attention.key_length"))?,
            None => n_embd / n_head,
        };
        let context_length = metadata_usize(content, &key("context_length"))?;
        let rms_eps = metadata_f64(content, &key("attention.layer_norm_rms_epsilon"))?;
        let rope_base = optional_f64(content, &key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_scale = optional_f64(content, &key("rope.scaling.factor"))?.unwrap_or(1.0);
        let n_vocab = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => return Err(ModelError::MissingMetadata("tokenizer.ggml.tokens".into())),
        };

        if n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(ModelError::InvalidMetadata(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_kv_head}"
            )));
        }

        let mut hparams = Self {
            architecture,
            n_layer,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            n_vocab,
            context_length,
            rms_eps,
            rope_base,
            rope_base_local: rope_base,
            rope_scale,
            rope_style: RopeStyle::Halves,
            activation: Activation::Silu,
            sliding_window: None,
            swa_period: 1,
            scale_embeddings: false,
            post_norms: false,
            qk_norm: false,
            qkv_bias: false,
        };

        match architecture {
            Architecture::Llama => hparams.rope_style = RopeStyle::Interleaved,
            Architecture::Qwen2 => hparams.qkv_bias = true,
            Architecture::Gemma3 => {
                hparams.activation = Activation::GeluTanh;
                hparams.scale_embeddings = true;
                hparams.post_norms = true;
                hparams.qk_norm = true;
                hparams.sliding_window =
                    Some(metadata_usize(content, &key("attention.sliding_window"))?);
                // Gemma 3 alternates five sliding-window layers with one global layer; the
                // local layers use a fixed rope base of 10,000 (both as in llama.cpp).
                hparams.swa_period = 6;
                hparams.rope_base_local = 10_000.0;
            }
        }
        Ok(hparams)
    }

    /// Returns the sliding window of layer `index`, or `None` for a global layer.
    pub fn layer_window(&self, index: usize) -> Option<usize> {
        let window = self.sliding_window?;
        let is_global = (index + 1) % self.swa_period == 0;
        (!is_global).then_some(window)
    }
}

pub(crate) fn metadata_string(content: &Content, key: &str) -> Result<String, ModelError> {
    match content.metadata.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ModelError::InvalidMetadata(format!("`{key}` is not a string"))),
        None => Err(ModelError::MissingMetadata(key.to_string())),
    }
}

pub(crate) fn metadata_usize(content: &Content, key: &str) -> Result<usize, ModelError> {
    let value = content
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?;
    value_usize(value, key)
}

pub(crate) fn value_usize(value: &Value, key: &str) -> Result<usize, ModelError> {
    let number = match value {
        Value::U8(v) => *v as i128,
        Value::I8(v) => *v as i128,
        Value::U16(v) => *v as i128,
        Value::I16(v) => *v as i128,
        Value::U32(v) => *v as i128,
        Value::I32(v) => *v as i128,
        Value::U64(v) => *v as i128,
        Value::I64(v) => *v as i128,
        _ => return Err(ModelError::InvalidMetadata(format!("`{key}` is not an integer"))),
    };
    usize::try_from(number)
        .map_err(|_| ModelError::InvalidMetadata(format!("`{key}` is out of range: {number}")))
}

fn metadata_f64(content: &Content, key: &str) -> Result<f64, ModelError> {
    optional_f64(content, key)?.ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
}

fn optional_f64(content: &Content, key: &str) -> Result<Option<f64>, ModelError> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(v)) => Ok(Some(*v as f64)),
        Some(Value::F64(v)) => Ok(Some(*v)),
        Some(other) => value_usize(other, key).map(|v| Some(v as f64)),
    }
}
