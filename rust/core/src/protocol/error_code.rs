//! Error codes carried by [`ErrorMessage`](super::ErrorMessage), and what the receiver does next.
//!
//! On the wire a code is a varint `u16` with the fixed numbers below, not a postcard enum index:
//! a newer peer may send a code this build does not know, and that must still decode (as
//! [`ErrorCode::Unknown`], handled like [`ErrorCode::Internal`]) instead of making the whole
//! `Error` frame malformed.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a request failed. Numbers (in brackets) are stable across protocol versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// \[0\] The server does not speak the `Hello`'s protocol version.
    UnsupportedVersion,
    /// \[1\] Missing or wrong API key.
    Unauthorized,
    /// \[2\] The device's model fingerprint does not match the server's tokenizer/vocabulary.
    VocabularyMismatch,
    /// \[3\] A frame's payload is not a valid message (or has trailing bytes).
    MalformedFrame,
    /// \[4\] A frame's length prefix exceeds the receiver's limit.
    FrameTooLarge,
    /// \[5\] A valid message that is not allowed at this point of the stream.
    UnexpectedMessage,
    /// \[6\] The server lost (or never had) this session's context: send `Resync`.
    NeedResync,
    /// \[7\] `Verify.position` disagrees with the server's context length: send `Resync`.
    PositionMismatch,
    /// \[8\] The context would exceed `Welcome.max_context_tokens`.
    ContextTooLong,
    /// \[9\] Too many concurrent sessions for this key or server; retry `Start` later.
    SessionLimit,
    /// \[10\] Too many requests; retry the same request later.
    RateLimited,
    /// \[11\] A well-formed message with invalid content (bad token id, bad distribution, ...).
    InvalidRequest,
    /// \[12\] The server is draining; reconnect later (possibly elsewhere).
    ShuttingDown,
    /// \[13\] A bug or resource failure on the sender's side.
    Internal,
    /// A code this build does not know, from a newer peer; treated like [`ErrorCode::Internal`].
    Unknown(u16),
}

/// What the receiver of an error does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recovery {
    /// Send `Resync` with the full context on the same session stream.
    Resync,
    /// The request was not applied; send it again after a backoff (or `Close`).
    RetryLater,
    /// This session is over; the connection and other sessions are unaffected.
    EndSession,
    /// The connection is closing; connecting again later may succeed.
    Reconnect,
    /// Retrying cannot help until the configuration changes (version, key, model).
    Fatal,
}

impl ErrorCode {
    /// Every known code, in wire-number order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthorized,
        ErrorCode::VocabularyMismatch,
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnexpectedMessage,
        ErrorCode::NeedResync,
        ErrorCode::PositionMismatch,
        ErrorCode::ContextTooLong,
        ErrorCode::SessionLimit,
        ErrorCode::RateLimited,
        ErrorCode::InvalidRequest,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];

    /// The stable wire number.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::UnsupportedVersion => 0,
            ErrorCode::Unauthorized => 1,
            ErrorCode::VocabularyMismatch => 2,
            ErrorCode::MalformedFrame => 3,
            ErrorCode::FrameTooLarge => 4,
            ErrorCode::UnexpectedMessage => 5,
            ErrorCode::NeedResync => 6,
            ErrorCode::PositionMismatch => 7,
            ErrorCode::ContextTooLong => 8,
            ErrorCode::SessionLimit => 9,
            ErrorCode::RateLimited => 10,
            ErrorCode::InvalidRequest => 11,
            ErrorCode::ShuttingDown => 12,
            ErrorCode::Internal => 13,
            ErrorCode::Unknown(n) => n,
        }
    }

    /// The code for a wire number; numbers this build does not know become `Unknown`.
    pub fn from_u16(n: u16) -> Self {
        Self::ALL
            .get(n as usize)
            .copied()
            .unwrap_or(ErrorCode::Unknown(n))
    }

    /// What the receiver does next (see the table in `docs/PROTOCOL.md`).
    pub fn recovery(self) -> Recovery {
        match self {
            ErrorCode::NeedResync | ErrorCode::PositionMismatch => Recovery::Resync,
            ErrorCode::SessionLimit | ErrorCode::RateLimited => Recovery::RetryLater,
            ErrorCode::MalformedFrame
            | ErrorCode::FrameTooLarge
            | ErrorCode::UnexpectedMessage
            | ErrorCode::ContextTooLong
            | ErrorCode::InvalidRequest
            | ErrorCode::Internal
            | ErrorCode::Unknown(_) => Recovery::EndSession,
            ErrorCode::ShuttingDown => Recovery::Reconnect,
            ErrorCode::UnsupportedVersion
            | ErrorCode::Unauthorized
            | ErrorCode::VocabularyMismatch => Recovery::Fatal,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Unknown(n) => write!(f, "unknown error code {n}"),
            known => write!(f, "{known:?}"),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.to_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u16::deserialize(deserializer).map(ErrorCode::from_u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_numbers_are_stable_and_round_trip() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.to_u16() as usize, i);
            assert_eq!(ErrorCode::from_u16(code.to_u16()), *code);
        }
        assert_eq!(ErrorCode::from_u16(14), ErrorCode::Unknown(14));
        assert_eq!(ErrorCode::Unknown(999).to_u16(), 999);
        assert_eq!(ErrorCode::Unknown(999).recovery(), Recovery::EndSession);
    }

    #[test]
    fn unknown_codes_decode_instead_of_failing() {
        // 300 as a postcard varint u16.
        let code: ErrorCode = postcard::from_bytes(&[0xac, 0x02]).expect("decodes");
        assert_eq!(code, ErrorCode::Unknown(300));
        assert_eq!(postcard::to_allocvec(&code).expect("encodes"), [0xac, 0x02]);
    }
}
