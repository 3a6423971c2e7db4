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
//!
//! The seam's types are in `seam.rs`; this file names the remote engines and checks one before
//! and while devices use it ([`RemoteKind`], [`check_engine`], [`EngineProbe`]).

use std::sync::Arc;
use std::time::Duration;

use uhlm_core::protocol::{ErrorCode, ErrorMessage};
use uhlm_model::ModelCard;

mod embedded;
mod llama_server;
mod remote;
mod seam;
mod vllm;

pub(crate) use seam::{Engine, EngineSession, ScoreItem, Target, Wanted};
pub use seam::{EngineCheck, EngineError};

pub(crate) use embedded::Embedded;
pub(crate) use llama_server::LlamaServer;
pub(crate) use vllm::Vllm;

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
