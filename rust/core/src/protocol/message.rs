//! Every message of the protocol, one struct per message.
//!
//! Postcard is not self-describing: the variant order of [`Message`] and the field order of each
//! struct *are* the wire format. Any change to them is a new [`PROTOCOL_VERSION`]. `Hello` (index
//! 0, `protocol_version` first) and `ErrorMessage` (index 2) are frozen forever, so a server of
//! any version can read a client's version and answer `UnsupportedVersion` in a form the client
//! understands.

use serde::de::{Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use super::ErrorCode;
use super::version::PROTOCOL_VERSION;
use crate::chat::ChatMessage;
use crate::sampling::SamplingOptions;

/// One protocol message, the payload of one frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// \[0\] Device → server, first message on the control stream.
    Hello(Hello),
    /// \[1\] Server → device, accepts a `Hello`.
    Welcome(Welcome),
    /// \[2\] Either direction: a request failed, or the sender gives up on the stream.
    Error(ErrorMessage),
    /// \[3\] Device → server, first message on a session stream.
    Start(Start),
    /// \[4\] Server → device, answers `Start` and `Resync`.
    Started(Started),
    /// \[5\] Device → server, asks for the next token.
    Verify(Verify),
    /// \[6\] Server → device, answers `Verify`.
    Verdict(Verdict),
    /// \[7\] Device → server, replaces the session's context.
    Resync(Resync),
    /// \[8\] Either direction: ends the stream gracefully.
    Close(Close),
    /// \[9\] Device → server, asks the server to generate tokens itself (LLM-only mode).
    Generate(Generate),
    /// \[10\] Server → device, tokens of a `Generate`, streamed as they are sampled.
    Tokens(Tokens),
    /// \[11\] Server → device, ends a `Generate` and says why.
    Finished(Finished),
    /// \[12\] Device → server, stops a `Generate` early; the session stays usable.
    Cancel(Cancel),
    /// \[13\] Device → server, tokens committed on the device, sent ahead of the next `Verify`
    /// so that the server scores them while the device drafts. No answer.
    Extend(Extend),
}

impl Message {
    /// The variant name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Error(_) => "Error",
            Message::Start(_) => "Start",
            Message::Started(_) => "Started",
            Message::Verify(_) => "Verify",
            Message::Verdict(_) => "Verdict",
            Message::Resync(_) => "Resync",
            Message::Close(_) => "Close",
            Message::Generate(_) => "Generate",
            Message::Tokens(_) => "Tokens",
            Message::Finished(_) => "Finished",
            Message::Cancel(_) => "Cancel",
            Message::Extend(_) => "Extend",
        }
    }
}

/// Opens a connection: who the device is and which model it drafts with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field of the first variant (see the module docs).
    pub protocol_version: u16,
    /// SHA-256 identifying the device's tokenizer/vocabulary; drafts are token ids, so the
    /// server's model must share it.
    pub model_fingerprint: [u8; 32],
    pub api_key: String,
    /// Client name and version, for the server's logs (e.g. `uhlm-android/0.1.0`).
    pub client: String,
}

impl Hello {
    /// Whether this server can talk to the client; the `Err` is the reply to send before closing.
    pub fn check_version(&self) -> Result<(), ErrorMessage> {
        if self.protocol_version == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(ErrorMessage::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "server speaks protocol version {PROTOCOL_VERSION}, client sent {}",
                    self.protocol_version
                ),
            ))
        }
    }
}

/// Accepts a connection and states the server's limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    /// Server name and version, for the device's logs.
    pub server: String,
    /// Largest frame payload the server accepts; the device must not send bigger ones.
    pub max_frame_bytes: u32,
    /// Largest context (prompt + generated tokens) a session may reach.
    pub max_context_tokens: u32,
    /// Largest `Generate.max_tokens` the server accepts; a device wanting more sends several
    /// `Generate`s, so one request cannot hold a worker for an unbounded time.
    pub max_generate_tokens: u32,
    /// Most links a `Verify.chain` may hold, so one request's verification is bounded too.
    pub max_chain_links: u32,
}

/// A failed request, or the reason a stream or connection is being abandoned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{code}: {message}")]
pub struct ErrorMessage {
    pub code: ErrorCode,
    /// Human-readable detail; never parse it.
    pub message: String,
    /// The `Verify.seq` this error answers, if it answers one.
    pub seq: Option<u32>,
}

