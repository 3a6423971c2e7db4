//! What a generation reports while it runs (listener callbacks) and when it ends (summary).

use serde::{Deserialize, Serialize};

use crate::stats::Stats;

/// Who decided a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    /// The SLM was confident; the draft was kept without asking the server.
    Local,
    /// Sent to the server, which kept the draft.
    Accepted,
    /// Sent to the server, which replaced the draft with its own sample.
    Resampled,
    /// Sampled and streamed by the server without a draft ([`Mode::Llm`](crate::Mode::Llm)).
    Remote,
    /// Would have been sent, but the server was unreachable: the SLM's draft was kept.
    Offline,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Local => "local",
            TokenSource::Accepted => "accepted",
            TokenSource::Resampled => "resampled",
            TokenSource::Remote => "remote",
            TokenSource::Offline => "offline",
        }
    }
}

/// One token, final: it is never changed or withdrawn afterwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// Text that became safe to show with this token: whole UTF-8 characters only, held back
    /// while it could still be the start of a stop string. Often empty (a partial character).
    pub text: String,
    pub token_id: u32,
    /// Index of the token in the generated output (0 = first generated token).
    pub position: u32,
    pub source: TokenSource,
    /// The SLM's uncertainty about its draft for this position, in `[0, 1]`; `0` for
    /// [`TokenSource::Remote`] tokens, which no SLM drafted (LLM-only mode does not run it).
    pub uncertainty: f32,
    /// For a token the server verified ([`TokenSource::Accepted`], [`TokenSource::Resampled`]):
    /// the milliseconds from sending its `Verify` to receiving the `Verdict`. `None` otherwise.
    pub verify_ms: Option<f64>,
}

/// Receives a generation's events; called on the engine's threads, so keep it quick.
pub trait TokenListener: Send + Sync {
    fn on_token(&self, event: TokenEvent);
    /// The link to the server went down (`online == false`, tokens continue as `Offline`) or
    /// came back. `detail` is a human-readable reason.
    fn on_link_change(&self, online: bool, detail: String) {
        let _ = (online, detail);
    }
    /// Text held back until the end (an unfinished stop-string prefix or character), delivered
    /// once after the last token; rarely non-empty.
    fn on_tail_text(&self, text: String) {
        let _ = text;
    }
    /// Each `Verify` the engine sends, as it goes on the wire: tools record device traffic
    /// with it (`uhlm bench capacity` replays it against a server).
    fn on_verify(&self, verify: &uhlm_core::protocol::Verify) {
        let _ = verify;
    }
}

/// A listener that ignores everything, for callers that only want the summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopListener;

impl TokenListener for NoopListener {
    fn on_token(&self, _event: TokenEvent) {}
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token was decided (it is not part of the output).
    Eos,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The text reached a stop string (cut before it).
    StopString,
    /// The on-device model's context window is full.
    ContextFull,
}

/// The result of a finished generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationSummary {
    /// Generated text, cut before a stop string.
    pub text: String,
    /// Generated token ids (the final EOS excluded; tokens of a stop string included).
    pub token_ids: Vec<u32>,
    /// Who decided each of `token_ids`.
    pub sources: Vec<TokenSource>,
    pub stop: StopReason,
    pub prompt_tokens: u32,
    /// The seed used (the options' seed, or the one drawn when it was `None`): passed back, it
    /// gives the same generation from the same models while the server answers throughout.
    pub seed: u64,
    pub stats: Stats,
}
