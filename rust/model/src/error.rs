//! The one error type of the runtime. Every variant names the file or the input at fault, so a
//! user can act on the message without a debugger.

use std::path::PathBuf;

/// What went wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file does not exist.
    #[error("model file not found: {}", path.display())]
    ModelNotFound { path: PathBuf },
    /// The file is not a usable GGUF: truncated, malformed, or missing a tensor or metadata key.
    #[error("corrupt model file {}: {reason}", path.display())]
    CorruptModel { path: PathBuf, reason: String },
    /// The GGUF declares an architecture this runtime does not implement.
    #[error("unsupported architecture {arch:?} in {}", path.display())]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// Scoring was asked for zero tokens.
    #[error("empty prompt: at least one token is required")]
    EmptyPrompt,
    /// A batched forward pass was given sessions of different models.
    #[error("a batch must hold sessions of one model")]
    MixedBatch,
    /// The session would grow past the model's context window.
    #[error("context overflow: {len} tokens exceed the model's context of {max}")]
    ContextOverflow { len: usize, max: usize },
    /// Logits were asked for a position the scored chunk does not have.
    #[error("no row {row}: the chunk has {rows} new tokens")]
    NoSuchRow { row: usize, rows: usize },
    /// A token id outside the model's vocabulary.
    #[error("invalid token id {id}: the vocabulary has {vocab} entries")]
    InvalidToken { id: u32, vocab: usize },
    /// Caller-supplied options are inconsistent (e.g. a draft keeping a block that does not
    /// exist).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The requested device is not available in this build or on this machine.
    #[error("device unavailable: {0}")]
    Device(String),
    /// Building or using the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ModelError {
    pub(crate) fn corrupt(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Self::CorruptModel {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
