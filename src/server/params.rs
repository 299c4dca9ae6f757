//! Validation of the sampling and length fields shared by both completion endpoints.

use super::error::ApiError;
use super::openai::GenerationFields;
use crate::engine::SamplingParams;

/// OpenAI accepts at most four stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;
/// Maximum length of a stop sequence, in bytes. Each generated token is checked against every
/// prefix of every stop sequence, so this bounds that work.
const MAX_STOP_BYTES: usize = 1024;
/// OpenAI returns at most 20 alternatives per token.
pub const MAX_TOP_LOGPROBS: u64 = 20;

pub struct Validated {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Rejects a field tierd does not implement unless it is absent, null or `neutral`.
pub fn reject_unsupported(
    name: &str,
    value: &Option<serde_json::Value>,
    neutral: &[serde_json::Value],
) -> Result<(), ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(value) if neutral.contains(value) => Ok(()),
        Some(value) => Err(ApiError::invalid_request(
            format!("`{name}` is not supported by tierd (got {value}); remove it from the request."),
            Some(name),
        )),
    }
}

/// Checks the shared fields; `max_tokens` is the endpoint's own limit field when it has one
/// (chat's `max_completion_tokens` overrides `max_tokens`).
pub fn validate(
    fields: GenerationFields,
    max_tokens_override: Option<(u64, &str)>,
    default_max_tokens: usize,
) -> Result<Validated, ApiError> {
    use serde_json::json;
    reject_unsupported("logit_bias", &fields.logit_bias, &[json!({})])?;
    reject_unsupported("presence_penalty", &fields.presence_penalty, &[json!(0), json!(0.0)])?;
    reject_unsupported("frequency_penalty", &fields.frequency_penalty, &[json!(0), json!(0.0)])?;

    if let Some(n) = fields.n {
        if n != 1 {
            return Err(ApiError::invalid_request(
                format!("Invalid value for `n`: {n}; tierd returns one choice per request, so `n` must be 1."),
                Some("n"),
            ));
        }
    }

    let (max_tokens, max_param) = match (max_tokens_override, fields.max_tokens) {
        (Some((value, param)), _) => (Some(value), param),
        (None, value) => (value, "max_tokens"),
    };
    let max_tokens = match max_tokens {
        Some(0) => {
            return Err(ApiError::invalid_request(
                format!("Invalid value for `{max_param}`: 0; it must be at least 1."),
                Some(max_param),
            ))
        }
        Some(value) => usize::try_from(value).unwrap_or(usize::MAX),
        None => default_max_tokens,
    };

    let temperature = fields.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_request(
            format!("Invalid value for `temperature`: {temperature}; it must be between 0 and 2."),
            Some("temperature"),
        ));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_request(
            format!("Invalid value for `top_p`: {top_p}; it must be greater than 0 and at most 1."),
            Some("top_p"),
        ));
    }

    let stop = fields.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_request(
            format!(
                "Invalid value for `stop`: {} sequences given; at most {MAX_STOP_SEQUENCES} are allowed.",
                stop.len()
            ),
            Some("stop"),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_request(
            format!(
                "Invalid value for `stop`: a stop sequence of {} bytes is longer than the limit of {MAX_STOP_BYTES} bytes.",
                long.len()
            ),
            Some("stop"),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_request(
            "Invalid value for `stop`: stop sequences must not be empty.",
            Some("stop"),
        ));
    }

    let stream = fields.stream.unwrap_or(false);
    // OpenAI rejects `stream_options` on a request that does not stream rather than ignoring it,
    // so a client that forgot `stream: true` learns it here. An explicit null counts as absent.
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_request(
            "`stream_options` is only allowed when `stream` is true. Set `stream` to true or remove `stream_options`.",
            Some("stream_options"),
        ));
    }
    let include_usage = fields.stream_options.is_some_and(|o| o.include_usage);
    Ok(Validated {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k: fields.top_k.map_or(0, |k| usize::try_from(k).unwrap_or(usize::MAX)),
            seed: fields.seed,
        },
        stop,
        stream,
        include_usage,
    })
}

/// Rejects prompts that leave no room to generate, before anything is queued.
pub fn check_context(prompt_tokens: usize, context_length: usize, param: &str) -> Result<(), ApiError> {
    if prompt_tokens >= context_length {
        return Err(ApiError::invalid_request(
            format!(
                "This model's maximum context length is {context_length} tokens, but the prompt has \
                 {prompt_tokens} tokens, which leaves no room for the completion. Shorten the {param}."
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}
