//! Plain local generation with one model: prompt → sampled tokens → streamed text.
//!
//! This is the baseline every hybrid mode is compared against, and what `uhlm generate` runs.
//! The distribution comes from `uhlm_core::sampling`, the same transformation the hybrid
//! verifier applies, so a seeded local run and a hybrid run sample from the same process.

use std::ops::ControlFlow;

use rand::Rng;
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample};

use crate::error::ModelError;
use crate::session::Session;
use crate::stream::StreamDecoder;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced this end-of-sequence / end-of-turn token (not part of the output).
    Eos(u32),
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The text reached one of the stop strings (cut before it).
    StopString,
    /// The model's context window is full.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids, the stopping EOS excluded.
    pub tokens: Vec<u32>,
    /// Their text, cut before a stop string.
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid sampling options: {0}")]
    InvalidOptions(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the model produced no finite logit at step {step}")]
    NoUsableLogits { step: usize },
}

/// Appends `prompt` to `session` and samples up to `opts.max_tokens` tokens.
///
/// `on_token(id, text)` runs after every generated token with the text that became safe to
/// show (complete characters that cannot be the start of a stop string; often empty);
/// returning `ControlFlow::Break` stops generation. The concatenated `text` arguments equal
/// [`Generation::text`].
pub fn generate<R: Rng + ?Sized>(
    session: &mut Session,
    prompt: &[u32],
    opts: &SamplingOptions,
    rng: &mut R,
    mut on_token: impl FnMut(u32, &str) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    opts.validate().map_err(GenerateError::InvalidOptions)?;
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt.into());
    }
    let model = session.model().clone();
    let tokenizer = model.tokenizer();
    let eos = tokenizer.eos_ids();
    let stops: Vec<&str> = opts
        .stop
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();

    let mut logits = session.score_last(prompt)?;
    let mut probs = Vec::new();
    let mut scratch = Vec::new();
    let mut decoder = StreamDecoder::new();
    let mut out = TextOut::new(&stops);
    let mut tokens = Vec::new();
    let mut stop = StopReason::MaxTokens;

    for step in 0..opts.max_tokens as usize {
        if !probabilities_into(&logits, opts, &mut probs, &mut scratch) {
            return Err(GenerateError::NoUsableLogits { step });
        }
        let id = sample(&probs, rng);
        if eos.contains(&id) {
            stop = StopReason::Eos(id);
            break;
        }
        tokens.push(id);
        let piece = decoder.push(tokenizer, id).unwrap_or_default();
        let (shown, hit_stop) = out.push(&piece);
        let flow = on_token(id, shown);
        if hit_stop {
            stop = StopReason::StopString;
            break;
        }
        if flow.is_break() {
            stop = StopReason::Cancelled;
            break;
        }
        if step + 1 == opts.max_tokens as usize {
            break;
        }
        if session.len() >= session.context_length() {
            stop = StopReason::ContextFull;
            break;
        }
        logits = session.step(id)?;
    }
    if stop != StopReason::StopString {
        let tail = decoder.finish().unwrap_or_default();
        let (shown, hit_stop) = out.push(&tail);
        let shown = shown.to_string();
        let rest = out.flush().to_string();
        if hit_stop {
            stop = StopReason::StopString;
        }
        let last = tokens.last().copied().unwrap_or(0);
        if !shown.is_empty() || !rest.is_empty() {
            // Text completed only at the end still reaches the caller; stopping is moot now.
            let _ = on_token(last, &format!("{shown}{rest}"));
        }
    }
    Ok(Generation {
        tokens,
        text: out.text,
        stop,
        prompt_tokens: prompt.len(),
    })
}

/// Accumulates text and decides how much of it may be shown given the stop strings.
struct TextOut<'a> {
    stops: &'a [&'a str],
    text: String,
    shown: usize,
}

impl<'a> TextOut<'a> {
    fn new(stops: &'a [&'a str]) -> Self {
        Self {
            stops,
            text: String::new(),
            shown: 0,
        }
    }

    /// Adds `piece`; returns the newly showable text and whether a stop string was reached
    /// (then the text is cut before it).
    fn push(&mut self, piece: &str) -> (&str, bool) {
        let search_from = self
            .shown
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s).map(|i| search_from + i))
            .min();
        let start = self.shown;
        if let Some(at) = hit {
            self.text.truncate(at.max(start));
            self.shown = self.text.len();
            return (&self.text[start..], true);
        }
        let held = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.text, s))
            .max()
            .unwrap_or(0);
        self.shown = (self.text.len() - held).max(start);
        (&self.text[start..self.shown], false)
    }

    /// Everything still held back.
    fn flush(&mut self) -> &str {
        let start = self.shown;
        self.shown = self.text.len();
        &self.text[start..]
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str], stops: &[&str]) -> (String, String, bool) {
        let mut out = TextOut::new(stops);
        let mut shown = String::new();
        for p in pieces {
            let (s, hit) = out.push(p);
            shown.push_str(s);
            if hit {
                return (shown, out.text.clone(), true);
            }
        }
        shown.push_str(out.flush());
        (shown, out.text.clone(), false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_shown() {
        let (shown, text, hit) = run(&["Hello", " EN", "D and more"], &["END"]);
        assert!(hit);
        assert_eq!(shown, "Hello ");
        assert_eq!(text, "Hello ");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_complete() {
        let (shown, text, hit) = run(&["ab", "E", "Nx", "y"], &["END"]);
        assert!(!hit);
        assert_eq!(shown, "abENxy");
        assert_eq!(text, "abENxy");
    }

    #[test]
    fn multibyte_stop_strings() {
        let (shown, _, hit) = run(&["a😀", "b"], &["😀b"]);
        assert!(hit);
        assert_eq!(shown, "a");
        assert_eq!(partial_suffix("xx\u{e9}", "\u{e9}t"), 2);
    }

    #[test]
    fn without_stops_everything_shows_at_once() {
        let mut out = TextOut::new(&[]);
        assert_eq!(out.push("abc"), ("abc", false));
    }
}