impl ErrorMessage {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            seq: None,
        }
    }

    /// The error answering `Verify { seq, .. }`.
    pub fn for_seq(code: ErrorCode, message: impl Into<String>, seq: u32) -> Self {
        Self {
            seq: Some(seq),
            ..Self::new(code, message)
        }
    }
}

/// The prompt a session starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// \[0\] Token ids, already rendered by the device.
    Tokens(Vec<u32>),
    /// \[1\] A conversation of at most [`MAX_CHAT_MESSAGES`] turns; the server renders it with
    /// its model's chat template and returns the ids in `Started.rendered`.
    Chat(#[serde(deserialize_with = "bounded_chat")] Vec<ChatMessage>),
}

/// Most turns a `Prompt::Chat` may hold.
///
/// An empty `ChatMessage` is 2 bytes on the wire but 48 in memory; without a bound, one frame
/// could make the decoder allocate ~70 times its size. 4096 turns exceed any context window.
pub const MAX_CHAT_MESSAGES: usize = 4096;

fn bounded_chat<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChatMessage>, D::Error> {
    struct Bounded;
    impl<'de> Visitor<'de> for Bounded {
        type Value = Vec<ChatMessage>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_CHAT_MESSAGES} chat messages")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            if seq.size_hint().is_some_and(|n| n > MAX_CHAT_MESSAGES) {
                return Err(A::Error::invalid_length(MAX_CHAT_MESSAGES + 1, &self));
            }
            let mut out = Vec::new();
            while let Some(m) = seq.next_element()? {
                if out.len() == MAX_CHAT_MESSAGES {
                    return Err(A::Error::invalid_length(MAX_CHAT_MESSAGES + 1, &self));
                }
                out.push(m);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}

/// Opens a generation session on a new bidirectional stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Start {
    /// Chosen by the device, unique on its connection; echoed in `Started` and logs.
    pub session_id: u64,
    pub prompt: Prompt,
    /// The server applies the same transformation to its logits as the device to its own.
    pub sampling: SamplingOptions,
}

/// The server now holds a context of `context_len` tokens for this session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub session_id: u64,
    pub context_len: u32,
    /// The rendered prompt, only when the device sent `Prompt::Chat` (it must learn the ids to
    /// draft from); `None` for `Prompt::Tokens` and `Resync`, whose ids the device already has.
    pub rendered: Option<Vec<u32>>,
}

/// The device's compressed next-token distribution and the token it sampled from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draft {
    pub token: u32,
    /// `codec::encode` output, opaque to the protocol; the device sampled `token` from exactly
    /// the distribution these bytes decode to.
    #[serde(with = "serde_bytes")]
    pub q: Vec<u8>,
}

/// Why a `Verify` with a chain but no draft is refused.
pub const CHAIN_WITHOUT_DRAFT: &str = "a Verify without a draft cannot carry a chain";

/// Asks the server to decide the token at `position`, and with a `chain`, the positions the
/// device drafted after it while waiting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verify {
    /// Request number, echoed by `Verdict` and `Error`; the device increments it (wrapping).
    pub seq: u32,
    /// Context index of the token being decided: the server's context length after appending
    /// `skipped`. A consistency check; a mismatch is answered with `PositionMismatch`.
    pub position: u32,
    /// Tokens the device committed locally (confident, not sent) since its last uplink; the
    /// server appends them to its context before deciding.
    pub skipped: Vec<u32>,
    /// `None`: sample the token from the server's own distribution (remote-LLM-only mode).
    pub draft: Option<Draft>,
    /// The device's uncertainty for this token, for the server's threshold statistics.
    pub uncertainty: f32,
    /// Positions drafted after this one on the assumption that every earlier draft is accepted
    /// (pipelined drafting). The server verifies the links in order in one forward pass and
    /// stops at the first rejection. At most `Welcome.max_chain_links`; empty without a `draft`.
    pub chain: Vec<Link>,
}

/// A position of a `Verify.chain`: what follows the previous link's draft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Tokens the device committed locally after the previous link's draft.
    pub skipped: Vec<u32>,
    pub draft: Draft,
    pub uncertainty: f32,
}

