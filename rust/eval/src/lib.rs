//! `uhlm-eval`: the measurements behind the U-HLM and CU-HLM claims, on real models.
//!
//! - [`prompts`]: packaged prompt sets (Debian's fortunes) and JSONL files.
//! - [`pair`]: an SLM/LLM pair and the prompt tokens both see.
//! - [`calibrate`]: (uncertainty, rejection probability) per drafted token, fitted per estimator.
//! - [`paper`]: every system of the papers' comparisons, evaluated exactly, teacher-forced.
//! - [`measured`]: the same systems for real, device and server processes over QUIC through an
//!   emulated link, per link profile.
//! - [`engine_process`]: a llama.cpp `llama-server` child process for measured runs on that engine.
//! - [`plot`]: SVG plots of the results.
//! - [`humaneval`]: the HumanEval task, scored by executing completions against its tests.
//! - [`channel`]: a simulated Rayleigh-fading link for the closed-form throughput estimates.
//! - [`token_cost`]: what one drafted token costs the device beyond the SLM's forward pass.

#![forbid(unsafe_code)]

pub mod calibrate;
pub mod channel;
pub mod engine_process;
mod eval_prompt;
pub mod humaneval;
pub mod measured;
pub mod pair;
pub mod paper;
pub mod plot;
pub mod prompts;
#[cfg(test)]
mod test_support;
pub mod token_cost;

use std::path::PathBuf;

use thiserror::Error;

/// Everything the harness can fail with.
#[derive(Debug, Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] uhlm_model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] uhlm_model::tokenizer::TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] uhlm_model::chat_template::ChatTemplateError),
    #[error(
        "the SLM and LLM have different vocabularies ({slm} vs {llm}); the pair cannot verify drafts"
    )]
    VocabularyMismatch { slm: String, llm: String },
    #[error("{model} has no chat template, but a prompt asks for chat formatting")]
    NoChatTemplate { model: String },
    #[error("prompt corpus {} is missing: {hint}", path.display())]
    MissingCorpus { path: PathBuf, hint: &'static str },
    #[error("bad prompt file {}: {reason}", path.display())]
    BadPrompts { path: PathBuf, reason: String },
    #[error("encoding a frame: {0}")]
    Frame(String),
    #[error("no usable logits at position {0}")]
    NoUsableLogits(usize),
    #[error(transparent)]
    Verify(#[from] uhlm_core::verify::VerifyError),
    #[error(transparent)]
    Threshold(#[from] uhlm_core::threshold::ThresholdError),
    #[error("server for the measured runs: {0}")]
    Server(String),
    #[error("unknown link profile {0:?}; expected good, cell-edge, poor or ideal")]
    UnknownLinkProfile(String),
    #[error(transparent)]
    Link(#[from] uhlm_linkemu::StartError),
    #[error(transparent)]
    Sdk(#[from] uhlm_sdk::SdkError),
    #[error(transparent)]
    HumanEval(#[from] crate::humaneval::HumanEvalError),
    #[error(transparent)]
    RiskControl(#[from] uhlm_core::risk_control::RiskControlError),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("plotting {}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
