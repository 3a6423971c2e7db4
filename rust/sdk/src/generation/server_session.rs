//! A generation's server session: opening it (and reopening it after the link came back),
//! resyncing a lost context, request/answer exchanges, and closing or dropping it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uhlm_core::lookahead::Settled;
use uhlm_core::protocol::{self, Close, Message, Recovery, Resync, SessionStream, Side, Start};

use super::session_link::{SessionLink, Wait, recv_within};
use super::{Generation, Kept};
use crate::error::SdkError;
use crate::transport::{ClientConn, LinkError};

/// How long the final `Close` may take to write before we stop caring.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

impl Generation {
    /// A failed wait (for a verdict or a resync): the session is gone, its drafts stay
    /// unverified; only cancellation and fatal errors are returned.
    pub(super) fn lost(&mut self, w: Wait) -> Result<Vec<Settled<Kept>>, SdkError> {
        match w {
            Wait::Cancelled => Err(SdkError::Cancelled),
            Wait::Fatal(e) => Err(e),
            Wait::Link(e) => {
                self.lose_session(e);
                Ok(Vec::new())
            }
        }
    }

    /// Drops the session and keeps every draft the server did not verify; they are settled
    /// (shown) at the next step.
    pub(super) fn lose_session(&mut self, e: LinkError) {
        self.drop_session(e);
        self.chain_sent = None;
        self.chain_deadline = None;
        self.pending_unverified = true;
    }

    /// Replaces the server's context with ours.
    pub(super) async fn resync(&mut self) -> Result<(), Wait> {
        let msg = Message::Resync(Resync {
            context: self.context.clone(),
        });
        let reply = self.round_trip(msg).await?;
        match reply {
            Message::Started(_) => {
                // The server holds the final tokens now; the speculative ones go again.
                self.window.drop_final();
                self.chain_sent = None;
                if let Some(link) = self.link.as_mut() {
                    link.unscored = self.context.len();
                }
                Ok(())
            }
            Message::Error(e) => Err(Wait::Link(LinkError::Protocol(e.to_string()))),
            other => Err(Wait::Link(LinkError::Protocol(format!(
                "expected Started, got {}",
                other.kind()
            )))),
        }
    }

    /// Sends `msg` (a `Resync`) on the session and waits, within the request timeout, for the
    /// server's answer (`Started` comes back before any scoring); both pass the session's state
    /// machine, and bytes and round-trip time are counted. Chains go out with `send_chain`.
    async fn round_trip(&mut self, msg: Message) -> Result<Message, Wait> {
        let Some(link) = self.link.as_mut() else {
            return Err(Wait::Link(LinkError::Down("no session".into())));
        };
        let timeout = self.inner.config.request_timeout();
        link.state
            .on_message(Side::Device, &msg)
            .map_err(|c| LinkError::Protocol(format!("cannot send {}: {c}", msg.kind())))?;
        let t0 = Instant::now();
        let c = &mut self.stats.counters;
        link.stream.send(&msg, &mut c.uplink_bytes).await?;
        let reply = recv_within(
            &mut link.stream,
            &mut c.downlink_bytes,
            timeout,
            &self.cancel,
        )
        .await?;
        self.stats.record_rtt(t0.elapsed());
        link.state
            .on_message(Side::Server, &reply)
            .map_err(|c| LinkError::Protocol(format!("unexpected {}: {c}", reply.kind())))?;
        Ok(reply)
    }

    /// Opens a session stream starting from the full context. Link trouble leaves the
    /// generation offline; only cancellation and fatal errors are returned.
    pub(super) async fn open_session(
        &mut self,
        conn: Arc<ClientConn>,
        reconnect: bool,
    ) -> Result<(), SdkError> {
        match self.try_open(conn.clone(), reconnect).await {
            Ok(link) => {
                self.link = Some(link);
                // The session starts from the whole (final) context.
                self.window.clear();
                if reconnect {
                    self.stats.counters.reconnects += 1;
                }
                if !self.online {
                    self.online = true;
                    self.listener
                        .on_link_change(true, format!("connected to {}", self.inner.link.addr()));
                }
                Ok(())
            }
            Err(Wait::Cancelled) => Err(SdkError::Cancelled),
            Err(Wait::Fatal(e)) => Err(e),
            Err(Wait::Link(e)) => {
                if let LinkError::Down(_) = e {
                    self.inner.link.mark_down(&conn, "session start failed");
                }
                self.went_offline(e.to_string());
                Ok(())
            }
        }
    }

