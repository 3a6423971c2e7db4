//! The engine seam: what runs the LLM's forward passes for the workers.
//!
//! Everything uhlm adds on the server (QUIC and TLS, keys, sessions and their limits, the
//! protocol, the exact verification against the distribution the phone drafted from) lives
//! above this seam and stays the same whichever engine is below it. An engine only scores
//! rows: it appends a session's new tokens to that session's context and returns the LLM's
//! logits at the positions asked for. [`Embedded`] is uhlm's own candle runtime, in process;
//! [`LlamaServer`] delegates to llama.cpp's `llama-server` over HTTP, where the session's KV
//! stays in the engine's prompt cache.

use uhlm_model::ModelError;

mod embedded;
mod llama_server;

pub(crate) use embedded::Embedded;
pub use llama_server::{EngineCheck, check_llama_server};
pub(crate) use llama_server::{EngineProbe, LlamaServer};

/// Why an engine could not score a batch.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The in-process model failed (a bad token, a full context, a kernel error).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The remote engine is down, too slow, or answered something that is not what its API
    /// promises. The request fails; the device goes on alone and retries later.
    #[error("the inference engine at {url} failed: {reason}")]
    Remote { url: String, reason: String },
    /// The remote engine serves another vocabulary than the server's model.
    #[error("the inference engine at {url} serves another vocabulary: {reason}")]
    Vocabulary { url: String, reason: String },
}

/// Which rows of a scored item the caller needs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wanted<'a> {
    /// None: the tokens only enter the context (catching up on a prompt).
    Nothing,
    /// The last new token's.
    Last,
    /// These positions of the new tokens, in order (a chain's rows).
    Rows(&'a [usize]),
}

/// One session's part of a pass.
pub(crate) struct ScoreItem<'a, S> {
    pub session: &'a mut S,
    pub tokens: &'a [u32],
    pub wanted: Wanted<'a>,
}

/// A session's state in its engine: the tokens its context holds there.
pub(crate) trait EngineSession: Send {
    /// Tokens in the context.
    fn len(&self) -> usize;
    /// Drops every token from `len` on (a rejected chain's tail).
    fn truncate(&mut self, len: usize);
    /// Starts over with an empty context (a resync).
    fn reset(&mut self);
    /// Bytes of this server's memory the context holds (an engine's own memory is its own).
    fn kv_cache_bytes(&self) -> usize;
}

/// Runs the LLM's forward passes.
pub(crate) trait Engine: Send + Sync + 'static {
    type Session: EngineSession;

    /// Width of the logits: valid token ids are `0..vocab_size`.
    fn vocab_size(&self) -> usize;

    /// A session with an empty context.
    fn session(&self) -> Self::Session;

    /// Appends each item's tokens to its session and returns, per item in order, its wanted
    /// rows of logits, row-major (empty for [`Wanted::Nothing`]). On error no session changed.
    fn score(
        &self,
        items: &mut [ScoreItem<'_, Self::Session>],
    ) -> Result<Vec<Vec<f32>>, EngineError>;
}
