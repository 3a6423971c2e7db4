//! The SDK's one error type. Every variant is a failure a user can act on, with a message that
//! says what to do; the FFI mirrors the variants one to one, so fields are plain owned strings.

use uhlm_core::protocol::{ErrorCode, ErrorMessage};
use uhlm_model::ModelError;

/// Why an engine could not be built or a generation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SdkError {
    /// The on-device model file does not exist.
    #[error("on-device model not found: {path}")]
    ModelNotFound { path: String },
    /// The on-device model file is not a usable GGUF (truncated, unsupported architecture, ...).
    #[error("on-device model {path} is unusable: {reason}")]
    CorruptModel { path: String, reason: String },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The server refused the API key.
    #[error("the server rejected the API key: {0}")]
    Unauthorized(String),
    /// The server presented a certificate whose SHA-256 is not the pinned one: a different
    /// server, a regenerated certificate, or an interception attempt.
    #[error(
        "the server's certificate does not match the pinned fingerprint: expected {expected}, \
         got {actual}; check --pin against the fingerprint the server printed"
    )]
    CertificateMismatch { expected: String, actual: String },
    /// The TLS handshake failed for another reason (untrusted certificate, wrong ALPN, ...).
    #[error("TLS handshake with the server failed: {0}")]
    Tls(String),
    /// The on-device model tokenizes differently from the server's model, so its drafts would be
    /// meaningless there.
    #[error(
        "the on-device model's vocabulary does not match the server's model ({0}); use a draft \
         model derived from the server's model"
    )]
    VocabularyMismatch(String),
    /// The server speaks another protocol version.
    #[error("the server speaks another protocol version: {0}")]
    UnsupportedVersion(String),
    /// The server could not be reached (hybrid modes fall back to local generation instead;
    /// this surfaces only where a connection is required, e.g. `Mode::Llm` with no SLM fallback).
    #[error("cannot reach the server at {addr}: {reason}")]
    ServerUnreachable { addr: String, reason: String },
    /// The server sent something the protocol does not allow, or reported an error the engine
    /// cannot recover from.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The generation was cancelled through its [`CancelToken`](crate::CancelToken).
    #[error("generation cancelled")]
    Cancelled,
    /// The on-device model failed while running (context overflow, invalid token, ...).
    #[error("on-device model failed: {0}")]
    Model(String),
}

impl SdkError {
    /// Whether retrying the connection can help: `false` for errors that need a configuration
    /// change (key, pin, model, version).
    pub fn is_fatal_for_connection(&self) -> bool {
        matches!(
            self,
            SdkError::Unauthorized(_)
                | SdkError::CertificateMismatch { .. }
                | SdkError::Tls(_)
                | SdkError::VocabularyMismatch(_)
                | SdkError::UnsupportedVersion(_)
                | SdkError::InvalidConfig(_)
        )
    }

    /// The error for a server `Error` frame on the control stream or a session.
    pub(crate) fn from_server(e: &ErrorMessage) -> Self {
        let msg = e.message.clone();
        match e.code {
            ErrorCode::Unauthorized => SdkError::Unauthorized(msg),
            ErrorCode::VocabularyMismatch => SdkError::VocabularyMismatch(msg),
            ErrorCode::UnsupportedVersion => SdkError::UnsupportedVersion(msg),
            code => SdkError::Protocol(format!("server error {code}: {msg}")),
        }
    }
}

impl From<ModelError> for SdkError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::ModelNotFound { path } => SdkError::ModelNotFound {
                path: path.display().to_string(),
            },
            ModelError::CorruptModel { path, reason } => SdkError::CorruptModel {
                path: path.display().to_string(),
                reason,
            },
            ModelError::UnsupportedArchitecture { path, arch } => SdkError::CorruptModel {
                path: path.display().to_string(),
                reason: format!("unsupported architecture {arch:?}"),
            },
            other => SdkError::Model(other.to_string()),
        }
    }
}
