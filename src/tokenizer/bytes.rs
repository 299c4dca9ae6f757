//! The raw bytes of a single token, for `logprobs.bytes`.
//!
//! Decoding one token alone turns a partial UTF-8 character into U+FFFD, which loses the bytes a
//! client needs to rebuild emoji and CJK text from per-token log-probabilities. The bytes come
//! from the vocabulary piece instead: byte-level BPE maps each byte to a printable character
//! (GPT-2's table), and SentencePiece writes raw bytes as `<0xNN>` and spaces as U+2581.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokenizers::Tokenizer;

/// GPT-2's byte-to-character table, inverted: printable Latin-1 bytes stand for themselves and
/// the other 68 bytes are numbered from U+0100 upward.
fn byte_level_table() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut table = HashMap::with_capacity(256);
        let mut next = 0u32;
        for byte in 0..=255u8 {
            let ch = if printable(byte) {
                char::from(byte)
            } else {
                next += 1;
                char::from_u32(255 + next).unwrap_or('\u{FFFD}')
            };
            table.insert(ch, byte);
        }
        table
    })
}

/// Returns the bytes that token `id` stands for.
pub fn token_bytes(tokenizer: &Tokenizer, id: u32, byte_level: bool) -> Vec<u8> {
    let Some(piece) = tokenizer.id_to_token(id) else {
        return Vec::new();
    };
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|rest| rest.strip_suffix('>')) {
        if let Ok(byte) = u8::from_str_radix(hex, 16) {
            return vec![byte];
        }
    }
    if byte_level {
        let table = byte_level_table();
        let bytes: Option<Vec<u8>> = piece.chars().map(|ch| table.get(&ch).copied()).collect();
        // Added tokens such as `<|im_end|>` are plain text, not byte-level characters.
        return bytes.unwrap_or_else(|| piece.into_bytes());
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_inverts_gpt2_mapping() {
        let table = byte_level_table();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'a'], b'a');
    }
}
