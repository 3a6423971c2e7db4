//! The hybrid loop's exchanges with the server: sending the window's chain of drafts (a
//! `Verify`) or its local tokens ahead (an `Extend`), and applying the answer to the window.

use std::time::Instant;

use uhlm_core::lookahead::Settled;
use uhlm_core::protocol::{Extend, Message, Recovery, SessionPhase, Side, Verify};

use super::session_link::Wait;
use super::{Generation, Kept, Output};
use crate::error::SdkError;
use crate::events::StopReason;
use crate::transport::LinkError;

impl Generation {
    /// Sends the window's next chain; `false` if there was none to send. Trouble leaves the
    /// generation offline (the drafts stay unverified); only cancellation and fatal errors are
    /// returned.
    pub(super) async fn send_chain(&mut self) -> Result<bool, SdkError> {
        let Some(link) = self.link.as_ref() else {
            return Ok(false);
        };
        let welcome = &link.conn.welcome;
        // Room for the frame: distributions plus at most 5 bytes per token id.
        let max_bytes = welcome.max_frame_bytes as usize / 2;
        let max_links = (welcome.max_chain_links as usize).min(self.inner.config.max_lookahead);
        let Some(request) = self.window.request(max_links, max_bytes) else {
            return Ok(false);
        };
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let Some(link) = self.link.as_mut() else {
            return Ok(false);
        };
        let Some(position) = link.state.next_position(request.skipped.len()) else {
            self.lose_session(LinkError::Protocol("session not ready".into()));
            return Ok(true);
        };
        let verify = Verify {
            seq,
            position,
            skipped: request.skipped,
            draft: Some(request.draft),
            uncertainty: request.uncertainty,
            chain: request.chain,
        };
        self.listener.on_verify(&verify);
        let timeout = self
            .inner
            .config
            .answer_timeout(link.unscored + verify.inputs().len());
        let msg = Message::Verify(verify);
        if let Err(c) = link.state.on_message(Side::Device, &msg) {
            self.lose_session(LinkError::Protocol(format!("cannot send Verify: {c}")));
            return Ok(true);
        }
        let c = &mut self.stats.counters;
        if let Err(e) = link.stream.send(&msg, &mut c.uplink_bytes).await {
            self.lose_session(e);
            return Ok(true);
        }
        let now = Instant::now();
        self.chain_sent = Some(now);
        self.chain_deadline = Some(now + timeout);
        Ok(true)
    }

    /// Gives the server the local tokens committed since the last request once
    /// `extend_after` of them wait (see [`Lookahead::take_extend`]). Trouble leaves the
    /// generation offline, as for a chain; the tokens are in the context a new session starts
    /// from.
    pub(super) async fn send_extend(&mut self) {
        let min = self.inner.config.extend_after;
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.state.phase() != SessionPhase::Ready {
            return;
        }
        let Some(tokens) = self.window.take_extend(min) else {
            return;
        };
        let n = tokens.len();
        let msg = Message::Extend(Extend { tokens });
        if let Err(c) = link.state.on_message(Side::Device, &msg) {
            self.lose_session(LinkError::Protocol(format!("cannot send Extend: {c}")));
            return;
        }
        link.unscored += n;
        self.stats.counters.extends += 1;
        let c = &mut self.stats.counters;
        if let Err(e) = link.stream.send(&msg, &mut c.uplink_bytes).await {
            self.lose_session(e);
        }
    }

    /// Applies the answer to the chain in flight. `Some` ends the generation.
    pub(super) async fn on_reply(
        &mut self,
        out: &mut Output,
        reply: Result<Message, Wait>,
    ) -> Result<Option<StopReason>, SdkError> {
        let settled = match reply {
            Ok(m) => self.accept_reply(m).await?,
            Err(w) => self.lost(w)?,
        };
        let verify_ms = self.last_verify.take().map(|d| d.as_secs_f64() * 1e3);
        for s in settled {
            if let Some(stop) = self.settle(out, s, verify_ms)? {
                return Ok(Some(stop));
            }
        }
        // A draft made while the verdict came is kept unless the verdict rolled back.
        if let Some((drafted, rollbacks)) = self.unapplied_draft.take()
            && rollbacks == self.rollbacks
        {
            self.on_drafted(drafted);
        }
        Ok(None)
    }

    /// The tokens a server message settles (none if it asks for a resync, which is done).
    async fn accept_reply(&mut self, reply: Message) -> Result<Vec<Settled<Kept>>, SdkError> {
        let Some(link) = self.link.as_mut() else {
            return Ok(self.window.settle_unverified());
        };
        if let Err(c) = link.state.on_message(Side::Server, &reply) {
            self.lose_session(LinkError::Protocol(format!(
                "unexpected {}: {c}",
                reply.kind()
            )));
            return Ok(Vec::new());
        }
        match reply {
            Message::Verdict(v) => {
                link.unscored = 0;
                let applied = match self.window.on_verdict(&v) {
                    Ok(a) => a,
                    Err(e) => {
                        self.lose_session(LinkError::Protocol(e.to_string()));
                        return Ok(Vec::new());
                    }
                };
                self.resyncs = 0;
                if let Some(sent) = self.chain_sent.take() {
                    let rtt = sent.elapsed();
                    self.stats.record_rtt(rtt);
                    self.limit.observe_round_trip(rtt.as_secs_f64());
                    self.last_verify = Some(rtt);
                }
                let decided = applied.settled.len() + applied.rejected.unwrap_or(0);
                self.limit
                    .observe_chain(decided, applied.rejected.is_some());
                self.limit.observe_server_window(v.window);
                if let Some(dropped) = applied.rejected {
                    self.stats.counters.discarded += dropped as u64;
                    // The SLM forgets the rejected draft and what followed it, and takes the
                    // server's token: its context is the final one.
                    self.rollbacks += 1;
                    self.slm.truncate = Some(self.context.len() + applied.settled.len() - 1);
                    self.slm.feed = Some(v.token);
                }
                Ok(applied.settled)
            }
            Message::Error(e) => match e.code.recovery() {
                Recovery::Resync if self.resyncs < 2 => {
                    tracing::debug!(code = %e.code, "server asked for a resync");
                    self.resyncs += 1;
                    match self.resync().await {
                        Ok(()) => Ok(Vec::new()),
                        Err(w) => self.lost(w),
                    }
                }
                Recovery::Resync => {
                    self.lose_session(LinkError::Protocol(
                        "the server keeps losing this session's context".into(),
                    ));
                    Ok(Vec::new())
                }
                Recovery::RetryLater => {
                    tracing::debug!(code = %e.code, "server busy; tokens decided locally");
                    Ok(self.window.settle_unverified())
                }
                Recovery::EndSession => {
                    self.lose_session(LinkError::Protocol(e.to_string()));
                    Ok(Vec::new())
                }
                Recovery::Reconnect => {
                    self.lose_session(LinkError::Down(e.to_string()));
                    Ok(Vec::new())
                }
                Recovery::Fatal => Err(SdkError::from_server(&e)),
            },
            other => {
                self.lose_session(LinkError::Protocol(format!(
                    "expected Verdict, got {}",
                    other.kind()
                )));
                Ok(Vec::new())
            }
        }
    }
}
