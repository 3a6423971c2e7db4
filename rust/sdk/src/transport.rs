//! The QUIC side of the device: connect + `Hello`/`Welcome`, and framed session streams whose
//! bytes are counted where they cross the stream API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, Endpoint, RecvStream, SendStream};
use uhlm_core::protocol::{
    ControlStream, DEFAULT_MAX_FRAME_BYTES, FrameDecoder, Hello, Message, PROTOCOL_VERSION, Side,
    Welcome, encode_frame,
};

use crate::config::EngineConfig;
use crate::error::SdkError;
use crate::tls::{ClientTls, client_config};

/// Why a request on an established link failed.
#[derive(Debug)]
pub(crate) enum LinkError {
    /// The connection or stream is gone, or the peer stopped answering: go offline.
    Down(String),
    /// The peer broke the protocol, or we could not frame a message: give up on this session.
    Protocol(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Down(m) => write!(f, "link down: {m}"),
            LinkError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

/// An authenticated connection to a server.
pub(crate) struct ClientConn {
    pub conn: quinn::Connection,
    pub welcome: Welcome,
    /// Kept open for the connection's lifetime: finishing it would end the connection.
    _control: (SendStream, RecvStream),
}

impl ClientConn {
    pub fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Opens a session stream.
    pub async fn open_session(&self) -> Result<FramedStream, LinkError> {
        let (send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| LinkError::Down(e.to_string()))?;
        Ok(FramedStream::new(send, recv, self.welcome.max_frame_bytes))
    }
}

/// Where and how to connect.
pub(crate) struct Target {
    pub addr: String,
    pub tls: ClientTls,
    pub api_key: String,
    pub client_name: String,
    pub fingerprint: [u8; 32],
    pub connect_timeout: Duration,
}

impl Target {
    /// The server `config` names, with its pin, key and timeouts; `fingerprint` is the
    /// vocabulary the device announces in `Hello`.
    pub fn from_config(config: &EngineConfig, fingerprint: [u8; 32]) -> Result<Self, SdkError> {
        let tls = client_config(
            config.pin.as_deref(),
            Duration::from_millis(config.keep_alive_ms.max(1)),
            Duration::from_millis(config.idle_timeout_ms),
        )?;
        Ok(Self {
            addr: config.server.clone().unwrap_or_default(),
            tls,
            api_key: config.api_key.clone(),
            client_name: config.client_name.clone(),
            fingerprint,
            connect_timeout: config.connect_timeout(),
        })
    }
}

/// A client endpoint for the server at `addr` (an unspecified local address of its family).
pub(crate) async fn client_endpoint(addr: &str) -> Result<Endpoint, SdkError> {
    let unreachable = |reason: String| SdkError::ServerUnreachable {
        addr: addr.to_string(),
        reason,
    };
    let peer = tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| unreachable("cannot resolve the address".into()))?;
    Endpoint::client(bind_addr_for(&peer))
        .map_err(|e| unreachable(format!("cannot open a UDP socket: {e}")))
}

/// Resolves `host:port`; the host is also the TLS server name.
async fn resolve(addr: &str) -> Result<(SocketAddr, String), SdkError> {
    let unreachable = |reason: String| SdkError::ServerUnreachable {
        addr: addr.to_string(),
        reason,
    };
    let host = crate::config::server_host(addr)?.to_string();
    let sock = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| unreachable("the name resolves to no address".into()))?;
    Ok((sock, host))
}

