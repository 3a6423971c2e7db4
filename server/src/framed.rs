//! Framed access to one QUIC stream: whole messages in and out, the idle deadline, the
//! shutdown signal, and the byte counters.

use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use uhlm_core::protocol::{FrameDecoder, FrameError, Message, encode_frame};

use crate::shared::{Shared, shutting_down};

/// How long a finished stream waits for the peer to acknowledge its last frames.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Framed access to one bidirectional stream, counting bytes both ways.
pub(crate) struct Framed {
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    max_frame_bytes: u32,
    shared: Arc<Shared>,
    ended: bool,
}

/// What waiting for the next message produced.
pub(crate) enum Next {
    Message(Message),
    /// The peer finished its side cleanly.
    End,
    /// Bad bytes: answer with the error's code and close the stream.
    Bad(FrameError),
    /// The stream or connection was reset; nothing can be sent.
    Lost,
    Idle,
    Shutdown,
}

impl Framed {
    pub fn new(send: SendStream, recv: RecvStream, shared: Arc<Shared>) -> Self {
        let max = shared.config.max_frame_bytes;
        Self {
            send,
            recv,
            decoder: FrameDecoder::new(max),
            buf: vec![0; 64 * 1024],
            max_frame_bytes: max,
            shared,
            ended: false,
        }
    }

    /// The next message. Frames already received are returned even while shutting down, so a
    /// request that reached the server before the shutdown is still answered.
    pub async fn next(&mut self, stop_on_shutdown: bool) -> Next {
        let mut shutdown = self.shared.shutdown.clone();
        // The whole next message must arrive within the idle timeout: a deadline, not a timer
        // that each byte restarts (a peer trickling a byte every few seconds held a session
        // slot forever).
        let deadline = tokio::time::Instant::now() + self.shared.config.idle_timeout;
        loop {
            match self.decoder.next_frame() {
                Ok(Some(msg)) => return Next::Message(msg),
                Ok(None) => {}
                Err(e) => return Next::Bad(e),
            }
            if self.ended {
                return match self.decoder.finish() {
                    Ok(()) => Next::End,
                    Err(e) => Next::Bad(e),
                };
            }
            // A request already partly received is in flight too: read the rest of it.
            let may_stop = stop_on_shutdown && self.decoder.is_empty();
            if may_stop && *shutdown.borrow() {
                return Next::Shutdown;
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.recv.read(&mut self.buf)) => r,
                _ = shutting_down(&mut shutdown), if may_stop => return Next::Shutdown,
            };
            match read {
                Err(_) => return Next::Idle,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "stream read failed");
                    return Next::Lost;
                }
                Ok(Ok(None)) => self.ended = true,
                Ok(Ok(Some(n))) => {
                    self.shared.metrics.uplink_bytes.inc_by(n as u64);
                    self.decoder.push(&self.buf[..n]);
                }
            }
        }
    }

    /// Writes one message; `false` if the stream is gone.
    pub async fn send(&mut self, msg: &Message) -> bool {
        if let Message::Error(e) = msg {
            self.shared.metrics.error(e.code);
        }
        let frame = match encode_frame(msg, self.max_frame_bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, kind = msg.kind(), "cannot encode a reply");
                return false;
            }
        };
        match self.send.write_all(&frame).await {
            Ok(()) => {
                self.shared
                    .metrics
                    .downlink_bytes
                    .inc_by(frame.len() as u64);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream write failed");
                false
            }
        }
    }

    /// Completes when the peer stops reading (it reset the stream or lost the connection).
    pub async fn peer_stopped(&mut self) {
        let _ = self.send.stopped().await;
    }

    /// Finishes our side, stops reading, and waits (bounded) until the peer has our frames, so
    /// a connection closed right after still delivers them.
    pub async fn finish(mut self) {
        let _ = self.recv.stop(0u32.into());
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.send.stopped()).await;
        }
    }
}
