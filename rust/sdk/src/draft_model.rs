//! [`DraftModel`]: what the drafter asks of the on-device model, so that the model can be a
//! session of the GGUF the engine loaded (the default), another runtime an app brings for the
//! same vocabulary, or a load generator's stand-in that costs no model work.

use uhlm_model::Session;

use crate::error::SdkError;

/// Incremental scoring of one context: the only model work the drafter does.
///
/// Every logits vector must have the vocabulary size of the engine's model (the tokenizer and
/// the fingerprint sent to the server come from that model); the drafter checks it.
pub trait DraftModel: Send {
    /// Most tokens the context can hold.
    fn context_length(&self) -> usize;
    /// The tokens in the context, oldest first.
    fn tokens(&self) -> &[u32];
    /// Keeps the first `n` tokens (drafts after a rejected one, a prompt's changed suffix).
    fn truncate(&mut self, n: usize);
    /// Appends `tokens`; returns the logits that predict the token after the last of them.
    fn score_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SdkError>;
    /// Appends one token; returns the logits for the next.
    fn step(&mut self, token: u32) -> Result<Vec<f32>, SdkError> {
        self.score_last(&[token])
    }
}

impl DraftModel for Session {
    fn context_length(&self) -> usize {
        Session::context_length(self)
    }

    fn tokens(&self) -> &[u32] {
        Session::tokens(self)
    }

    fn truncate(&mut self, n: usize) {
        Session::truncate(self, n);
    }

    fn score_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SdkError> {
        Ok(Session::score_last(self, tokens)?)
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, SdkError> {
        Ok(Session::step(self, token)?)
    }
}
