//! Timing of one streamed chat completion from its server-sent events: time to first token,
//! the gaps between later content chunks, and the output token count.

use std::time::{Duration, Instant};

use serde_json::Value;

/// Timings and counts of a completed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// From sending the request to the first chunk with non-empty content; `None` for a
    /// classification, or for a stream that carried no content.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive content chunks after the first.
    pub inter_token: Vec<Duration>,
    /// From sending the request to the end of the response (`data: [DONE]` for a stream).
    pub e2e: Duration,
    /// `usage.completion_tokens` when the server sent usage, else the content chunks.
    pub output_tokens: u64,
    /// Whether `output_tokens` comes from the server's usage rather than a chunk count.
    pub tokens_from_usage: bool,
    /// `usage.prompt_tokens`, when the server sent usage.
    pub prompt_tokens: Option<u64>,
}

/// Fault that makes a stream an invalid chat completion stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamFault {
    /// The server sent an `error` object in place of a chunk, as OpenAI does mid-stream.
    #[error("the stream carried an error: {0}")]
    ErrorEvent(String),
    #[error("an event is not a JSON chunk ({message}): {data}")]
    InvalidChunk { message: String, data: String },
}

/// Reads the `data:` payloads of one chat completion stream as they arrive.
#[derive(Debug)]
pub struct ChatStreamTimer {
    sent: Instant,
    first_content: Option<Instant>,
    last_content: Option<Instant>,
    inter_token: Vec<Duration>,
    content_chunks: u64,
    usage_completion: Option<u64>,
    usage_prompt: Option<u64>,
    done: bool,
}

/// Largest part of a bad payload that an error message quotes.
const QUOTED_BYTES: usize = 200;

impl ChatStreamTimer {
    /// Starts timing a request sent at `sent`.
    pub fn new(sent: Instant) -> Self {
        Self {
            sent,
            first_content: None,
            last_content: None,
            inter_token: Vec::new(),
            content_chunks: 0,
            usage_completion: None,
            usage_prompt: None,
            done: false,
        }
    }

    /// Returns whether `data: [DONE]` has arrived.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes the payload of one event that arrived at `at`.
    pub fn on_data(&mut self, data: &str, at: Instant) -> Result<(), StreamFault> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| StreamFault::InvalidChunk {
            message: e.to_string(),
            data: quote(data),
        })?;
        if let Some(error) = chunk.get("error") {
            let message = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_string);
            return Err(StreamFault::ErrorEvent(quote(&message)));
        }

        if has_content(&chunk) {
            self.content_chunks += 1;
            match self.last_content {
                None => self.first_content = Some(at),
                Some(previous) => self.inter_token.push(at.saturating_duration_since(previous)),
            }
            self.last_content = Some(at);
        }
        if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
            self.usage_completion = usage.get("completion_tokens").and_then(Value::as_u64).or(self.usage_completion);
            self.usage_prompt = usage.get("prompt_tokens").and_then(Value::as_u64).or(self.usage_prompt);
        }
        Ok(())
    }

    /// Ends timing at `ended`, when `[DONE]` arrived.
    pub fn finish(self, ended: Instant) -> Measured {
        let (output_tokens, tokens_from_usage) = match self.usage_completion {
            Some(tokens) => (tokens, true),
            None => (self.content_chunks, false),
        };
        Measured {
            ttft: self.first_content.map(|first| first.saturating_duration_since(self.sent)),
            inter_token: self.inter_token,
            e2e: ended.saturating_duration_since(self.sent),
            output_tokens,
            tokens_from_usage,
            prompt_tokens: self.usage_prompt,
        }
    }
}

/// Returns whether any choice of `chunk` carries non-empty generated text: `delta.content`, or the
/// `delta.reasoning_content` that llama.cpp's server and vLLM stream for reasoning models.
fn has_content(chunk: &Value) -> bool {
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return false;
    };
    choices.iter().any(|choice| {
        let delta = &choice["delta"];
        ["content", "reasoning_content"]
            .iter()
            .any(|field| delta[field].as_str().is_some_and(|text| !text.is_empty()))
    })
}

