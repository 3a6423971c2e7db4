//! Frames: a 4-byte big-endian payload length, then the postcard-encoded [`Message`].
//!
//! [`FrameDecoder`] is incremental and does no I/O: the transport pushes whatever bytes a read
//! returned and pulls complete messages out. It checks the length prefix against the limit as
//! soon as the 4 prefix bytes arrive, so a hostile peer cannot make it buffer an oversized body.
//! Decoding never panics, and a frame of `n` bytes can only make postcard allocate in proportion
//! to `n`: every length inside the payload is checked against the bytes actually left (see the
//! allocation test in `tests/protocol_alloc.rs`).

use postcard::ser_flavors::Flavor;
use thiserror::Error;

use super::{ErrorCode, Message};

/// Frame limit used until `Welcome` says otherwise, and the server's default (1 MiB).
///
/// Every codec fits for SmolLM2-sized vocabularies (dense f32: 196 KiB). The dense-f32 baseline
/// over a 262 144-token vocabulary (Gemma 3) is 1 MiB of values plus a header: a server hosting
/// such a model and serving that baseline raises its limit ([`LARGE_VOCAB_MAX_FRAME_BYTES`]).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1 << 20;

/// A frame limit that fits a dense-f32 distribution over 262 144 tokens with room to spare.
pub const LARGE_VOCAB_MAX_FRAME_BYTES: u32 = 1 << 21;

/// Bytes of the length prefix in front of every payload.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why bytes could not be turned into a message, or a message into a frame.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The payload length exceeds the limit. When decoding, the stream can no longer be framed.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: u32 },
    /// The payload is not exactly one valid message. The next frame can still be decoded.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame: `have` bytes of the `need` bytes it announced (4 when
    /// the length prefix itself is incomplete).
    #[error("stream ended inside a frame ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    /// Postcard could not serialise the message (not expected with these types).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl FrameError {
    /// The code to send back to the peer whose bytes caused this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) | FrameError::Truncated { .. } => ErrorCode::MalformedFrame,
            FrameError::Encode(_) => ErrorCode::Internal,
        }
    }
}

/// Encodes `msg` as one frame.
pub fn encode_frame(msg: &Message, max_frame_bytes: u32) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame_into(msg, max_frame_bytes, &mut out)?;
    Ok(out)
}

/// Appends one frame carrying `msg` to `out` and returns its length (prefix included).
///
/// A payload longer than `max_frame_bytes` is refused and `out` is left as it was.
pub fn encode_frame_into(
    msg: &Message,
    max_frame_bytes: u32,
    out: &mut Vec<u8>,
) -> Result<usize, FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    if let Err(e) = postcard::serialize_with_flavor(msg, Append(out)) {
        out.truncate(start);
        return Err(FrameError::Encode(e.to_string()));
    }
    let len = out.len() - start - FRAME_HEADER_BYTES;
    match u32::try_from(len) {
        Ok(len32) if len32 <= max_frame_bytes => {
            out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&len32.to_be_bytes());
            Ok(out.len() - start)
        }
        _ => {
            out.truncate(start);
            Err(FrameError::TooLarge {
                len,
                max: max_frame_bytes,
            })
        }
    }
}

/// Decodes one frame's payload (without its length prefix); it must hold exactly one message.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    let (msg, rest) = postcard::take_from_bytes::<Message>(payload)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after a {} message",
            rest.len(),
            msg.kind()
        )));
    }
    Ok(msg)
}

/// Postcard output that appends to a borrowed `Vec`, so frames can share one buffer.
struct Append<'a>(&'a mut Vec<u8>);

impl Flavor for Append<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Incremental frame decoder for one stream direction.
///
/// Push every chunk read from the stream, then call [`next_frame`](Self::next_frame) until it
/// returns `Ok(None)`; the buffer then never holds more than one partial frame plus the last
/// chunk. At the end of the stream, [`finish`](Self::finish) tells a clean end from a cut frame.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame_bytes: u32,
    buf: Vec<u8>,
    /// Start of the first unconsumed byte in `buf`.
    start: usize,
    /// Set by an oversized length prefix: the stream cannot be framed any more.
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: u32) -> Self {
        Self {
            max_frame_bytes,
            buf: Vec::new(),
            start: 0,
            failed: None,
        }
    }

    /// The payload limit this decoder enforces.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// Changes the limit, e.g. after `Welcome` announced the server's.
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u32) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Buffers bytes read from the stream. Ignored once the stream has failed with `TooLarge`.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// `Malformed` consumes the bad frame and decoding can continue; `TooLarge` is returned
    /// again by every later call, because the frame boundaries are lost.
    pub fn next_frame(&mut self) -> Result<Option<Message>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        let Some(prefix) = avail.first_chunk::<FRAME_HEADER_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len > self.max_frame_bytes {
            let e = FrameError::TooLarge {
                len: len as usize,
                max: self.max_frame_bytes,
            };
            self.failed = Some(e.clone());
            self.buf = Vec::new();
            self.start = 0;
            return Err(e);
        }
        let end = FRAME_HEADER_BYTES + len as usize;
        if avail.len() < end {
            return Ok(None);
        }
        let result = decode_payload(&avail[FRAME_HEADER_BYTES..end]);
        self.consume(end);
        result.map(Some)
    }

    /// Whether no bytes of an unfinished frame are buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Bytes buffered and not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Call when the stream has ended: `Truncated` if it ended inside a frame, the sticky
    /// `TooLarge` if framing had failed. Complete frames still buffered are not an error here;
    /// drain them with `next_frame` first.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        if avail.is_empty() {
            return Ok(());
        }
        let need = match avail.first_chunk::<FRAME_HEADER_BYTES>() {
            None => FRAME_HEADER_BYTES,
            Some(prefix) => FRAME_HEADER_BYTES + u32::from_be_bytes(*prefix) as usize,
        };
        if avail.len() >= need {
            return Ok(());
        }
        Err(FrameError::Truncated {
            have: avail.len(),
            need,
        })
    }

    /// Drops `n` decoded bytes, moving the rest to the front once it is cheap to do so.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}
