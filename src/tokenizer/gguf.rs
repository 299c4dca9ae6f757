//! Builds a `tokenizers::Tokenizer` from the vocabulary stored in GGUF metadata, so a single
//! `.gguf` file is enough to serve a model.
//!
//! Two GGUF tokenizer models are supported:
//! - `gpt2`: byte-level BPE with explicit merges (Qwen2, SmolLM, Llama 3). The pre-tokenizer
//!   regex follows `tokenizer.ggml.pre`, as llama.cpp does.
//! - `llama`: SentencePiece BPE with per-token scores and byte fallback (Gemma, Llama 2). GGUF
//!   stores no merges for it, so they are derived from the scores: a pair merges with the
//!   priority of the token it forms, which is how SentencePiece BPE chooses the next merge.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::TokenizerError;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizer regexes of the byte-level BPE families, as in their `tokenizer.json` files.
const REGEX_GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special token ids and flags that the engine needs besides the tokenizer itself.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Every control token (end of turn, end of text, ...), for stopping generation.
    pub control: Vec<u32>,
    /// Whether pieces are GPT-2 byte-level strings (`gpt2` models) rather than SentencePiece.
    pub byte_level: bool,
}

pub fn tokenizer_from_gguf(content: &Content) -> Result<(Tokenizer, SpecialTokens), TokenizerError> {
    let model = string(content, "tokenizer.ggml.model")?;
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    let types = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(value) => int_array(value, "tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(TokenizerError::Metadata(format!(
            "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
            types.len(),
            tokens.len()
        )));
    }

    let specials = special_tokens(content, &types)?;
    let mut tokenizer = match model.as_str() {
        "gpt2" => byte_level_bpe(content, &tokens)?,
        "llama" => sentencepiece_bpe(content, &tokens)?,
        other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
    };

    // Control and user-defined tokens are matched in the raw text before the model runs, as
    // llama.cpp does. Gemma's runs of spaces are user-defined tokens written with plain spaces,
    // so they match spaces before the normalizer turns them into U+2581.
    // Placeholder control tokens (`<unused0>`..., 6,000+ in Gemma 3) are left out of the
    // matcher: no template or prompt uses them, and matching them would cost about 5 MB. Text
    // that spells one is tokenized as plain text, as llama.cpp does without `parse_special`.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, kind)| matches!(**kind, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .filter(|(text, _)| !is_placeholder(text))
        .map(|(text, kind)| {
            AddedToken::from(text.clone(), *kind == TOKEN_TYPE_CONTROL).normalized(false)
        })
        .collect();
    tokenizer
        .add_tokens(added)
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    if specials.add_bos {
        if let Some(bos) = specials.bos {
            let text = &tokens[bos as usize];
            let processor = TemplateProcessing::builder()
                .try_single(format!("{text}:0 $A:0"))
                .and_then(|b| b.try_pair(format!("{text}:0 $A:0 {text}:1 $B:1")))
                .map_err(|e| TokenizerError::Build(e.to_string()))?
                .special_tokens(vec![(text.clone(), bos)])
                .build()
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
            tokenizer.with_post_processor(Some(processor));
        }
    }
    Ok((tokenizer, specials))
}

fn special_tokens(content: &Content, types: &[i64]) -> Result<SpecialTokens, TokenizerError> {
    let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        match content.metadata.get(key) {
            None => Ok(None),
            Some(value) => value
                .to_u32()
                .map(Some)
                .map_err(|_| TokenizerError::Metadata(format!("`{key}` is not a u32"))),
        }
    };
    let add_bos = match content.metadata.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(flag)) => *flag,
        // llama.cpp's default: SentencePiece vocabularies add BOS, byte-level BPE ones do not.
        _ => matches!(string(content, "tokenizer.ggml.model")?.as_str(), "llama"),
    };
    let control = types
        .iter()
        .enumerate()
        .filter(|(_, kind)| **kind == TOKEN_TYPE_CONTROL)
        .map(|(index, _)| index as u32)
        .collect();
    Ok(SpecialTokens {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        add_bos,
        control,
        byte_level: string(content, "tokenizer.ggml.model")? == "gpt2",
    })
}

