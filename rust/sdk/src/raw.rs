//! A bare protocol client for tools, not apps: it connects and authenticates as the engine
//! does (pinned TLS, `Hello`/`Welcome`) and opens session streams, and the caller speaks the
//! protocol (docs/PROTOCOL.md) itself. `uhlm bench capacity` replays recorded device traffic
//! with it, so that a server can be loaded by many devices without running their models.

use std::sync::Arc;

use quinn::Endpoint;
use uhlm_core::protocol::{Message, Welcome};

use crate::config::EngineConfig;
use crate::error::SdkError;
use crate::transport::{ClientConn, FramedStream, LinkError, Target, client_endpoint, connect};

/// An authenticated connection.
pub struct RawClient {
    conn: Arc<ClientConn>,
    addr: String,
    _endpoint: Endpoint,
}

impl RawClient {
    /// Connects to `config.server` with its pin, API key and timeouts, announcing the
    /// vocabulary `fingerprint` (the server's model must have the same).
    pub async fn connect(config: &EngineConfig, fingerprint: [u8; 32]) -> Result<Self, SdkError> {
        let target = Target::from_config(config, fingerprint)?;
        let endpoint = client_endpoint(&target.addr).await?;
        let conn = connect(&endpoint, &target).await?;
        Ok(Self {
            conn,
            addr: target.addr,
            _endpoint: endpoint,
        })
    }

    /// What the server announced.
    pub fn welcome(&self) -> &Welcome {
        &self.conn.welcome
    }

    /// Opens a session stream.
    pub async fn session(&self) -> Result<RawSession, SdkError> {
        let stream = self
            .conn
            .open_session()
            .await
            .map_err(|e| link_error(&self.addr, e))?;
        Ok(RawSession {
            stream,
            addr: self.addr.clone(),
            uplink_bytes: 0,
            downlink_bytes: 0,
        })
    }
}

/// One session stream: frames out, frames in, bytes counted.
pub struct RawSession {
    stream: FramedStream,
    addr: String,
    /// Bytes sent on this stream, frame headers included.
    pub uplink_bytes: u64,
    /// Bytes received on this stream.
    pub downlink_bytes: u64,
}

impl RawSession {
    pub async fn send(&mut self, message: &Message) -> Result<(), SdkError> {
        self.stream
            .send(message, &mut self.uplink_bytes)
            .await
            .map_err(|e| link_error(&self.addr, e))
    }

    /// The next message from the server.
    pub async fn recv(&mut self) -> Result<Message, SdkError> {
        self.stream
            .recv(&mut self.downlink_bytes)
            .await
            .map_err(|e| link_error(&self.addr, e))
    }

    /// Ends the device's side of the stream.
    pub fn finish(&mut self) {
        self.stream.finish();
    }
}

fn link_error(addr: &str, e: LinkError) -> SdkError {
    match e {
        LinkError::Down(reason) => SdkError::ServerUnreachable {
            addr: addr.to_string(),
            reason,
        },
        LinkError::Protocol(m) => SdkError::Protocol(m),
    }
}
