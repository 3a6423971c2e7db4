//! Which message may come next on a stream, as plain state machines (the `quinn-proto` way).
//!
//! Both ends run the same machine and feed it every message of the stream, sent or received,
//! tagged with the [`Side`] that sent it. A received message that is illegal yields the
//! [`ErrorCode`] to answer with; a sent message that is illegal is a bug in the sender. A
//! rejected message leaves the machine unchanged, and the `Error` reply the server then sends is
//! itself fed to the machine (errors are legal at any point of an open stream).
//!
//! The session machine also tracks the server's context length, so `Verify.position` is checked
//! in one place: a `Verdict` makes it one past the position its token decides (the first, or
//! with a chain the first rejected or the last link's), it grows by the length of each `Tokens`
//! and each `Extend`, is replaced by `Started`, and is untouched by a request answered with an
//! `Error`.
//!
//! `Cancel` is the one message whose effect depends on timing: the device may send it while the
//! server's `Finished` is already on its way. The device's machine then sees `Finished` after its
//! `Cancel`; the server's sees the `Cancel` after its `Finished`, and accepts it as a no-op.

use super::{ErrorCode, FinishReason, Message, Prompt, Recovery};

/// Who sent a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Device,
    Server,
}

/// Where the control stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlPhase {
    /// The device must send `Hello`.
    AwaitHello,
    /// The server must answer `Welcome` or `Error`.
    AwaitWelcome,
    /// Sessions may be opened; only `Close` or `Error` may follow on this stream.
    Established,
    /// Nothing more may be sent.
    Closed,
}

/// The control stream (the connection's first bidirectional stream).
#[derive(Clone, Debug)]
pub struct ControlStream {
    phase: ControlPhase,
}

impl Default for ControlStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlStream {
    pub fn new() -> Self {
        Self {
            phase: ControlPhase::AwaitHello,
        }
    }

    pub fn phase(&self) -> ControlPhase {
        self.phase
    }

    /// Records `msg`, sent by `from`; `Err` if it may not come now (the stream is unchanged).
    pub fn on_message(&mut self, from: Side, msg: &Message) -> Result<(), ErrorCode> {
        use ControlPhase::*;
        let next = match (self.phase, from, msg) {
            (Closed, _, _) => return Err(ErrorCode::UnexpectedMessage),
            (AwaitHello, Side::Device, Message::Hello(_)) => AwaitWelcome,
            (AwaitWelcome, Side::Server, Message::Welcome(_)) => Established,
            (_, _, Message::Error(_) | Message::Close(_)) => Closed,
            _ => return Err(ErrorCode::UnexpectedMessage),
        };
        self.phase = next;
        Ok(())
    }
}

/// Where a session stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionPhase {
    /// The device must send `Start`.
    AwaitStart,
    /// `Start` sent; the server must answer `Started` or `Error`.
    Starting,
    /// The device may send `Verify`, `Extend`, `Generate`, `Resync` or `Close`.
    Ready,
    /// `Verify { seq }` sent; the server must answer `Verdict { seq }` or `Error`.
    Verifying { seq: u32 },
    /// `Generate { seq }` sent; the server streams `Tokens { seq }` and ends with
    /// `Finished { seq }` or `Error`. `cancel_sent`: the device already sent `Cancel { seq }`.
    Generating { seq: u32, cancel_sent: bool },
    /// The server lost the context; the device must send `Resync` (or `Close`).
    NeedResync,
    /// `Resync` sent; the server must answer `Started` or `Error`.
    Resyncing,
    /// Nothing more may be sent.
    Closed,
}

/// A generation session's stream.
#[derive(Clone, Debug)]
pub struct SessionStream {
    phase: SessionPhase,
    session_id: Option<u64>,
    /// Server context length once `Started` arrived.
    context_len: Option<u32>,
    /// What the outstanding request expects in its answer.
    pending: Pending,
    /// The `seq` of the last `Generate` that finished, whose `Cancel` may still arrive late.
    finished_generate: Option<u32>,
    /// Token ids must be below this, where known (see [`SessionStream::with_vocab`]).
    vocab: Option<usize>,
}

#[derive(Clone, Debug)]
enum Pending {
    None,
    /// `Started` must report this many tokens and no rendering.
    Tokens(u32),
    /// `Started` must carry the rendered prompt.
    Chat,
    /// `Verdict` for link `n` makes the context `positions[n] + 1` long.
    Verify {
        positions: Vec<u32>,
    },
    /// `Tokens` may still bring this many tokens.
    Generate {
        remaining: u32,
    },
}

impl Default for SessionStream {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionStream {
    pub fn new() -> Self {
        Self {
            phase: SessionPhase::AwaitStart,
            session_id: None,
            context_len: None,
            pending: Pending::None,
            finished_generate: None,
            vocab: None,
        }
    }

