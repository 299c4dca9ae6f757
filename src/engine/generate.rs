//! The token generation loop for one request: prefill, decode, stop conditions and streaming.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::prompt_cache::{PromptCache, Sequence};
use super::sampler::{Sampler, SamplingParams};
use super::stop::{StopMatcher, StopOutcome};
use crate::model::LoadedModel;
use crate::tokenizer::StreamDecoder;

/// Prompt tokens run through the model per forward call. Bounds the attention score buffer
/// (heads × chunk × context floats) while keeping prefill batched.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub request_id: String,
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Number of alternatives per token to report; `None` reports no log-probabilities.
    pub logprobs: Option<usize>,
    /// Completion tokens generated so far, so that a client that leaves early can still be
    /// charged for what was generated.
    pub produced: Arc<AtomicUsize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    /// The token's raw bytes, which may be part of a UTF-8 character.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely alternatives: text, log-probability and raw bytes.
    pub top: Vec<(String, f32, Vec<u8>)>,
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub queue: Duration,
    pub prefill: Duration,
    pub decode: Duration,
}

#[derive(Debug)]
pub enum GenerationEvent {
    /// Text that became final, with the log-probabilities of the tokens produced since the
    /// previous event (when requested).
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose keys and values came from the prompt cache.
        cached_tokens: usize,
        completion_tokens: usize,
        timings: Timings,
    },
    Failed(String),
}

/// Runs one request to completion, sending events to `events`. Returns early, without error,
/// when the receiver is gone (the client disconnected): at most one decode step runs after that.
///
/// With `prompt_cache`, the request starts from the longest stored prefix of its prompt, and
/// its own tokens are stored afterwards, also when the client left early. A failed request
/// stores nothing, because its cache may be half written.
pub fn generate(
    model: &Arc<LoadedModel>,
    request: &GenerationRequest,
    queued_for: Duration,
    events: &mpsc::Sender<GenerationEvent>,
    mut prompt_cache: Option<&mut PromptCache>,
) {
    let network = model.network.as_ref();
    let prompt = &request.prompt_tokens;
    let max_len = (prompt.len() + request.max_tokens).min(network.hparams().context_length);
    let reused = prompt_cache
        .as_deref_mut()
        .and_then(|cache| cache.lookup(prompt, max_len));
    let mut sequence = reused.unwrap_or_else(|| Sequence::new(network, max_len));

    match run(model, request, &mut sequence, queued_for, events) {
        Ok(()) => {
            if let Some(cache) = prompt_cache {
                cache.insert(sequence, prompt.len());
            }
        }
        Err(message) => {
            tracing::error!(request_id = %request.request_id, error = %message, "generation failed");
            let _ = events.blocking_send(GenerationEvent::Failed(message));
        }
    }
}

