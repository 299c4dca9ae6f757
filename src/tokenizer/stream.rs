//! Incremental detokenization that never emits part of a UTF-8 character.

use tokenizers::Tokenizer;

/// Turns a growing sequence of token ids into text deltas.
///
/// A token may end in the middle of a multi-byte character (byte-level BPE and byte fallback
/// both do this for emoji and CJK). Decoding such a prefix yields U+FFFD, so the decoder keeps
/// the tokens back until the character completes. Text is decoded from a short window of recent
/// tokens rather than from the start, because some decoders (SentencePiece's leading-space
/// strip, for one) render a token differently at the start of the text; the concatenated deltas
/// equal the decoding of the whole sequence.
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window that is decoded to find the text of new tokens.
    prefix_offset: usize,
    /// Tokens before this index have had their text emitted.
    read_offset: usize,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
        }
    }

    /// Appends `id` and returns the text that became complete, possibly empty.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, super::TokenizerError> {
        self.ids.push(id);
        let (prefix, full) = self.decode_window(tokenizer)?;

        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// Returns text still held back at the end of generation (an incomplete character is
    /// emitted as U+FFFD, as the non-streaming decode does).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, super::TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, full) = self.decode_window(tokenizer)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }

    /// Decodes the window without and with the tokens whose text is not emitted yet.
    fn decode_window(&self, tokenizer: &Tokenizer) -> Result<(String, String), super::TokenizerError> {
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, self.skip_special)
                .map_err(|e| super::TokenizerError::Encode(e.to_string()))
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        Ok((prefix, full))
    }
}
