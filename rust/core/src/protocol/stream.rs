//! Which message may come next on a stream, as plain state machines (the `quinn-proto` way).
//!
//! Both ends run the same machine and feed it every message of the stream, sent or received,
//! tagged with the [`Side`] that sent it. A received message that is illegal yields the
//! [`ErrorCode`] to answer with; a sent message that is illegal is a bug in the sender. A
//! rejected message leaves the machine unchanged, and the `Error` reply the server then sends is
//! itself fed to the machine (errors are legal at any point of an open stream).
//!
//! The session machine also tracks the server's context length, so `Verify.position` is checked
//! in one place: the server's context grows by `skipped.len() + 1` per `Verdict`, is replaced by
//! `Started`, and is untouched by a request answered with an `Error`.

use super::{ErrorCode, Message, Prompt, Recovery};

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
    /// The device may send `Verify`, `Resync` or `Close`.
    Ready,
    /// `Verify { seq }` sent; the server must answer `Verdict { seq }` or `Error`.
    Verifying { seq: u32 },
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
}

#[derive(Clone, Copy, Debug)]
enum Pending {
    None,
    /// `Started` must report this many tokens and no rendering.
    Tokens(u32),
    /// `Started` must carry the rendered prompt.
    Chat,
    /// `Verdict` makes the context `position + 1` long.
    Verify {
        position: u32,
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
        }
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

    /// Records `msg`, sent by `from`; `Err` if it may not come now (the stream is unchanged).
    pub fn on_message(&mut self, from: Side, msg: &Message) -> Result<(), ErrorCode> {
        use SessionPhase::*;
        let unexpected = Err(ErrorCode::UnexpectedMessage);
        match (self.phase, from, msg) {
            (Closed, _, _) => return unexpected,
            (_, _, Message::Close(_)) | (_, Side::Device, Message::Error(_)) => {
                self.close();
            }
            (_, Side::Server, Message::Error(e)) => {
                if let (Verifying { seq }, Some(s)) = (self.phase, e.seq) {
                    if s != seq {
                        return unexpected;
                    }
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
                self.phase = Resyncing;
            }
            (Ready, Side::Device, Message::Verify(v)) => {
                if v.base_len() != self.context_len {
                    return Err(ErrorCode::PositionMismatch);
                }
                // Keeps the `Verdict`'s `position + 1` representable.
                if v.position == u32::MAX {
                    return Err(ErrorCode::ContextTooLong);
                }
                self.pending = Pending::Verify {
                    position: v.position,
                };
                self.phase = Verifying { seq: v.seq };
            }
            (Starting | Resyncing, Side::Server, Message::Started(s)) => {
                let consistent = Some(s.session_id) == self.session_id
                    && match (self.pending, &s.rendered) {
                        (Pending::Tokens(n), None) => n == s.context_len,
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
                let Pending::Verify { position } = self.pending else {
                    return unexpected;
                };
                if v.seq != seq {
                    return unexpected;
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
            (Recovery::Resync, Ready | Verifying { .. } | NeedResync | Resyncing) => NeedResync,
            (Recovery::RetryLater, Starting) => AwaitStart,
            (Recovery::RetryLater, Verifying { .. }) => Ready,
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
    }

    fn close(&mut self) {
        self.phase = SessionPhase::Closed;
        self.pending = Pending::None;
    }
}

fn token_count(n: usize) -> Result<u32, ErrorCode> {
    u32::try_from(n).map_err(|_| ErrorCode::ContextTooLong)
}
