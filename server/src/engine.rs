//! The engine seam: what runs the LLM's forward passes for the workers.
//!
//! Everything uhlm adds on the server (QUIC and TLS, keys, sessions and their limits, the
//! protocol, the exact verification against the distribution the phone drafted from) lives
//! above this seam and stays the same whichever engine is below it. An engine only scores
//! rows: it appends a session's new tokens to that session's context and reports the LLM's
//! distribution at the positions asked for ([`Target`]): all its logits, or what a sampling
//! engine answers cheaply (its top candidates' probabilities and its own draws), which
//! `uhlm_core::verify_partial` verifies exactly. [`Embedded`] is uhlm's own candle runtime,
//! in process; [`LlamaServer`] delegates to llama.cpp's `llama-server` and [`Vllm`] to vLLM,
//! both over HTTP, where the session's KV stays in the engine's prompt cache.

use std::sync::Arc;
use std::time::Duration;

use uhlm_core::protocol::{ErrorCode, ErrorMessage};
use uhlm_core::sampling::SamplingOptions;
use uhlm_core::verify_partial::PartialTarget;
use uhlm_model::{ModelCard, ModelError, PassCost};

mod embedded;
mod llama_server;
mod remote;
mod vllm;

pub(crate) use embedded::Embedded;
pub(crate) use llama_server::LlamaServer;
pub(crate) use vllm::Vllm;

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

/// An engine behind HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteKind {
    /// llama.cpp's `llama-server`.
    LlamaServer,
    /// vLLM's OpenAI-compatible server (`vllm serve`).
    Vllm,
}

impl RemoteKind {
    /// The name `--engine` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::LlamaServer => "llama-server",
            Self::Vllm => "vllm",
        }
    }
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

/// Checks that the `kind` engine at `url` serves `card`'s vocabulary and answers what
/// verification needs (see [`LlamaServer`] and [`Vllm`]). A mismatch is
/// [`EngineError::Vocabulary`]; an engine that cannot be asked is [`EngineError::Remote`].
pub fn check_engine(
    kind: RemoteKind,
    url: &str,
    card: &ModelCard,
    timeout: Duration,
) -> Result<EngineCheck, EngineError> {
    match kind {
        RemoteKind::LlamaServer => llama_server::check_llama_server(url, card, timeout),
        RemoteKind::Vllm => vllm::check_vllm(url, card, timeout, vllm::Depth::Full),
    }
}

/// The start-up check run again as each device connects (for vLLM, its cheap part: the model
/// it serves and the probe text's ids), so that an engine restarted on another model is
/// caught before a device drafts against it.
#[derive(Clone)]
pub(crate) struct EngineProbe {
    pub kind: RemoteKind,
    pub url: String,
    pub card: Arc<ModelCard>,
    pub timeout: Duration,
}

impl EngineProbe {
    /// The check's outcome as the `Error` a device gets: `VocabularyMismatch` for another
    /// vocabulary, `Internal` for an engine that cannot be asked.
    pub async fn check(&self) -> Result<(), ErrorMessage> {
        let probe = self.clone();
        let checked = tokio::task::spawn_blocking(move || match probe.kind {
            RemoteKind::LlamaServer => {
                llama_server::check_llama_server(&probe.url, &probe.card, probe.timeout)
            }
            RemoteKind::Vllm => {
                vllm::check_vllm(&probe.url, &probe.card, probe.timeout, vllm::Depth::Quick)
            }
        })
        .await;
        match checked {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e @ EngineError::Vocabulary { .. })) => Err(ErrorMessage::new(
                ErrorCode::VocabularyMismatch,
                e.to_string(),
            )),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "inference engine check failed");
                Err(ErrorMessage::new(
                    ErrorCode::Internal,
                    "the server's inference engine is unavailable",
                ))
            }
            Err(_) => Err(ErrorMessage::new(
                ErrorCode::Internal,
                "the inference engine check failed",
            )),
        }
    }
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