impl Verify {
    /// The context length the device assumes the server has before this request.
    pub fn base_len(&self) -> Option<u32> {
        self.position
            .checked_sub(u32::try_from(self.skipped.len()).ok()?)
    }

    /// Positions this request decides: `position`, then each link's, which follows the previous
    /// draft and the link's skipped tokens. `None` if one does not fit in a `u32`.
    pub fn positions(&self) -> Option<Vec<u32>> {
        let mut at = self.position;
        let mut out = Vec::with_capacity(1 + self.chain.len());
        out.push(at);
        for link in &self.chain {
            let step = u32::try_from(link.skipped.len()).ok()?.checked_add(1)?;
            at = at.checked_add(step)?;
            out.push(at);
        }
        Some(out)
    }

    /// Cuts the chain after its first `keep` links and returns the links cut off, which
    /// [`Verify::continuation`] decides once every kept draft is accepted: a server decides a
    /// long chain a part at a time.
    pub fn split_chain(&mut self, keep: usize) -> Vec<Link> {
        self.chain.split_off(keep.min(self.chain.len()))
    }

    /// The request that decides `rest` (cut off by [`Verify::split_chain`]) after every draft
    /// of `self` was accepted: `rest`'s first link becomes its position, which follows the
    /// last draft of `self`. `None` for no rest (or positions that do not fit a `u32`).
    pub fn continuation(&self, mut rest: Vec<Link>) -> Option<Verify> {
        let last = *self.positions()?.last()?;
        if rest.is_empty() {
            return None;
        }
        let first = rest.remove(0);
        let skipped = u32::try_from(first.skipped.len()).ok()?;
        Some(Verify {
            seq: self.seq,
            position: last.checked_add(1)?.checked_add(skipped)?,
            skipped: first.skipped,
            draft: Some(first.draft),
            uncertainty: first.uncertainty,
            chain: rest,
        })
    }

    /// The drafts, in position order: `draft`, then each link's (none without a `draft`).
    pub fn drafts(&self) -> impl Iterator<Item = &Draft> {
        self.draft.iter().chain(self.chain.iter().map(|l| &l.draft))
    }

    /// What the server appends to its context to decide every position: `skipped`, then per
    /// link the previous draft and the link's skipped tokens. The last draft is not among them:
    /// it is decided, not scored.
    pub fn inputs(&self) -> Vec<u32> {
        let mut out = self.skipped.clone();
        let mut prev = self.draft.as_ref().map(|d| d.token);
        for link in &self.chain {
            out.extend(prev);
            out.extend_from_slice(&link.skipped);
            prev = Some(link.draft.token);
        }
        out
    }

    /// Checks this request against a session of which the server holds `held` tokens, for a
    /// model of `vocab` token ids, a context limit of `max_context_tokens` and chains of at most
    /// `max_chain_links`: `Ok` carries each position's decoded draft distribution (`None`
    /// without a draft), the `Err` is the reply to send. Nothing is applied, so a refused
    /// request leaves the session as it was.
    pub fn check(
        &self,
        held: usize,
        vocab: usize,
        max_context_tokens: usize,
        max_chain_links: usize,
    ) -> Result<Vec<Option<Vec<f32>>>, ErrorMessage> {
        let refuse = |code, message: String| Err(ErrorMessage::for_seq(code, message, self.seq));
        if self.chain.len() > max_chain_links {
            return refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "a chain of {} links exceeds the server's limit of {max_chain_links} \
                     (Welcome.max_chain_links)",
                    self.chain.len()
                ),
            );
        }
        if self.draft.is_none() && !self.chain.is_empty() {
            return refuse(ErrorCode::InvalidRequest, CHAIN_WITHOUT_DRAFT.into());
        }
        let drafts: Vec<&Draft> = self.drafts().collect();
        let skipped = std::iter::once(&self.skipped).chain(self.chain.iter().map(|l| &l.skipped));
        if let Some(t) = skipped
            .flatten()
            .chain(drafts.iter().map(|d| &d.token))
            .find(|&&t| t as usize >= vocab)
        {
            return refuse(
                ErrorCode::InvalidRequest,
                format!("token id {t} is outside the vocabulary of {vocab}"),
            );
        }
        if self.base_len() != u32::try_from(held).ok() {
            return refuse(
                ErrorCode::PositionMismatch,
                format!(
                    "Verify at position {} after {} skipped tokens, but the server holds {held} \
                     tokens",
                    self.position,
                    self.skipped.len()
                ),
            );
        }
        let last = self.positions().and_then(|p| p.last().copied());
        if last.is_none_or(|p| p as usize >= max_context_tokens) {
            return refuse(
                ErrorCode::ContextTooLong,
                format!(
                    "the Verify at position {} with {} chained links reaches the context limit \
                     of {max_context_tokens}",
                    self.position,
                    self.chain.len()
                ),
            );
        }
        if drafts.is_empty() {
            return Ok(vec![None]);
        }
        let bad =
            |message: String| ErrorMessage::for_seq(ErrorCode::InvalidRequest, message, self.seq);
        drafts
            .into_iter()
            .map(|d| match crate::codec::decode(&d.q, Some(vocab)) {
                // Refused before the model runs: the draft cannot have been sampled from `q`.
                Ok(q) if q[d.token as usize] <= 0.0 => Err(bad(format!(
                    "the draft token {} has no probability in the draft distribution",
                    d.token
                ))),
                Ok(q) => Ok(Some(q)),
                Err(e) => Err(bad(format!("cannot decode the draft distribution: {e}"))),
            })
            .collect()
    }
}

