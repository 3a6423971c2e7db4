//! Token ids → text events: whole UTF-8 characters (via the model's [`StreamDecoder`]) and
//! never any part of a stop string, so text once shown is final.

use uhlm_model::stream::StreamDecoder;
use uhlm_model::tokenizer::Tokenizer;

pub(crate) struct TextStream {
    decoder: StreamDecoder,
    stops: Vec<String>,
    /// All text so far (cut before a stop string once one is hit).
    text: String,
    /// Bytes of `text` already handed out.
    shown: usize,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        Self {
            decoder: StreamDecoder::new(),
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            shown: 0,
        }
    }

    /// Adds a token; returns the newly showable text and whether a stop string was reached.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> (String, bool) {
        let piece = self.decoder.push(tokenizer, id).unwrap_or_default();
        self.push_text(&piece)
    }

    /// Flushes what the decoder and the stop-string guard held back.
    pub fn finish(&mut self) -> (String, bool) {
        let tail = self.decoder.finish().unwrap_or_default();
        let (mut out, hit) = self.push_text(&tail);
        if !hit {
            out.push_str(&self.text[self.shown..]);
            self.shown = self.text.len();
        }
        (out, hit)
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn push_text(&mut self, piece: &str) -> (String, bool) {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.shown.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(piece);
        let start = self.shown;
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at.max(start));
            self.shown = self.text.len();
            return (self.text[start..].to_string(), true);
        }
        let held = self
            .stops
            .iter()
            .map(|s| held_prefix(&self.text, s))
            .max()
            .unwrap_or(0);
        self.shown = (self.text.len() - held).max(start);
        (self.text[start..self.shown].to_string(), false)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn held_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str], stops: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut t = TextStream::new(&stops);
        let mut shown = String::new();
        for p in pieces {
            let (s, hit) = t.push_text(p);
            shown.push_str(&s);
            if hit {
                assert_eq!(shown, t.text());
                return (shown, true);
            }
        }
        let rest = &t.text[t.shown..];
        shown.push_str(rest);
        (shown, false)
    }

    #[test]
    fn a_stop_string_split_over_tokens_is_never_shown() {
        assert_eq!(
            run(&["Hi", " EN", "D more"], &["END"]),
            ("Hi ".into(), true)
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["a", "E", "Nx"], &["END"]), ("aENx".into(), false));
    }

    #[test]
    fn multibyte_stops() {
        assert_eq!(run(&["x😀", "y"], &["😀y"]), ("x".into(), true));
        assert_eq!(held_prefix("ab\u{e9}", "\u{e9}z"), 2);
    }
}
