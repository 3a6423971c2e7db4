//! The seam itself: what the workers ask of an engine ([`Engine`], its [`EngineSession`]s and
//! the [`ScoreItem`]s of a pass), what it answers ([`Target`]), how it fails
//! ([`EngineError`]), and what a remote engine's start-up check learns ([`EngineCheck`]).

use uhlm_core::sampling::SamplingOptions;
use uhlm_core::verify_partial::PartialTarget;
use uhlm_model::{ModelError, PassCost};

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
    /// The engine cannot do what was asked of it.
    #[error("the {engine} engine cannot {what}")]
    Unsupported {
        engine: &'static str,
        what: &'static str,
    },
    /// The remote engine serves another vocabulary than the server's model.
    #[error("the inference engine at {url} serves another vocabulary: {reason}")]
    Vocabulary { url: String, reason: String },
}

/// What the start-up check learned about a remote engine.
#[derive(Clone, Debug)]
pub struct EngineCheck {
    /// Width of the engine's logits.
    pub n_vocab: usize,
    /// Sequences the engine runs at once, where it says (llama-server's `--parallel`).
    pub slots: Option<usize>,
    /// The model the engine serves, as it names it (llama-server: its file; vLLM: the name
    /// requests give).
    pub model: String,
    /// The engine reports its probability at tokens it is asked about, after the session's
    /// sampling (vLLM's `logprob_token_ids` with processed log-probabilities): a draft is
    /// verified without the whole vocabulary.
    pub asks_tokens: bool,
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

/// The LLM's distribution at one position, as the engine reports it.
#[derive(Debug)]
pub(crate) enum Target {
    /// Its logits over the whole vocabulary.
    Logits(Vec<f32>),
    /// The session's sampling applied by the engine: exact probabilities of its top tokens and
    /// its own draws (see `uhlm_core::verify_partial`).
    Partial(PartialTarget),
}

/// One session's part of a pass.
pub(crate) struct ScoreItem<'a, S> {
    pub session: &'a mut S,
    pub tokens: &'a [u32],
    pub wanted: Wanted<'a>,
    /// The session's sampling, for engines that sample.
    pub sampling: &'a SamplingOptions,
    /// Per wanted row, the seed of an engine's own draw there.
    pub seeds: &'a [u32],
    /// Per wanted row, the token the device drafted there (`None` or missing: none), whose
    /// probability an engine that is asked about tokens reports.
    pub drafts: &'a [Option<u32>],
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
    /// Bytes of this server's memory a pass allocates to append `more` tokens to the context
    /// (a cache that grows holds its old and new buffers at once).
    fn growth_bytes(&self, more: usize) -> usize {
        let _ = more;
        0
    }
}

/// Runs the LLM's forward passes.
pub(crate) trait Engine: Send + Sync + 'static {
    type Session: EngineSession;

    /// Width of the logits: valid token ids are `0..vocab_size`.
    fn vocab_size(&self) -> usize;

    /// A session with an empty context.
    fn session(&self) -> Self::Session;

    /// What a pass allocates in this server's memory beyond the sessions' caches, counted
    /// against the KV budget. Nothing for an engine whose passes run in its own process.
    fn pass_cost(&self) -> PassCost {
        PassCost {
            bytes_per_token: 0,
            bytes_per_output: 0,
        }
    }

    /// Appends each item's tokens to its session and returns, per item in order, a target per
    /// wanted row (none for [`Wanted::Nothing`]). On error no session changed.
    fn score(
        &self,
        items: &mut [ScoreItem<'_, Self::Session>],
    ) -> Result<Vec<Vec<Target>>, EngineError>;

    /// The LLM's logits after the first `len` tokens of `session`'s context, for a
    /// [`Target::Partial`] that did not suffice.
    fn logits_at(&self, session: &Self::Session, len: usize) -> Result<Vec<f32>, EngineError>;

    /// More of the engine's own draws after the first `len` tokens of `session`'s context,
    /// each with its probability, under `sampling` from `seed`.
    fn draws_at(
        &self,
        session: &Self::Session,
        len: usize,
        sampling: &SamplingOptions,
        seed: u32,
    ) -> Result<Vec<(u32, f32)>, EngineError>;
}