/// The answer to a `Verify`: its positions decided in order up to the first rejection.
///
/// Link `n = accepted_links.len()` is the one `token` decides (0: `Verify.position`); every
/// draft before it was accepted and stands. The server's context is now `positions[n] + 1`
/// tokens long, and the device drops what it drafted after link `n`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub seq: u32,
    /// The committed token: the draft if accepted, otherwise the server's sample.
    pub token: u32,
    /// Whether the draft was kept; `false` when no draft was sent.
    pub accepted: bool,
    /// Rejection probability `max(0, 1 - p_d / q_d)` of the draft; 0 when no draft was sent.
    pub beta: f32,
    /// Total-variation distance between the server's `p` and the decoded `q`; 0 without draft.
    pub tv_distance: f32,
    /// The chain links accepted before the one `token` decides, in order (empty for a
    /// single-position `Verify`, or when its first draft was rejected).
    pub accepted_links: Vec<Acceptance>,
    /// Most tokens the server asks the device to draft past its first unverified link while
    /// its next chain waits (0: one link at a time); `None`: no limit. A busy server sends its
    /// fair share of a forward pass: drafts thrown away behind a rejected link cost a saturated
    /// server time that every device waits for. Advice only: longer chains are still served.
    pub window: Option<u16>,
}

/// How an accepted draft of a chain compared with the server's distribution.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Acceptance {
    pub beta: f32,
    pub tv_distance: f32,
}

impl Verdict {
    /// Which link of its `Verify` this verdict's token decides.
    pub fn link(&self) -> usize {
        self.accepted_links.len()
    }
}

/// Replaces the session's context with these token ids (prompt and every committed token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    pub context: Vec<u32>,
}

/// Ends a stream gracefully; the sender then finishes its side of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    pub reason: String,
}

/// Asks the server to sample up to `max_tokens` tokens after the session's context, with the
/// session's `SamplingOptions` (temperature, top-k, top-p and seed as in `Start`), streaming them
/// in `Tokens` and ending with `Finished`. This is the LLM-only baseline as a user would run it:
/// one request, not one round trip per token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generate {
    /// Request number, echoed by every `Tokens`, the `Finished` and an `Error`.
    pub seq: u32,
    /// At least 1 and at most `Welcome.max_generate_tokens`. The server may stop earlier (end of
    /// sequence, full context, `Cancel`); `Finished.reason` says which.
    pub max_tokens: u32,
}

impl Generate {
    /// Checks this request against a server's limits, for a session holding `context_len`
    /// tokens: the `Err` is the reply to send (nothing is applied).
    ///
    /// A request only has to be able to produce one token: a context that fills up before
    /// `max_tokens` ends the generation with [`FinishReason::ContextFull`], as streaming LLM
    /// servers report "length", rather than refusing work that is partly possible.
    pub fn check(
        &self,
        context_len: usize,
        max_context_tokens: usize,
        max_generate_tokens: u32,
    ) -> Result<(), ErrorMessage> {
        let refuse = |code, message: String| Err(ErrorMessage::for_seq(code, message, self.seq));
        if self.max_tokens == 0 {
            return refuse(
                ErrorCode::InvalidRequest,
                "Generate.max_tokens must be at least 1".into(),
            );
        }
        if self.max_tokens > max_generate_tokens {
            return refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "Generate.max_tokens {} exceeds the server's limit of {max_generate_tokens} \
                     per request (Welcome.max_generate_tokens)",
                    self.max_tokens
                ),
            );
        }
        if context_len >= max_context_tokens {
            return refuse(
                ErrorCode::ContextTooLong,
                format!(
                    "the context of {context_len} tokens leaves no room under the limit of \
                     {max_context_tokens}"
                ),
            );
        }
        Ok(())
    }
}