/// The unspecified address of `peer`'s family, port 0: what a client endpoint binds.
pub(crate) fn bind_addr_for(peer: &SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

/// Connects, says `Hello` and waits for `Welcome`, all within the connect timeout.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    target: &Target,
) -> Result<Arc<ClientConn>, SdkError> {
    let unreachable = |reason: String| SdkError::ServerUnreachable {
        addr: target.addr.clone(),
        reason,
    };
    let work = async {
        let (sock, host) = resolve(&target.addr).await?;
        let connecting = endpoint
            .connect_with(target.tls.quinn.clone(), sock, &host)
            .map_err(|e| SdkError::InvalidConfig(format!("cannot connect to {sock}: {e}")))?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => return Err(classify_connect_error(target, e)),
        };
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| connection_error(target, e))?;
        let mut control = ControlStream::new();
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            model_fingerprint: target.fingerprint,
            api_key: target.api_key.clone(),
            client: target.client_name.clone(),
        });
        control
            .on_message(Side::Device, &hello)
            .map_err(|c| SdkError::Protocol(format!("cannot send Hello: {c}")))?;
        let frame = encode_frame(&hello, DEFAULT_MAX_FRAME_BYTES)
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| unreachable(format!("sending Hello: {e}")))?;
        let mut framed = FramedStream::new(send, recv, DEFAULT_MAX_FRAME_BYTES);
        let reply = match framed.recv(&mut 0).await {
            Ok(m) => m,
            Err(e) => {
                // The server may close the connection right after its Error frame.
                if let Some(reason) = conn.close_reason() {
                    return Err(connection_error(target, reason));
                }
                return Err(match e {
                    LinkError::Down(m) => unreachable(format!("waiting for Welcome: {m}")),
                    LinkError::Protocol(m) => SdkError::Protocol(m),
                });
            }
        };
        control
            .on_message(Side::Server, &reply)
            .map_err(|c| SdkError::Protocol(format!("unexpected {}: {c}", reply.kind())))?;
        match reply {
            Message::Welcome(welcome) => {
                let FramedStream { send, recv, .. } = framed;
                Ok(Arc::new(ClientConn {
                    conn,
                    welcome,
                    _control: (send, recv),
                }))
            }
            Message::Error(e) => {
                conn.close(0u32.into(), b"rejected");
                Err(SdkError::from_server(&e))
            }
            other => Err(SdkError::Protocol(format!(
                "expected Welcome, got {}",
                other.kind()
            ))),
        }
    };
    match tokio::time::timeout(target.connect_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(format!(
            "no answer within {} ms",
            target.connect_timeout.as_millis()
        ))),
    }
}

/// Maps a handshake failure, telling a pin mismatch from an unreachable server.
fn classify_connect_error(target: &Target, e: ConnectionError) -> SdkError {
    if let Some(mismatch) = target.tls.pinned.as_ref().and_then(|v| v.take_mismatch()) {
        return mismatch;
    }
    match &e {
        ConnectionError::TransportError(t) if t.code.to_string().contains("crypto") => {
            SdkError::Tls(e.to_string())
        }
        ConnectionError::ConnectionClosed(c) if c.error_code.to_string().contains("crypto") => {
            SdkError::Tls(e.to_string())
        }
        _ => connection_error(target, e),
    }
}

fn connection_error(target: &Target, e: ConnectionError) -> SdkError {
    SdkError::ServerUnreachable {
        addr: target.addr.clone(),
        reason: e.to_string(),
    }
}

/// One bidirectional stream carrying frames.
pub(crate) struct FramedStream {
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    max_send: u32,
    buf: Vec<u8>,
}

impl FramedStream {
    fn new(send: SendStream, recv: RecvStream, max_send: u32) -> Self {
        Self {
            send,
            recv,
            // What the server sends is small whatever it accepts (`max_send`): the protocol's
            // limit holds for it, so a broken or hostile server cannot make us buffer 4 GiB.
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES),
            max_send,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Writes one frame; adds its length (prefix included) to `uplink`.
    pub async fn send(&mut self, msg: &Message, uplink: &mut u64) -> Result<(), LinkError> {
        let frame = encode_frame(msg, self.max_send)
            .map_err(|e| LinkError::Protocol(format!("cannot frame {}: {e}", msg.kind())))?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| LinkError::Down(e.to_string()))?;
        *uplink += frame.len() as u64;
        Ok(())
    }

    /// Reads the next message; adds the bytes read to `downlink`.
    pub async fn recv(&mut self, downlink: &mut u64) -> Result<Message, LinkError> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(LinkError::Protocol(e.to_string())),
            }
            match self.recv.read(&mut self.buf).await {
                Ok(Some(n)) => {
                    *downlink += n as u64;
                    self.decoder.push(&self.buf[..n]);
                }
                Ok(None) => {
                    return Err(LinkError::Down("the server ended the stream".into()));
                }
                Err(e) => return Err(LinkError::Down(e.to_string())),
            }
        }
    }

    /// Ends our side of the stream (best effort: the peer may already be gone).
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}
