//! One QUIC connection: the control-stream handshake (`Hello` → `Welcome` or a typed `Error`
//! and a closed connection), then one task per session stream until the connection ends.

use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio::task::JoinSet;
use uhlm_core::protocol::{
    Close, ErrorCode, ErrorMessage, Hello, Message, PROTOCOL_VERSION, Welcome,
};

use crate::auth::KeyId;
use crate::framed::{Framed, Next};
use crate::session;
use crate::shared::{Shared, shutting_down};

/// How long a new connection may take to open its control stream and send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close code: always 0 in protocol version 1.
const CLOSE_OK: u32 = 0;

/// Serves one incoming connection to its end.
pub(crate) async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    let remote = conn.remote_address();
    let (send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            conn.close(VarInt::from_u32(CLOSE_OK), b"no control stream");
            return;
        }
    };
    let mut control = Framed::new(send, recv, shared.clone());
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, control.next(false)).await {
        Ok(Next::Message(Message::Hello(h))) => Ok(h),
        Ok(Next::Message(other)) => Err(ErrorMessage::new(
            ErrorCode::UnexpectedMessage,
            format!("expected Hello, got {}", other.kind()),
        )),
        Ok(Next::Bad(e)) => Err(ErrorMessage::new(e.code(), e.to_string())),
        _ => {
            conn.close(VarInt::from_u32(CLOSE_OK), b"no Hello");
            return;
        }
    };
    let checked = match hello.and_then(|h| check_hello(&shared, &h)) {
        // A remote engine must still serve the vocabulary the device drafts with.
        Ok(id) => match &shared.engine_probe {
            Some(probe) => probe.check().await.map(|()| id),
            None => Ok(id),
        },
        Err(e) => Err(e),
    };
    let checked = checked.and_then(|id| match shared.key_connections.acquire(id) {
        Some(held) => Ok((id, held)),
        None => Err(ErrorMessage::new(
            ErrorCode::SessionLimit,
            format!(
                "this API key already holds {} connections, its limit",
                shared.key_connections.max()
            ),
        )),
    });
    // Held until this function returns, with the connection.
    let (key_id, _key_connection) = match checked {
        Ok(held) => held,
        Err(err) => {
            tracing::info!(%remote, code = %err.code, message = %err.message, "connection refused");
            let reason = err.message.clone().into_bytes();
            control.send(&err.into()).await;
            control.finish().await;
            // The code means nothing in protocol version 1 (docs/PROTOCOL.md §1); the reason
            // is in the Error frame, repeated here for QUIC-level logs.
            conn.close(VarInt::from_u32(CLOSE_OK), &reason);
            return;
        }
    };
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        server: format!("uhlm-server/{}", env!("CARGO_PKG_VERSION")),
        max_frame_bytes: shared.config.max_frame_bytes,
        max_context_tokens: shared.max_context_tokens,
        max_generate_tokens: shared.config.max_generate_tokens,
        max_chain_links: shared.config.max_chain_links,
    };
    if !control.send(&welcome.into()).await {
        return;
    }
    tracing::info!(%remote, key = %key_id.short(), "connection established");
    shared.metrics.connections.inc();
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = JoinSet::new();
    let draining = loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    sessions.spawn(session::serve(shared.clone(), key_id, send, recv));
                    shared.metrics.session_tasks.inc();
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "connection ended");
                    break false;
                }
            },
            // Reap finished sessions, so a long-lived connection that opens and closes many
            // streams does not keep one finished task per stream.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {
                shared.metrics.session_tasks.dec();
            }
            next = control.next(false) => match next {
                // The control stream carries nothing after Welcome but Close or Error.
                Next::Idle => {}
                Next::Message(Message::Close(_) | Message::Error(_)) | Next::End | Next::Lost => break false,
                Next::Message(other) => {
                    let err = ErrorMessage::new(
                        ErrorCode::UnexpectedMessage,
                        format!("{} is not allowed on the control stream", other.kind()),
                    );
                    control.send(&err.into()).await;
                    break false;
                }
                Next::Bad(e) => {
                    control.send(&ErrorMessage::new(e.code(), e.to_string()).into()).await;
                    break false;
                }
                Next::Shutdown => break true,
            },
            _ = shutting_down(&mut shutdown) => break true,
        }
    };
    // Sessions finish their in-flight request (and are told the server is going away).
    while sessions.join_next().await.is_some() {
        shared.metrics.session_tasks.dec();
    }
    if draining {
        control
            .send(
                &Close {
                    reason: "server shutting down".into(),
                }
                .into(),
            )
            .await;
    }
    control.finish().await;
    shared.metrics.connections.dec();
    let reason: &[u8] = if draining {
        b"server shutting down"
    } else {
        b"bye"
    };
    conn.close(VarInt::from_u32(CLOSE_OK), reason);
}

/// Version, then key, then vocabulary: each failure is a distinct, typed error.
fn check_hello(shared: &Shared, hello: &Hello) -> Result<KeyId, ErrorMessage> {
    hello.check_version()?;
    let key = shared.keys.check(&hello.api_key).ok_or_else(|| {
        ErrorMessage::new(
            ErrorCode::Unauthorized,
            "the API key is not valid for this server",
        )
    })?;
    if hello.model_fingerprint != shared.fingerprint {
        return Err(ErrorMessage::new(
            ErrorCode::VocabularyMismatch,
            format!(
                "the device's model vocabulary (fingerprint {}) differs from the server's model {} \
                 (fingerprint {}); drafts would be meaningless",
                hex::encode(hello.model_fingerprint),
                shared.llm.name(),
                hex::encode(shared.fingerprint),
            ),
        ));
    }
    Ok(key)
}
