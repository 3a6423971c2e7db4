//! A generation's link to its server session: what the loop holds (connection, stream, state
//! machine) and how it waits for the session's next message (within a deadline, unless
//! cancelled).

use std::sync::Arc;
use std::time::{Duration, Instant};

use uhlm_core::protocol::{Message, SessionStream};

use crate::cancel::CancelToken;
use crate::error::SdkError;
use crate::transport::{ClientConn, FramedStream, LinkError};

/// The server session of a generation.
pub(super) struct SessionLink {
    pub(super) conn: Arc<ClientConn>,
    pub(super) stream: FramedStream,
    pub(super) state: SessionStream,
    /// Context tokens the server has been given but not scored yet (a new or resynced
    /// context); the next answer waits for them.
    pub(super) unscored: usize,
}

/// Why a network wait ended early.
pub(super) enum Wait {
    Link(LinkError),
    Cancelled,
    Fatal(SdkError),
}

impl From<LinkError> for Wait {
    fn from(e: LinkError) -> Self {
        Wait::Link(e)
    }
}

/// Receives one message, giving up at `deadline` (link down) or on cancellation.
pub(super) async fn recv_until(
    stream: &mut FramedStream,
    downlink: &mut u64,
    deadline: Instant,
    cancel: &CancelToken,
) -> Result<Message, Wait> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    recv_within(stream, downlink, timeout, cancel).await
}

/// Receives one message, giving up on timeout (link down) or cancellation.
pub(super) async fn recv_within(
    stream: &mut FramedStream,
    downlink: &mut u64,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<Message, Wait> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Wait::Cancelled),
        r = tokio::time::timeout(timeout, stream.recv(downlink)) => match r {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(Wait::Link(e)),
            Err(_) => Err(Wait::Link(LinkError::Down(format!(
                "no answer within {} ms",
                timeout.as_millis()
            )))),
        },
    }
}
