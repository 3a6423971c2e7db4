//! What a generation reports: token events through the app's [`TokenListener`], a summary at
//! the end, and the engine's counters.

use std::sync::Arc;

use uhlm_sdk as sdk;

/// Who decided a token (see [`sdk::TokenSource`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum TokenSource {
    /// The SLM was confident; nothing was sent.
    Local,
    /// The server verified and kept the draft.
    Accepted,
    /// The server replaced the draft with its own sample.
    Resampled,
    /// The server sampled the token without a draft.
    Remote,
    /// The server was unreachable; the SLM's draft was kept.
    Offline,
}

impl From<sdk::TokenSource> for TokenSource {
    fn from(s: sdk::TokenSource) -> Self {
        match s {
            sdk::TokenSource::Local => Self::Local,
            sdk::TokenSource::Accepted => Self::Accepted,
            sdk::TokenSource::Resampled => Self::Resampled,
            sdk::TokenSource::Remote => Self::Remote,
            sdk::TokenSource::Offline => Self::Offline,
        }
    }
}

/// One final token.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct TokenEvent {
    /// Text that became safe to show with this token (often empty mid-character).
    pub text: String,
    pub token_id: u32,
    /// Index in the generated output, from 0.
    pub position: u32,
    pub source: TokenSource,
    /// The SLM's uncertainty about its draft, in `[0, 1]`.
    pub uncertainty: f32,
}

impl From<sdk::TokenEvent> for TokenEvent {
    fn from(e: sdk::TokenEvent) -> Self {
        Self {
            text: e.text,
            token_id: e.token_id,
            position: e.position,
            source: e.source.into(),
            uncertainty: e.uncertainty,
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopString,
    ContextFull,
}

impl From<sdk::StopReason> for StopReason {
    fn from(s: sdk::StopReason) -> Self {
        match s {
            sdk::StopReason::Eos => Self::Eos,
            sdk::StopReason::MaxTokens => Self::MaxTokens,
            sdk::StopReason::StopString => Self::StopString,
            sdk::StopReason::ContextFull => Self::ContextFull,
        }
    }
}

/// Counters of one generation or of an engine's lifetime (see [`sdk::Stats`]):
/// `drafted = skipped + sent + offline`, `sent = accepted + resampled`.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct EngineStats {
    pub generations: u64,
    pub decisions: u64,
    pub drafted: u64,
    pub skipped: u64,
    pub sent: u64,
    pub accepted: u64,
    pub resampled: u64,
    pub remote: u64,
    pub offline: u64,
    pub uplink_bytes: u64,
    pub downlink_bytes: u64,
    pub round_trips: u64,
    pub rtt_mean_ms: f64,
    pub rtt_p50_ms: f64,
    pub rtt_p95_ms: f64,
    pub reconnects: u64,
    pub elapsed_ms: f64,
    pub tokens_per_second: f64,
    pub generated_tokens: u64,
}

impl From<sdk::Stats> for EngineStats {
    fn from(s: sdk::Stats) -> Self {
        Self {
            generations: s.generations,
            decisions: s.decisions,
            drafted: s.drafted,
            skipped: s.skipped,
            sent: s.sent,
            accepted: s.accepted,
            resampled: s.resampled,
            remote: s.remote,
            offline: s.offline,
            uplink_bytes: s.uplink_bytes,
            downlink_bytes: s.downlink_bytes,
            round_trips: s.round_trips,
            rtt_mean_ms: s.rtt_mean_ms,
            rtt_p50_ms: s.rtt_p50_ms,
            rtt_p95_ms: s.rtt_p95_ms,
            reconnects: s.reconnects,
            elapsed_ms: s.elapsed_ms,
            tokens_per_second: s.tokens_per_second,
            generated_tokens: s.generated_tokens,
        }
    }
}

/// The result of a finished generation.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerationSummary {
    /// Generated text, cut before a stop string.
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Who decided each of `token_ids`.
    pub sources: Vec<TokenSource>,
    pub stop: StopReason,
    pub prompt_tokens: u32,
    /// The seed used (drawn when the options had none).
    pub seed: u64,
    pub stats: EngineStats,
}

impl From<sdk::GenerationSummary> for GenerationSummary {
    fn from(s: sdk::GenerationSummary) -> Self {
        Self {
            text: s.text,
            token_ids: s.token_ids,
            sources: s.sources.into_iter().map(Into::into).collect(),
            stop: s.stop.into(),
            prompt_tokens: s.prompt_tokens,
            seed: s.seed,
            stats: s.stats.into(),
        }
    }
}

/// Implemented by the app to receive a generation's events. Called on the engine's threads,
/// in token order: hand the event to the UI thread and return quickly.
/// Told the fraction (0 to 1) of the on-device model loaded so far; ends with 1.
#[uniffi::export(with_foreign)]
pub trait LoadProgressListener: Send + Sync {
    fn on_progress(&self, fraction: f32);
}

#[uniffi::export(with_foreign)]
pub trait TokenListener: Send + Sync {
    fn on_token(&self, event: TokenEvent);
    /// The server link went down (`online == false`, tokens continue as `Offline`) or came back.
    fn on_link_change(&self, online: bool, detail: String);
    /// Text held back until the end (an unfinished stop-string prefix); rarely non-empty.
    fn on_tail_text(&self, text: String);
}

/// Hands the SDK's callbacks to the foreign listener.
pub(crate) struct ListenerAdapter(pub Arc<dyn TokenListener>);

impl sdk::TokenListener for ListenerAdapter {
    fn on_token(&self, event: sdk::TokenEvent) {
        self.0.on_token(event.into());
    }

    fn on_link_change(&self, online: bool, detail: String) {
        self.0.on_link_change(online, detail);
    }

    fn on_tail_text(&self, text: String) {
        self.0.on_tail_text(text);
    }
}
