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
mod version;

pub use error_code::{ErrorCode, Recovery};
pub use frame::{
    DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_BYTES, FrameDecoder, FrameError,
    LARGE_VOCAB_MAX_FRAME_BYTES, encode_frame, encode_frame_into,
};
pub use message::{
    Acceptance, Cancel, Close, Draft, ErrorMessage, Extend, FinishReason, Finished, Generate,
    Hello, Link, MAX_CHAT_MESSAGES, Message, Prompt, Resync, Start, Started, Tokens, Verdict,
    Verify, Welcome,
};
pub use stream::{ControlPhase, ControlStream, SessionPhase, SessionStream, Side};
pub use version::{ALPN, LEGACY_ALPNS, PROTOCOL_VERSION};
