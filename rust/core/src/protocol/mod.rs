//! The wire protocol between a device and a uhlm server: messages, framing and the legal order of
//! messages on each stream. No sockets here: the transport (QUIC, ALPN [`ALPN`], TLS 1.3) lives at
//! the edges and feeds bytes in and out, like `quinn` drives `quinn-proto`.
//!
//! `docs/PROTOCOL.md` is the normative description for other-language clients; the golden
//! vectors in `tests/it/protocol_golden.rs` pin the bytes it prints.
//!
//! - [`message`]: every message, serialised with postcard.
//! - [`error_code`]: the error codes and what a client does for each.
//! - [`frame`]: length-prefixed frames, [`encode_frame`] and the incremental [`FrameDecoder`].
//! - [`stream`]: which message may come next on the control stream and on a session stream.

pub mod error_code;
pub mod frame;
pub mod message;
pub mod stream;

pub use error_code::{ErrorCode, Recovery};
pub use frame::{FRAME_HEADER_BYTES, FrameDecoder, FrameError, encode_frame, encode_frame_into};
pub use message::{
    Acceptance, Cancel, Close, Draft, ErrorMessage, Extend, FinishReason, Finished, Generate,
    Hello, Link, MAX_CHAT_MESSAGES, Message, Prompt, Resync, Start, Started, Tokens, Verdict,
    Verify, Welcome,
};
pub use stream::{ControlPhase, ControlStream, SessionPhase, SessionStream, Side};

/// Version of this protocol; a server refuses a `Hello` with any other version.
pub const PROTOCOL_VERSION: u16 = 5;

/// TLS application-layer protocol name negotiated on every QUIC connection.
pub const ALPN: &[u8] = b"uhlm/5";

/// ALPN names a server also accepts so that clients of older versions reach `Hello` and are
/// told `UnsupportedVersion` instead of failing the TLS handshake without a reason.
pub const LEGACY_ALPNS: &[&[u8]] = &[b"uhlm/1", b"uhlm/2", b"uhlm/3", b"uhlm/4"];

/// Frame limit used until `Welcome` says otherwise, and the server's default (1 MiB).
///
/// Every codec fits for SmolLM2-sized vocabularies (dense f32: 196 KiB). The dense-f32 baseline
/// over a 262 144-token vocabulary (Gemma 3) is 1 MiB of values plus a header: a server hosting
/// such a model and serving that baseline raises its limit ([`LARGE_VOCAB_MAX_FRAME_BYTES`]).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1 << 20;

/// A frame limit that fits a dense-f32 distribution over 262 144 tokens with room to spare.
pub const LARGE_VOCAB_MAX_FRAME_BYTES: u32 = 1 << 21;
