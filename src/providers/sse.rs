//! An incremental parser for server-sent events (the `text/event-stream` format of the WHATWG
//! HTML standard), fed with network chunks as they arrive.

/// Largest event, counting its field lines, that the parser buffers. Provider events carry one
/// token or a small status object, so a larger one means a broken or hostile stream.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Value of the `event:` field, or `message` when the event had none.
    pub event: String,
    /// Values of the event's `data:` lines joined with `\n`.
    pub data: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a server-sent event exceeds {limit} bytes")]
pub struct EventTooLarge {
    pub limit: usize,
}

/// Parser state between chunks: the unfinished line and the fields of the unfinished event.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event_type: String,
    data: String,
    has_data: bool,
    /// Bytes buffered for the current event, checked against `MAX_EVENT_BYTES`.
    event_bytes: usize,
    /// The last byte seen was a CR, so an LF that follows, even in the next chunk, ends no line.
    after_cr: bool,
    /// Whether the first bytes are past, after which a UTF-8 byte order mark is data.
    started: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses one chunk and returns the events it completes. Lines end with CRLF, LF or CR,
    /// and a line or an event may span any number of chunks.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, EventTooLarge> {
        let mut bytes = chunk;
        if !self.started && !bytes.is_empty() {
            self.started = true;
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(bytes);
        }

        let mut events = Vec::new();
        for &byte in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match byte {
                b'\n' if after_cr => {}
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut events);
                }
                _ => {
                    self.line.push(byte);
                    self.event_bytes += 1;
                    if self.event_bytes > MAX_EVENT_BYTES {
                        return Err(EventTooLarge { limit: MAX_EVENT_BYTES });
                    }
                }
            }
        }
        Ok(events)
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) {
        // Splitting on CR and LF bytes never cuts a UTF-8 sequence, so a whole line decodes
        // cleanly; invalid bytes become U+FFFD as the standard requires.
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();

        if line.is_empty() {
            self.dispatch(events);
            return;
        }
        if line.starts_with(':') {
            return;
        }

        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event_type = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // `id` and `retry` serve reconnection, which provider streams do not use.
            _ => {}
        }
    }

    fn dispatch(&mut self, events: &mut Vec<SseEvent>) {
        let event_type = std::mem::take(&mut self.event_type);
        let data = std::mem::take(&mut self.data);
        self.event_bytes = 0;

        // The standard drops an event with no `data:` line, even one with an `event:` line.
        if !std::mem::replace(&mut self.has_data, false) {
            return;
        }
        let event = if event_type.is_empty() { "message".to_string() } else { event_type };
        events.push(SseEvent { event, data });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_string(),
            data: data.to_string(),
        }
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(parser.feed(chunk).expect("event within the size limit"));
        }
        events
    }

    #[test]
    fn data_only_event_is_message() {
        let events = parse_all(&[b"data: {\"a\":1}\n\n"]);
        assert_eq!(events, [event("message", "{\"a\":1}")]);
    }

    #[test]
    fn event_field_and_multiline_data() {
        let events = parse_all(&[b"event: delta\ndata: one\ndata:two\ndata:  three\n\n"]);
        assert_eq!(events, [event("delta", "one\ntwo\n three")]);
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let events = parse_all(&[b": keep-alive\nid: 7\nretry: 10\nfoo: bar\ndata: x\n\n"]);
        assert_eq!(events, [event("message", "x")]);
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let crlf = parse_all(&[b"event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2\r\n\r\n"]);
        assert_eq!(crlf, [event("a", "1"), event("b", "2")]);

        let cr = parse_all(&[b"data: 1\r\rdata: 2\r\r"]);
        assert_eq!(cr, [event("message", "1"), event("message", "2")]);
    }

    #[test]
    fn crlf_split_between_chunks() {
        // The LF opening the second chunk belongs to the CR that ended the first one, so it
        // must not count as the blank line that dispatches the event.
        let events = parse_all(&[b"data: 1\r", b"\ndata: 2\r", b"\n\r\n"]);
        assert_eq!(events, [event("message", "1\n2")]);
    }

    #[test]
    fn event_split_at_every_byte() {
        let text = "event: content_block_delta\r\ndata: {\"text\":\"h\u{e9}llo\"}\r\n\r\n: ping\n\ndata: [DONE]\n\n";
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        let events = parse_all(&chunks);
        assert_eq!(
            events,
            [
                event("content_block_delta", "{\"text\":\"h\u{e9}llo\"}"),
                event("message", "[DONE]"),
            ]
        );
    }

    #[test]
    fn event_without_data_is_dropped() {
        let events = parse_all(&[b"event: ping\n\ndata: x\n\n"]);
        assert_eq!(events, [event("message", "x")]);
    }

    #[test]
    fn empty_data_line_dispatches_empty_event() {
        let events = parse_all(&[b"data\n\n"]);
        assert_eq!(events, [event("message", "")]);
    }

    #[test]
    fn unfinished_event_is_not_dispatched() {
        let events = parse_all(&[b"data: 1\n\ndata: 2\n"]);
        assert_eq!(events, [event("message", "1")]);
    }

    #[test]
    fn byte_order_mark_is_skipped() {
        let events = parse_all(&[b"\xEF\xBB\xBFdata: x\n\n"]);
        assert_eq!(events, [event("message", "x")]);
    }

    #[test]
    fn oversized_event_is_rejected() {
        let mut parser = SseParser::new();
        let line = vec![b'a'; MAX_EVENT_BYTES + 1];
        assert_eq!(parser.feed(&line), Err(EventTooLarge { limit: MAX_EVENT_BYTES }));
    }
}
