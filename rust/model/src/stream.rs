//! Incremental detokenisation for streaming generation.
//!
//! One token is not always whole text: byte-level BPE splits an emoji over several tokens, and
//! SentencePiece byte fallback spells it as `<0xF0><0x9F>...`. The decoder buffers bytes until
//! they form complete UTF-8 characters, so every event is valid text and the events concatenate
//! to exactly what [`Tokenizer::decode`] gives for the whole sequence.

use crate::tokenizer::Tokenizer;

/// Turns a stream of token ids into a stream of text pieces.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    /// Nothing has been produced yet (the leading SentencePiece space may still be due).
    at_start: bool,
    skip_special: bool,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    /// A decoder that leaves out control tokens (`<|im_end|>`, `<eos>`), like
    /// `decode(ids, true)`.
    pub fn new() -> Self {
        Self::with_skip_special(true)
    }

    /// A decoder matching `decode(ids, skip_special)`.
    pub fn with_skip_special(skip_special: bool) -> Self {
        Self {
            pending: Vec::new(),
            at_start: true,
            skip_special,
        }
    }

    /// Adds one token; returns the text it completes, if any. An id outside the vocabulary
    /// yields U+FFFD rather than being dropped silently.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<String> {
        if self.skip_special && tokenizer.is_special(id) {
            return None;
        }
        match tokenizer.token_bytes(id) {
            Some(bytes) => self.pending.extend_from_slice(bytes),
            None => self.pending.extend_from_slice("\u{FFFD}".as_bytes()),
        }
        if self.at_start && !self.pending.is_empty() {
            self.at_start = false;
            if tokenizer.strips_leading_space() && self.pending.first() == Some(&b' ') {
                self.pending.remove(0);
            }
        }
        self.take_complete()
    }

    /// Flushes what is left; an incomplete character at the end becomes U+FFFD.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(text)
    }

    /// Bytes held back because they do not yet form a complete character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Emits the longest prefix that is complete text. Bytes that can never become valid
    /// UTF-8 are replaced with U+FFFD exactly as `String::from_utf8_lossy` does on the whole.
    fn take_complete(&mut self) -> Option<String> {
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            let rest = &self.pending[consumed..];
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe by construction: `valid_up_to` bytes were just validated.
                    out.push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            consumed += valid + bad;
                        }
                        None => {
                            // An incomplete character at the end: wait for more bytes.
                            consumed += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        (!out.is_empty()).then_some(out)
    }
}
