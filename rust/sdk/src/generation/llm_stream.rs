//! LLM-only mode ([`Mode::Llm`](crate::Mode::Llm)): the server generates and streams, and a
//! link that fails mid-stream hands the generation to the device.

use std::time::Instant;

use uhlm_core::protocol::{FinishReason, Generate, Message, Recovery, Side};

use super::session_link::{Wait, recv_within};
use super::{Generation, Output, Streamed};
use crate::error::SdkError;
use crate::events::{StopReason, TokenSource};
use crate::transport::LinkError;

impl Generation {
    /// LLM-only mode: asks the server to generate what is left (several `Generate`s when it is
    /// more than the server allows per request) and commits the streamed tokens as they arrive.
    /// Stop strings, `max_tokens` and the context limit apply exactly as on the per-token path;
    /// stopping early needs no message, since the session's `Close` ends the server's work.
    pub(super) async fn stream_remote(
        &mut self,
        out: &mut Output,
        context_limit: usize,
    ) -> Result<Streamed, SdkError> {
        // A resync that is not followed by progress twice in a row means the server cannot keep
        // this session; give up on it rather than loop.
        let mut resynced = false;
        loop {
            let generated = out.token_ids.len() as u32;
            let left = self.sampling.max_tokens.saturating_sub(generated);
            let room =
                u32::try_from(context_limit.saturating_sub(self.context.len())).unwrap_or(u32::MAX);
            let Some(link) = self.link.as_mut() else {
                return Ok(Streamed::Offline);
            };
            let want = left
                .min(room)
                .min(link.conn.welcome.max_generate_tokens.max(1));
            if want == 0 {
                return Ok(Streamed::Done(if left == 0 {
                    StopReason::MaxTokens
                } else {
                    StopReason::ContextFull
                }));
            }
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            let msg = Message::Generate(Generate {
                seq,
                max_tokens: want,
            });
            if let Err(c) = link.state.on_message(Side::Device, &msg) {
                self.drop_session(LinkError::Protocol(format!("cannot send Generate: {c}")));
                return Ok(Streamed::Offline);
            }
            let t0 = Instant::now();
            let c = &mut self.stats.counters;
            if let Err(e) = link.stream.send(&msg, &mut c.uplink_bytes).await {
                self.drop_session(e);
                return Ok(Streamed::Offline);
            }
            let mut first = true;
            loop {
                let Some(link) = self.link.as_mut() else {
                    return Ok(Streamed::Offline);
                };
                let timeout = self.inner.config.answer_timeout(link.unscored);
                let c = &mut self.stats.counters;
                let reply = match recv_within(
                    &mut link.stream,
                    &mut c.downlink_bytes,
                    timeout,
                    &self.cancel,
                )
                .await
                {
                    Ok(m) => m,
                    Err(Wait::Cancelled) => return Err(SdkError::Cancelled),
                    Err(Wait::Fatal(e)) => return Err(e),
                    Err(Wait::Link(e)) => {
                        self.drop_session(e);
                        return Ok(Streamed::Offline);
                    }
                };
                if first {
                    // One round trip per request: until its first answer.
                    self.stats.record_rtt(t0.elapsed());
                    first = false;
                }
                link.unscored = 0;
                if let Err(c) = link.state.on_message(Side::Server, &reply) {
                    self.drop_session(LinkError::Protocol(format!(
                        "unexpected {}: {c}",
                        reply.kind()
                    )));
                    return Ok(Streamed::Offline);
                }
                match reply {
                    Message::Tokens(t) => {
                        resynced = false;
                        for token in t.tokens {
                            // As on the per-token path: nothing is shown after a cancel.
                            if self.cancel.is_cancelled() {
                                return Err(SdkError::Cancelled);
                            }
                            let c = &mut self.stats.counters;
                            c.decisions += 1;
                            c.remote += 1;
                            if let Some(stop) =
                                self.commit(out, token, TokenSource::Remote, 0.0, None)
                            {
                                return Ok(Streamed::Done(stop));
                            }
                        }
                    }
                    Message::Finished(f) => match f.reason {
                        // More to generate than one request allows: ask again.
                        FinishReason::MaxTokens => break,
                        // An end-of-sequence id of the server's model that ours does not
                        // list, or a server context smaller than ours.
                        FinishReason::Eos => return Ok(Streamed::Done(StopReason::Eos)),
                        FinishReason::ContextFull => {
                            return Ok(Streamed::Done(StopReason::ContextFull));
                        }
                        // We never cancel (the state machine rejects this reason otherwise).
                        FinishReason::Cancelled => return Err(SdkError::Cancelled),
                    },
                    Message::Error(e) => match e.code.recovery() {
                        Recovery::Resync if !resynced => {
                            tracing::debug!(code = %e.code, "server asked for a resync");
                            if let Err(w) = self.resync().await {
                                return self.stream_failed(w);
                            }
                            resynced = true;
                            break;
                        }
                        Recovery::Fatal => return Err(SdkError::from_server(&e)),
                        Recovery::Reconnect => {
                            self.drop_session(LinkError::Down(e.to_string()));
                            return Ok(Streamed::Offline);
                        }
                        _ => {
                            self.drop_session(LinkError::Protocol(e.to_string()));
                            return Ok(Streamed::Offline);
                        }
                    },
                    other => {
                        self.drop_session(LinkError::Protocol(format!(
                            "expected Tokens or Finished, got {}",
                            other.kind()
                        )));
                        return Ok(Streamed::Offline);
                    }
                }
            }
            if self.cancel.is_cancelled() {
                return Err(SdkError::Cancelled);
            }
        }
    }

    /// A failed resync while streaming: the session is gone, the device takes over.
    fn stream_failed(&mut self, w: Wait) -> Result<Streamed, SdkError> {
        match w {
            Wait::Cancelled => Err(SdkError::Cancelled),
            Wait::Fatal(e) => Err(e),
            Wait::Link(e) => {
                self.drop_session(e);
                Ok(Streamed::Offline)
            }
        }
    }
}