/// Tokens the server sampled for `Generate { seq }`, in order; both sides append them to the
/// context. Usually one per frame, sent as soon as it is sampled; several when they were ready
/// together (e.g. the stream was briefly blocked).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub seq: u32,
    /// Never empty; an end-of-sequence token is included (it is part of the context).
    pub tokens: Vec<u32>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FinishReason {
    /// \[0\] `Generate.max_tokens` tokens were sent.
    MaxTokens,
    /// \[1\] The last token sent is an end-of-sequence token of the server's model.
    Eos,
    /// \[2\] The context reached `Welcome.max_context_tokens`.
    ContextFull,
    /// \[3\] The device sent `Cancel`.
    Cancelled,
}

/// The end of `Generate { seq }`; the session is ready for the next request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub seq: u32,
    pub reason: FinishReason,
    /// The server's context length now: a consistency check for the device.
    pub context_len: u32,
}

/// Stops `Generate { seq }` early. Tokens already on their way still arrive, then `Finished`
/// (usually `Cancelled`, or the reason it ended anyway if the two crossed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub seq: u32,
}

/// Tokens the device committed locally (confident, not sent), given to the server before the
/// `Verify` they would otherwise ride in (`Verify.skipped`): the server appends them to the
/// session's context and scores them in its next passes, so that the `Verify` waits for its
/// own few rows only. Sent only between requests (phase `Ready`); never empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extend {
    pub tokens: Vec<u32>,
}

macro_rules! impl_from {
    ($($variant:ident($ty:ty)),*) => {
        $(impl From<$ty> for Message {
            fn from(m: $ty) -> Self {
                Message::$variant(m)
            }
        })*
    };
}

impl_from!(
    Hello(Hello),
    Welcome(Welcome),
    Error(ErrorMessage),
    Start(Start),
    Started(Started),
    Verify(Verify),
    Verdict(Verdict),
    Resync(Resync),
    Close(Close),
    Generate(Generate),
    Tokens(Tokens),
    Finished(Finished),
    Cancel(Cancel),
    Extend(Extend)
);

#[cfg(test)]
mod tests {
    use super::*;

    fn link(skipped: &[u32], token: u32) -> Link {
        Link {
            skipped: skipped.to_vec(),
            draft: Draft {
                token,
                q: vec![token as u8],
            },
            uncertainty: 0.5,
        }
    }

    #[test]
    fn a_chain_split_in_parts_decides_the_same_positions_after_the_same_inputs() {
        let whole = Verify {
            seq: 9,
            position: 12,
            skipped: vec![1, 2],
            draft: Some(link(&[], 20).draft),
            uncertainty: 0.5,
            chain: vec![link(&[3], 21), link(&[4, 5, 6], 22), link(&[], 23)],
        };
        let mut first = whole.clone();
        let rest = first.split_chain(1);
        assert_eq!(first.chain.len(), 1);
        let second = first.continuation(rest).unwrap();
        // Every position once, in order; the inputs of the parts, with the accepted last draft
        // of the first between them, are the whole's.
        let mut positions = first.positions().unwrap();
        positions.extend(second.positions().unwrap());
        assert_eq!(positions, whole.positions().unwrap());
        let mut inputs = first.inputs();
        inputs.push(21);
        inputs.extend(second.inputs());
        assert_eq!(inputs, whole.inputs());
        assert_eq!(second.seq, 9);
        assert_eq!(second.draft.as_ref().map(|d| d.token), Some(22));
        // Nothing cut off: nothing to continue.
        let mut all = whole.clone();
        assert!(all.split_chain(3).is_empty());
        assert_eq!(all.continuation(Vec::new()), None);
    }
}