fn byte_level_bpe(content: &Content, tokens: &[String]) -> Result<Tokenizer, TokenizerError> {
    let merges = string_array(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::Metadata(format!("invalid merge `{merge}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocabulary(tokens), merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let byte_level = ByteLevel::new(false, false, false);
    let regex_split = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
        Ok(split.into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "qwen2" | "deepseek-r1-qwen" => {
            PreTokenizerSequence::new(vec![regex_split(REGEX_QWEN2)?, byte_level.into()]).into()
        }
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            PreTokenizerSequence::new(vec![regex_split(REGEX_LLAMA3)?, byte_level.into()]).into()
        }
        // StarCoder-family vocabularies (SmolLM among them) split every digit first.
        "smollm" | "starcoder" | "refact" | "codeshell" => PreTokenizerSequence::new(vec![
            Digits::new(true).into(),
            regex_split(REGEX_GPT2)?,
            byte_level.into(),
        ])
        .into(),
        other => {
            if other != "default" && other != "gpt-2" {
                tracing::warn!(pre = other, "unknown GGUF pre-tokenizer, using GPT-2's regex");
            }
            PreTokenizerSequence::new(vec![regex_split(REGEX_GPT2)?, byte_level.into()]).into()
        }
    };

    let mut tokenizer = Tokenizer::new(bpe);
    if pre == "qwen2" {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    Ok(tokenizer)
}

fn sentencepiece_bpe(content: &Content, tokens: &[String]) -> Result<Tokenizer, TokenizerError> {
    let scores = match content.metadata.get("tokenizer.ggml.scores") {
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| v.to_f32().map_err(|_| TokenizerError::Metadata("score is not f32".into())))
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(TokenizerError::Metadata("missing tokenizer.ggml.scores".into())),
    };
    let vocab = vocabulary(tokens);
    let merges = merges_from_scores(tokens, &scores, &vocab);
    tracing::debug!(merges = merges.len(), "derived SentencePiece merges");

    let unk = content
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|id| tokens.get(id as usize))
        .cloned()
        .unwrap_or_else(|| "<unk>".to_string());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        // Without a pre-tokenizer the whole text is one word, so a word cache never hits; it
        // would only hold memory.
        .cache_capacity(0)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    let add_space_prefix = matches!(
        content.metadata.get("tokenizer.ggml.add_space_prefix"),
        Some(Value::Bool(true))
    );
    let mut tokenizer = Tokenizer::new(bpe);
    let normalizer = Replace::new(" ", "▁").map_err(|e| TokenizerError::Build(e.to_string()))?;
    if add_space_prefix {
        let prepend = tokenizers::normalizers::Prepend::new("▁".to_string());
        let sequence = tokenizers::normalizers::Sequence::new(vec![prepend.into(), normalizer.into()]);
        tokenizer
            .with_normalizer(Some(sequence))
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
    } else {
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
    }
    let replace = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| TokenizerError::Build(e.to_string()))?,
    );
    let mut decoders: Vec<DecoderWrapper> = vec![replace, ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(tokenizers::decoders::strip::Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Derives BPE merges from SentencePiece scores: every split of a token into two vocabulary
/// pieces is a merge, ranked by the merged token's score (higher first, then lower id).
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));

    let mut merges = Vec::new();
    for index in order {
        let token = &tokens[index];
        if vocab.get(token.as_str()) != Some(&(index as u32)) {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((left.to_string(), right.to_string()));
            }
        }
    }
    merges
}

/// Returns true for unused placeholder tokens such as `<unused12>`.
fn is_placeholder(text: &str) -> bool {
    text.strip_prefix("<unused")
        .and_then(|rest| rest.strip_suffix('>'))
        .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

/// Maps each token string to its id; a string listed twice keeps its first id, as llama.cpp does.
fn vocabulary(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.clone()).or_insert(id as u32);
    }
    vocab
}

fn string(content: &Content, key: &str) -> Result<String, TokenizerError> {
    match content.metadata.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(TokenizerError::Metadata(format!("missing string `{key}`"))),
    }
}

fn string_array(content: &Content, key: &str) -> Result<Vec<String>, TokenizerError> {
    match content.metadata.get(key) {
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| TokenizerError::Metadata(format!("`{key}` contains a value that is not a string")))
            })
            .collect(),
        _ => Err(TokenizerError::Metadata(format!("missing array `{key}`"))),
    }
}

fn int_array(value: &Value, key: &str) -> Result<Vec<i64>, TokenizerError> {
    let Value::Array(values) = value else {
        return Err(TokenizerError::Metadata(format!("`{key}` is not an array")));
    };
    values
        .iter()
        .map(|v| match v {
            Value::I32(x) => Ok(*x as i64),
            Value::U32(x) => Ok(*x as i64),
            Value::I64(x) => Ok(*x),
            Value::U8(x) => Ok(*x as i64),
            Value::I8(x) => Ok(*x as i64),
            _ => Err(TokenizerError::Metadata(format!("`{key}` contains a value that is not an integer"))),
        })
        .collect()
}