    /// A machine that also refuses a `Verdict` or `Tokens` naming a token id outside a
    /// vocabulary of `vocab` ids: the device feeds every committed id to its own model, whose
    /// vocabulary the handshake proved equal to the server's, so such an id is a broken server.
    pub fn with_vocab(mut self, vocab: usize) -> Self {
        self.vocab = Some(vocab);
        self
    }

    fn in_vocab(&self, tokens: &[u32]) -> bool {
        self.vocab
            .is_none_or(|v| tokens.iter().all(|&t| (t as usize) < v))
    }

    pub fn phase(&self) -> SessionPhase {
        self.phase
    }

    /// The `Start.session_id`, once sent.
    pub fn session_id(&self) -> Option<u64> {
        self.session_id
    }

    /// Tokens the server holds for this session, as far as the messages so far tell.
    pub fn context_len(&self) -> Option<u32> {
        self.context_len
    }

    /// The `Verify.position` the next request must carry after `skipped` local tokens.
    pub fn next_position(&self, skipped: usize) -> Option<u32> {
        let skipped = u32::try_from(skipped).ok()?;
        self.context_len?.checked_add(skipped)
    }

    /// Why [`SessionStream::on_message`] refused `msg` from the device with `code`, in words
    /// for the device's error message.
    pub fn refusal(&self, code: ErrorCode, msg: &Message) -> String {
        match (code, msg) {
            (ErrorCode::PositionMismatch, _) => format!(
                "Verify position does not match the server's context of {:?} tokens",
                self.context_len
            ),
            (ErrorCode::InvalidRequest, Message::Generate(g)) if g.max_tokens == 0 => {
                "Generate.max_tokens must be at least 1".into()
            }
            (ErrorCode::InvalidRequest, Message::Verify(v)) if v.draft.is_none() => {
                super::message::CHAIN_WITHOUT_DRAFT.into()
            }
            (ErrorCode::InvalidRequest, Message::Extend(_)) => "an Extend must carry tokens".into(),
            (ErrorCode::ContextTooLong, Message::Extend(_)) => {
                "the Extend runs past the largest context".into()
            }
            (ErrorCode::ContextTooLong, Message::Verify(_)) => {
                "the Verify's positions run past the largest context".into()
            }
            _ => format!("{} is not allowed in phase {:?}", msg.kind(), self.phase),
        }
    }