/// Cuts `text` to at most `QUOTED_BYTES` bytes at a character boundary, for error messages.
pub fn quote(text: &str) -> String {
    if text.len() <= QUOTED_BYTES {
        return text.to_string();
    }
    let mut end = QUOTED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::sse::SseParser;

    fn content_chunk(text: &str) -> String {
        serde_json::json!({"choices": [{"index": 0, "delta": {"content": text}}]}).to_string()
    }

    /// Feeds `body` to an SSE parser in chunks of `split` bytes, the chunk `i` arriving `i` ms
    /// after the request was sent, and returns the timings.
    fn time_body(body: &str, split: usize) -> Result<(Measured, bool), StreamFault> {
        let sent = Instant::now();
        let mut parser = SseParser::new();
        let mut timer = ChatStreamTimer::new(sent);
        let mut at = sent;
        for piece in body.as_bytes().chunks(split) {
            at += Duration::from_millis(1);
            for event in parser.feed(piece).expect("event within the size limit") {
                timer.on_data(&event.data, at)?;
            }
        }
        let done = timer.is_done();
        Ok((timer.finish(at), done))
    }

    #[test]
    fn first_token_skips_role_and_empty_chunks() {
        let role = serde_json::json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]});
        let body = format!(
            "data: {role}\n\ndata: {}\n\ndata: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
            content_chunk("Hel"),
            content_chunk("lo"),
            content_chunk("!")
        );
        // One event per network chunk: split at every event boundary.
        let events: Vec<String> = body.split_inclusive("\n\n").map(str::to_string).collect();
        let sent = Instant::now();
        let mut parser = SseParser::new();
        let mut timer = ChatStreamTimer::new(sent);
        for (i, event) in events.iter().enumerate() {
            let at = sent + Duration::from_millis(10 * (i as u64 + 1));
            for parsed in parser.feed(event.as_bytes()).expect("small event") {
                timer.on_data(&parsed.data, at).expect("valid chunk");
            }
        }
        assert!(timer.is_done());
        let measured = timer.finish(sent + Duration::from_millis(50));
        // The role chunk arrives at 10 ms; the first content at 20 ms.
        assert_eq!(measured.ttft, Some(Duration::from_millis(20)));
        assert_eq!(measured.inter_token, [Duration::from_millis(10), Duration::from_millis(10)]);
        assert_eq!(measured.e2e, Duration::from_millis(50));
        assert_eq!(measured.output_tokens, 3);
        assert!(!measured.tokens_from_usage);
        assert_eq!(measured.prompt_tokens, None);
    }

    #[test]
    fn usage_chunk_sets_token_counts() {
        let usage = serde_json::json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}});
        let body = format!("data: {}\n\ndata: {usage}\n\ndata: [DONE]\n\n", content_chunk("hi"));
        let (measured, done) = time_body(&body, 7).expect("valid stream");
        assert!(done);
        assert_eq!(measured.output_tokens, 5);
        assert!(measured.tokens_from_usage);
        assert_eq!(measured.prompt_tokens, Some(12));
    }

    #[test]
    fn multi_line_data_event_is_one_chunk() {
        // A JSON chunk spread over several `data:` lines, joined with newlines by the parser.
        let body = "data: {\"choices\":\ndata: [{\"delta\":\ndata: {\"content\": \"x\"}}]}\n\ndata: [DONE]\n\n";
        let (measured, done) = time_body(body, 3).expect("valid stream");
        assert!(done);
        assert_eq!(measured.output_tokens, 1);
        assert!(measured.ttft.is_some());
    }

    #[test]
    fn crlf_comments_and_split_bytes_parse() {
        let body = format!(": keep-alive\r\n\r\ndata: {}\r\n\r\ndata: {}\r\n\r\ndata: [DONE]\r\n\r\n", content_chunk("é"), content_chunk("ü"));
        let (measured, done) = time_body(&body, 1).expect("valid stream");
        assert!(done);
        assert_eq!(measured.output_tokens, 2);
        assert_eq!(measured.inter_token.len(), 1);
        assert!(measured.ttft.expect("content arrived") <= measured.e2e);
    }

    #[test]
    fn stream_without_done_is_not_done() {
        let body = format!("data: {}\n\n", content_chunk("a"));
        let (_, done) = time_body(&body, 64).expect("valid chunk");
        assert!(!done);
    }

    #[test]
    fn reasoning_content_counts_as_output() {
        let chunk = serde_json::json!({"choices": [{"delta": {"reasoning_content": "think"}}]});
        let body = format!("data: {chunk}\n\ndata: [DONE]\n\n");
        let (measured, _) = time_body(&body, 64).expect("valid stream");
        assert_eq!(measured.output_tokens, 1);
        assert!(measured.ttft.is_some());
    }

    #[test]
    fn error_object_is_a_fault() {
        let body = format!("data: {}\n\ndata: {{\"error\": {{\"message\": \"model overloaded\"}}}}\n\n", content_chunk("a"));
        let fault = time_body(&body, 64).expect_err("error event");
        assert_eq!(fault, StreamFault::ErrorEvent("model overloaded".into()));
    }

    #[test]
    fn non_json_payload_is_a_fault() {
        let fault = time_body("data: not json\n\n", 64).expect_err("invalid chunk");
        assert!(matches!(&fault, StreamFault::InvalidChunk { data, .. } if data == "not json"), "{fault:?}");
    }

    #[test]
    fn stream_without_content_has_no_ttft() {
        let (measured, done) = time_body("data: {\"choices\": []}\n\ndata: [DONE]\n\n", 64).expect("valid stream");
        assert!(done);
        assert_eq!(measured.ttft, None);
        assert_eq!(measured.output_tokens, 0);
    }

    #[test]
    fn quote_cuts_at_a_character_boundary() {
        let text = "é".repeat(150);
        let quoted = quote(&text);
        assert!(quoted.ends_with('…'));
        assert!(quoted.len() <= QUOTED_BYTES + '…'.len_utf8());
        assert_eq!(quote("short"), "short");
    }
}