/// Generates after the tokens that `sequence` already holds, which must start the prompt.
fn run(
    model: &Arc<LoadedModel>,
    request: &GenerationRequest,
    sequence: &mut Sequence,
    queued_for: Duration,
    events: &mpsc::Sender<GenerationEvent>,
) -> Result<(), String> {
    let network = model.network.as_ref();
    let context = network.hparams().context_length;
    let prompt = &request.prompt_tokens;
    let mut timings = Timings {
        queue: queued_for,
        ..Default::default()
    };
    if prompt.is_empty() {
        return Err("the prompt has no tokens".into());
    }
    let cached_tokens = sequence.tokens.len();
    if cached_tokens >= prompt.len() || !prompt.starts_with(&sequence.tokens) {
        return Err(format!(
            "the reused prefix of {cached_tokens} tokens does not start the prompt of {} tokens",
            prompt.len()
        ));
    }

    let started = Instant::now();
    let mut logits = None;
    for chunk in prompt[cached_tokens..].chunks(PREFILL_CHUNK) {
        if events.is_closed() {
            return Ok(());
        }
        let output = sequence.forward(network, chunk).map_err(|e| e.to_string())?;
        logits = Some(output);
    }
    timings.prefill = started.elapsed();
    let Some(mut logits) = logits else {
        return Err("the prompt has no tokens".into());
    };

    let mut sampler = Sampler::new(request.sampling.clone());
    let mut decoder = StreamDecoder::new(true);
    let mut stop = StopMatcher::new(request.stop.clone());
    let end_tokens = end_of_generation_tokens(model);
    let budget = request.max_tokens.min(context.saturating_sub(prompt.len()));

    let decode_started = Instant::now();
    let mut completion_tokens = 0;
    let mut pending_logprobs = Vec::new();
    let mut reason = FinishReason::Length;
    let mut stopped_by_string = false;

    while completion_tokens < budget {
        let values: Vec<f32> = logits.to_vec1().map_err(|e| e.to_string())?;
        let token = sampler.sample(&values, request.logprobs);
        completion_tokens += 1;
        request.produced.store(completion_tokens, Ordering::Relaxed);

        // NOTE: the end-of-turn token counts in `completion_tokens` but gets no logprobs
        // entry, so a finished completion has one entry fewer than its completion tokens.
        if end_tokens.contains(&token.id) {
            reason = FinishReason::Stop;
            break;
        }
        if request.logprobs.is_some() {
            pending_logprobs.push(TokenLogprob {
                token: token_text(model, token.id),
                bytes: raw_bytes(model, token.id),
                logprob: token.logprob,
                top: token
                    .top
                    .iter()
                    .map(|(id, logprob)| (token_text(model, *id), *logprob, raw_bytes(model, *id)))
                    .collect(),
            });
        }

        let text = decoder
            .push(&model.tokenizer, token.id)
            .map_err(|e| e.to_string())?;
        let (ready, stopped) = match stop.push(&text) {
            StopOutcome::Continue(ready) => (ready, false),
            StopOutcome::Stopped(ready) => (ready, true),
        };
        if !send_delta(events, ready, &mut pending_logprobs) {
            return Ok(());
        }
        if stopped {
            reason = FinishReason::Stop;
            stopped_by_string = true;
            break;
        }

        if completion_tokens == budget {
            break;
        }
        if events.is_closed() {
            return Ok(());
        }
        logits = sequence
            .forward(network, &[token.id])
            .map_err(|e| e.to_string())?;
    }

    if !stopped_by_string {
        let tail = decoder.finish(&model.tokenizer).map_err(|e| e.to_string())?;
        let mut text = String::new();
        match stop.push(&tail) {
            StopOutcome::Continue(ready) => {
                text.push_str(&ready);
                text.push_str(&stop.finish());
            }
            StopOutcome::Stopped(ready) => {
                text.push_str(&ready);
                reason = FinishReason::Stop;
            }
        }
        if !send_delta(events, text, &mut pending_logprobs) {
            return Ok(());
        }
    }
    timings.decode = decode_started.elapsed();

    let _ = events.blocking_send(GenerationEvent::Finished {
        reason,
        prompt_tokens: prompt.len(),
        cached_tokens,
        completion_tokens,
        timings,
    });
    Ok(())
}

/// Sends `text` with the pending log-probabilities, unless both are empty. Returns false when
/// the receiver is gone.
fn send_delta(
    events: &mpsc::Sender<GenerationEvent>,
    text: String,
    pending_logprobs: &mut Vec<TokenLogprob>,
) -> bool {
    if text.is_empty() && pending_logprobs.is_empty() {
        return true;
    }
    let event = GenerationEvent::Delta {
        text,
        logprobs: std::mem::take(pending_logprobs),
    };
    events.blocking_send(event).is_ok()
}

/// Tokens that end generation: EOS and the control tokens that close a turn.
fn end_of_generation_tokens(model: &LoadedModel) -> Vec<u32> {
    const END_OF_TURN: [&str; 5] = [
        "<|im_end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|end|>",
    ];
    let mut ids: Vec<u32> = model.special.eos.into_iter().collect();
    for text in END_OF_TURN {
        if let Some(id) = model.tokenizer.token_to_id(text) {
            if model.special.control.contains(&id) && !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

fn raw_bytes(model: &LoadedModel, id: u32) -> Vec<u8> {
    crate::tokenizer::token_bytes(&model.tokenizer, id, model.special.byte_level)
}

fn token_text(model: &LoadedModel, id: u32) -> String {
    model
        .tokenizer
        .decode(&[id], false)
        .unwrap_or_else(|_| String::new())
}