    /// Records `msg`, sent by `from`; `Err` if it may not come now (the stream is unchanged;
    /// [`SessionStream::refusal`] says why).
    pub fn on_message(&mut self, from: Side, msg: &Message) -> Result<(), ErrorCode> {
        use SessionPhase::*;
        let unexpected = Err(ErrorCode::UnexpectedMessage);
        match (self.phase, from, msg) {
            (Closed, _, _) => return unexpected,
            (_, _, Message::Close(_)) | (_, Side::Device, Message::Error(_)) => {
                self.close();
            }
            (_, Side::Server, Message::Error(e)) => {
                if let (Verifying { seq } | Generating { seq, .. }, Some(s)) = (self.phase, e.seq)
                    && s != seq
                {
                    return unexpected;
                }
                self.on_server_error(e.code.recovery());
            }
            (AwaitStart, Side::Device, Message::Start(start)) => {
                self.pending = match &start.prompt {
                    Prompt::Tokens(t) => Pending::Tokens(token_count(t.len())?),
                    Prompt::Chat(_) => Pending::Chat,
                };
                self.session_id = Some(start.session_id);
                self.phase = Starting;
            }
            (Ready | NeedResync, Side::Device, Message::Resync(r)) => {
                self.pending = Pending::Tokens(token_count(r.context.len())?);
                self.finished_generate = None;
                self.phase = Resyncing;
            }
            (Ready, Side::Device, Message::Verify(v)) => {
                if v.base_len() != self.context_len {
                    return Err(ErrorCode::PositionMismatch);
                }
                if v.draft.is_none() && !v.chain.is_empty() {
                    return Err(ErrorCode::InvalidRequest);
                }
                // Keeps every `Verdict`'s `position + 1` representable.
                let positions = match v.positions() {
                    Some(p) if p.last() != Some(&u32::MAX) => p,
                    _ => return Err(ErrorCode::ContextTooLong),
                };
                self.pending = Pending::Verify { positions };
                self.finished_generate = None;
                self.phase = Verifying { seq: v.seq };
            }
            (Ready, Side::Device, Message::Extend(e)) => {
                let n = token_count(e.tokens.len())?;
                let len = self.context_len.unwrap_or(0);
                // Keeps the next `Verify.position`, and its verdict's `position + 1`, representable.
                match len.checked_add(n) {
                    Some(grown) if grown < u32::MAX => {
                        if n == 0 {
                            return Err(ErrorCode::InvalidRequest);
                        }
                        self.context_len = Some(grown);
                        self.finished_generate = None;
                    }
                    _ => return Err(ErrorCode::ContextTooLong),
                }
            }
            (Ready, Side::Device, Message::Generate(g)) => {
                if g.max_tokens == 0 {
                    return Err(ErrorCode::InvalidRequest);
                }
                self.pending = Pending::Generate {
                    remaining: g.max_tokens,
                };
                self.finished_generate = None;
                self.phase = Generating {
                    seq: g.seq,
                    cancel_sent: false,
                };
            }
            (
                Generating {
                    seq,
                    cancel_sent: false,
                },
                Side::Device,
                Message::Cancel(c),
            ) if c.seq == seq => {
                self.phase = Generating {
                    seq,
                    cancel_sent: true,
                };
            }
            // Crossed the server's `Finished`: nothing left to stop.
            (Ready, Side::Device, Message::Cancel(c)) if self.finished_generate == Some(c.seq) => {
                self.finished_generate = None;
            }
            (Generating { seq, .. }, Side::Server, Message::Tokens(t)) => {
                let Pending::Generate { remaining } = &self.pending else {
                    return unexpected;
                };
                let remaining = *remaining;
                if t.seq != seq {
                    return unexpected;
                }
                let n = token_count(t.tokens.len())?;
                let len = self.context_len.unwrap_or(0);
                let Some(grown) = len.checked_add(n) else {
                    return Err(ErrorCode::ContextTooLong);
                };
                if n == 0 || n > remaining || !self.in_vocab(&t.tokens) {
                    return Err(ErrorCode::InvalidRequest);
                }
                self.context_len = Some(grown);
                self.pending = Pending::Generate {
                    remaining: remaining - n,
                };
            }
            (Generating { seq, cancel_sent }, Side::Server, Message::Finished(f)) => {
                let Pending::Generate { remaining } = &self.pending else {
                    return unexpected;
                };
                let remaining = *remaining;
                if f.seq != seq {
                    return unexpected;
                }
                let consistent = Some(f.context_len) == self.context_len
                    && match f.reason {
                        FinishReason::MaxTokens => remaining == 0,
                        FinishReason::Cancelled => cancel_sent,
                        FinishReason::Eos | FinishReason::ContextFull => true,
                    };
                if !consistent {
                    return Err(ErrorCode::InvalidRequest);
                }
                self.pending = Pending::None;
                self.finished_generate = (!cancel_sent).then_some(seq);
                self.phase = Ready;
            }
            (Starting | Resyncing, Side::Server, Message::Started(s)) => {
                let consistent = Some(s.session_id) == self.session_id
                    && match (&self.pending, &s.rendered) {
                        (Pending::Tokens(n), None) => *n == s.context_len,
                        (Pending::Chat, Some(r)) => token_count(r.len()) == Ok(s.context_len),
                        _ => false,
                    };
                if !consistent {
                    return Err(ErrorCode::InvalidRequest);
                }
                self.context_len = Some(s.context_len);
                self.pending = Pending::None;
                self.phase = Ready;
            }
            (Verifying { seq }, Side::Server, Message::Verdict(v)) => {
                let Pending::Verify { positions } = &self.pending else {
                    return unexpected;
                };
                if v.seq != seq {
                    return unexpected;
                }
                // Decides a link the request had, and stops only at a rejection or the end.
                let n = v.link();
                let Some(&position) = positions.get(n) else {
                    return Err(ErrorCode::InvalidRequest);
                };
                if (v.accepted && n + 1 < positions.len()) || !self.in_vocab(&[v.token]) {
                    return Err(ErrorCode::InvalidRequest);
                }
                self.context_len = Some(position + 1);
                self.pending = Pending::None;
                self.phase = Ready;
            }
            _ => return unexpected,
        }
        Ok(())
    }

    /// Applies the server's error: a failed request leaves the context as it was.
    fn on_server_error(&mut self, recovery: Recovery) {
        use SessionPhase::*;
        self.phase = match (recovery, self.phase) {
            (
                Recovery::Resync,
                Ready | Verifying { .. } | Generating { .. } | NeedResync | Resyncing,
            ) => NeedResync,
            (Recovery::RetryLater, Starting) => AwaitStart,
            // A refused `Generate` applied nothing; one refused mid-stream keeps what arrived.
            (Recovery::RetryLater, Verifying { .. } | Generating { .. }) => Ready,
            (Recovery::RetryLater, Resyncing) => NeedResync,
            (Recovery::RetryLater, phase @ (AwaitStart | Ready | NeedResync)) => phase,
            _ => {
                self.close();
                return;
            }
        };
        if self.phase == NeedResync {
            self.context_len = None;
        }
        if self.phase == AwaitStart {
            self.session_id = None;
        }
        self.pending = Pending::None;
        self.finished_generate = None;
    }

    fn close(&mut self) {
        self.phase = SessionPhase::Closed;
        self.pending = Pending::None;
    }
}

fn token_count(n: usize) -> Result<u32, ErrorCode> {
    u32::try_from(n).map_err(|_| ErrorCode::ContextTooLong)
}