    /// A request that can never fit the server's context is an error at the start; on a
    /// reconnect only what is left to generate counts, and a server that cannot take even
    /// that (a smaller one than before) leaves the generation on the device, where the tokens
    /// already shown stay.
    async fn try_open(
        &mut self,
        conn: Arc<ClientConn>,
        reconnect: bool,
    ) -> Result<SessionLink, Wait> {
        let max_ctx = conn.welcome.max_context_tokens as usize;
        let generated = self.context.len() - self.prompt_len;
        let left = (self.sampling.max_tokens as usize).saturating_sub(generated);
        if self.context.len() + left > max_ctx {
            let what = format!(
                "the context ({} prompt + {generated} generated tokens) plus the {left} tokens \
                 still to generate exceed the server's context of {max_ctx} tokens",
                self.prompt_len
            );
            return Err(if reconnect {
                Wait::Link(LinkError::Protocol(what))
            } else {
                Wait::Fatal(SdkError::InvalidConfig(what))
            });
        }
        let timeout = self.inner.config.request_timeout();
        let mut stream = conn.open_session().await?;
        // A token id our model cannot take is a broken server: this session ends, not the app.
        let mut state = SessionStream::new().with_vocab(self.inner.model.info().vocab_size);
        let msg = Message::Start(Start {
            session_id: self.inner.next_session_id(),
            prompt: protocol::Prompt::Tokens(self.context.clone()),
            sampling: self.sampling.clone(),
        });
        state
            .on_message(Side::Device, &msg)
            .map_err(|c| LinkError::Protocol(format!("cannot send Start: {c}")))?;
        let t0 = Instant::now();
        let c = &mut self.stats.counters;
        stream.send(&msg, &mut c.uplink_bytes).await?;
        let reply = recv_within(&mut stream, &mut c.downlink_bytes, timeout, &self.cancel).await?;
        self.stats.record_rtt(t0.elapsed());
        state
            .on_message(Side::Server, &reply)
            .map_err(|c| LinkError::Protocol(format!("unexpected {}: {c}", reply.kind())))?;
        match reply {
            Message::Started(_) => Ok(SessionLink {
                conn,
                stream,
                state,
                unscored: self.context.len(),
            }),
            Message::Error(e) => match e.code.recovery() {
                Recovery::Fatal => Err(Wait::Fatal(SdkError::from_server(&e))),
                Recovery::Reconnect => Err(Wait::Link(LinkError::Down(e.to_string()))),
                _ => Err(Wait::Link(LinkError::Protocol(e.to_string()))),
            },
            other => Err(Wait::Link(LinkError::Protocol(format!(
                "expected Started, got {}",
                other.kind()
            )))),
        }
    }

    /// Abandons the session after a failure: a dead link also takes the connection down (the
    /// background reconnect then starts); a protocol problem only ends this session.
    pub(super) fn drop_session(&mut self, e: LinkError) {
        if let Some(mut link) = self.link.take() {
            link.stream.finish();
            if let LinkError::Down(reason) = &e {
                self.inner.link.mark_down(&link.conn, reason);
            }
        }
        self.went_offline(e.to_string());
    }

    pub(super) fn went_offline(&mut self, reason: String) {
        self.retry_at =
            Some(Instant::now() + Duration::from_millis(self.inner.config.reconnect_backoff_ms));
        tracing::warn!(%reason, "server unavailable; continuing on the device");
        self.online = false;
        self.listener.on_link_change(false, reason);
    }

    /// Sends `Close` so the server frees the session's KV cache, without waiting for it.
    pub(super) async fn close_session(&mut self, reason: &str) {
        let Some(mut link) = self.link.take() else {
            return;
        };
        let msg = Message::Close(Close {
            reason: reason.to_string(),
        });
        if link.state.on_message(Side::Device, &msg).is_ok() {
            let c = &mut self.stats.counters;
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, link.stream.send(&msg, &mut c.uplink_bytes))
                    .await;
        }
        link.stream.finish();
    }
}
