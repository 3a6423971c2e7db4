//! The one error type foreign code sees: the SDK's [`SdkError`] variant for variant, plus what
//! only the FFI can hit (an embedded server failing, default models missing, a feature left
//! out of this build).

use uhlm_sdk::SdkError;

/// Why a call failed. Kotlin and Python get an exception class per variant, Swift an enum
/// case, each with the variant's fields; `toString()` (Kotlin), `str()` (Python) and
/// `description` (Swift) give the Rust text, the same words the CLI prints: the SDK's variants
/// are written by [`SdkError`]'s `Display`, the one place their words live.
#[derive(Debug, Clone, PartialEq, thiserror::Error, uniffi::Error)]
#[uniffi::export(Display)]
pub enum UhlmError {
    #[error("{}", sdk_text(self))]
    ModelNotFound { path: String },
    #[error("{}", sdk_text(self))]
    CorruptModel { path: String, reason: String },
    #[error("{}", sdk_text(self))]
    InvalidConfig { reason: String },
    #[error("{}", sdk_text(self))]
    Unauthorized { reason: String },
    #[error("{}", sdk_text(self))]
    CertificateMismatch { expected: String, actual: String },
    #[error("{}", sdk_text(self))]
    Tls { reason: String },
    #[error("{}", sdk_text(self))]
    VocabularyMismatch { reason: String },
    #[error("{}", sdk_text(self))]
    UnsupportedVersion { reason: String },
    #[error("{}", sdk_text(self))]
    ServerUnreachable { addr: String, reason: String },
    #[error("{}", sdk_text(self))]
    Protocol { reason: String },
    #[error("{}", sdk_text(self))]
    Cancelled,
    #[error("{}", sdk_text(self))]
    Model { reason: String },
    /// The [`EmbeddedServer`](crate::EmbeddedServer) could not start (bad model, no port, ...).
    #[error("the embedded server failed: {reason}")]
    Server { reason: String },
    /// This build of the library leaves the feature out (phone builds have no embedded
    /// server and no model cache).
    #[error("not in this build of uhlm: {reason}")]
    Unsupported { reason: String },
}

/// The SDK's words for one of its own errors, mirrored here field for field.
fn sdk_text(e: &UhlmError) -> String {
    let sdk = match e.clone() {
        UhlmError::ModelNotFound { path } => SdkError::ModelNotFound { path },
        UhlmError::CorruptModel { path, reason } => SdkError::CorruptModel { path, reason },
        UhlmError::InvalidConfig { reason } => SdkError::InvalidConfig(reason),
        UhlmError::Unauthorized { reason } => SdkError::Unauthorized(reason),
        UhlmError::CertificateMismatch { expected, actual } => {
            SdkError::CertificateMismatch { expected, actual }
        }
        UhlmError::Tls { reason } => SdkError::Tls(reason),
        UhlmError::VocabularyMismatch { reason } => SdkError::VocabularyMismatch(reason),
        UhlmError::UnsupportedVersion { reason } => SdkError::UnsupportedVersion(reason),
        UhlmError::ServerUnreachable { addr, reason } => {
            SdkError::ServerUnreachable { addr, reason }
        }
        UhlmError::Protocol { reason } => SdkError::Protocol(reason),
        UhlmError::Cancelled => SdkError::Cancelled,
        UhlmError::Model { reason } => SdkError::Model(reason),
        UhlmError::Server { .. } | UhlmError::Unsupported { .. } => {
            unreachable!("written by their own #[error]")
        }
    };
    sdk.to_string()
}

impl UhlmError {
    /// `what` is left out of this build of the library (no `desktop` feature, as for phones).
    #[cfg(not(feature = "desktop"))]
    pub(crate) fn not_in_phone_build(what: &str) -> Self {
        Self::Unsupported {
            reason: format!(
                "{what} (this library was built without the `desktop` feature, as for phones)"
            ),
        }
    }
}

/// The Rust text of `error`. Kotlin and Swift get it from the exported `Display`; uniffi's
/// Python exceptions print their fields instead, so the Python package installs this as
/// `UhlmError.__str__`.
#[uniffi::export]
pub fn describe_error(error: UhlmError) -> String {
    error.to_string()
}

impl From<SdkError> for UhlmError {
    fn from(e: SdkError) -> Self {
        match e {
            SdkError::ModelNotFound { path } => Self::ModelNotFound { path },
            SdkError::CorruptModel { path, reason } => Self::CorruptModel { path, reason },
            SdkError::InvalidConfig(reason) => Self::InvalidConfig { reason },
            SdkError::Unauthorized(reason) => Self::Unauthorized { reason },
            SdkError::CertificateMismatch { expected, actual } => {
                Self::CertificateMismatch { expected, actual }
            }
            SdkError::Tls(reason) => Self::Tls { reason },
            SdkError::VocabularyMismatch(reason) => Self::VocabularyMismatch { reason },
            SdkError::UnsupportedVersion(reason) => Self::UnsupportedVersion { reason },
            SdkError::ServerUnreachable { addr, reason } => {
                Self::ServerUnreachable { addr, reason }
            }
            SdkError::Protocol(reason) => Self::Protocol { reason },
            SdkError::Cancelled => Self::Cancelled,
            SdkError::Model(reason) => Self::Model { reason },
        }
    }
}

impl From<uhlm_model::ModelError> for UhlmError {
    fn from(e: uhlm_model::ModelError) -> Self {
        SdkError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FFI text is the SDK's text, so apps and the CLI say the same thing.
    #[test]
    fn messages_match_the_sdk() {
        let cases = [
            SdkError::ModelNotFound {
                path: "/m.gguf".into(),
            },
            SdkError::CorruptModel {
                path: "/m".into(),
                reason: "truncated".into(),
            },
            SdkError::InvalidConfig("x".into()),
            SdkError::Unauthorized("bad key".into()),
            SdkError::Tls("alpn".into()),
            SdkError::VocabularyMismatch("fp".into()),
            SdkError::UnsupportedVersion("2".into()),
            SdkError::ServerUnreachable {
                addr: "a:1".into(),
                reason: "timeout".into(),
            },
            SdkError::Protocol("p".into()),
            SdkError::Cancelled,
            SdkError::Model("m".into()),
            SdkError::CertificateMismatch {
                expected: "aa".into(),
                actual: "bb".into(),
            },
        ];
        for e in cases {
            assert_eq!(UhlmError::from(e.clone()).to_string(), e.to_string());
        }
    }
}
