//! Counters of one generation and of an engine's lifetime.
//!
//! Every decision (each generated token, plus the final EOS decision) lands in exactly one of
//! `skipped`, `sent`, `remote` or `offline`:
//! - `drafted = skipped + sent + offline`: decisions where the SLM's draft was the candidate
//!   (every decision except server-sampled [`Mode::Llm`](crate::Mode::Llm) ones);
//! - `sent = accepted + resampled`: drafts the server verified;
//! - `remote`: tokens the server sampled and streamed without a draft (`Mode::Llm`).
//!
//! Bytes are whole frames (length prefix included) written to or read from session streams,
//! counted where they cross the QUIC stream API.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A snapshot of the counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub generations: u64,
    /// Decisions made (generated tokens plus a final EOS decision).
    pub decisions: u64,
    pub drafted: u64,
    pub skipped: u64,
    pub sent: u64,
    pub accepted: u64,
    pub resampled: u64,
    pub remote: u64,
    pub offline: u64,
    /// Tokens drafted ahead of a chain in flight and thrown away when a draft before them was
    /// rejected (device work that pipelining spent for nothing; not among the decisions).
    pub discarded: u64,
    /// `Extend` messages sent: local tokens given to the server ahead of the next `Verify`
    /// ([`EngineConfig::extend_after`](crate::EngineConfig::extend_after)); no answer, not a
    /// round trip.
    pub extends: u64,
    pub uplink_bytes: u64,
    pub downlink_bytes: u64,
    /// Request/answer exchanges with the server (Start, Verify, Resync, and one per Generate,
    /// however many tokens it streams; its round-trip time runs to the first token).
    pub round_trips: u64,
    pub rtt_mean_ms: f64,
    pub rtt_p50_ms: f64,
    pub rtt_p95_ms: f64,
    /// Sessions (re)opened after the link had been down.
    pub reconnects: u64,
    pub elapsed_ms: f64,
    /// Where the device's generation time went: its model reading the prompt (and catching up
    /// on tokens it did not draft, after LLM-only streaming), its model drafting (every
    /// drafted token, the discarded ones included, and taking the server's token after a
    /// rejection), and waiting idle for a verdict (the drafting window full, or nothing left
    /// to draft). The rest of `elapsed_ms` is opening sessions, sending and bookkeeping.
    pub prefill_ms: f64,
    pub draft_ms: f64,
    pub wait_ms: f64,
    /// Generated tokens per second of generation time.
    pub tokens_per_second: f64,
    pub generated_tokens: u64,
}

/// Counters plus the round-trip samples behind the percentiles.
#[derive(Clone, Debug, Default)]
pub(crate) struct StatsAccumulator {
    pub counters: Stats,
    rtts_ms: Vec<f64>,
    elapsed: Duration,
    pub prefill: Duration,
    pub draft: Duration,
    pub wait: Duration,
}

/// Round trips kept for the lifetime percentiles; older ones are dropped.
const MAX_RTT_SAMPLES: usize = 1 << 16;

impl StatsAccumulator {
    pub fn record_rtt(&mut self, rtt: Duration) {
        if self.rtts_ms.len() == MAX_RTT_SAMPLES {
            self.rtts_ms.drain(..MAX_RTT_SAMPLES / 2);
        }
        self.rtts_ms.push(rtt.as_secs_f64() * 1e3);
        self.counters.round_trips += 1;
    }

    pub fn add_elapsed(&mut self, d: Duration) {
        self.elapsed += d;
    }

    /// Adds another accumulator (one generation) into this one (the engine's lifetime).
    pub fn merge(&mut self, other: &StatsAccumulator) {
        let (a, b) = (&mut self.counters, &other.counters);
        a.generations += b.generations;
        a.decisions += b.decisions;
        a.drafted += b.drafted;
        a.skipped += b.skipped;
        a.sent += b.sent;
        a.accepted += b.accepted;
        a.resampled += b.resampled;
        a.remote += b.remote;
        a.offline += b.offline;
        a.discarded += b.discarded;
        a.extends += b.extends;
        a.uplink_bytes += b.uplink_bytes;
        a.downlink_bytes += b.downlink_bytes;
        a.round_trips += b.round_trips;
        a.reconnects += b.reconnects;
        a.generated_tokens += b.generated_tokens;
        for &r in &other.rtts_ms {
            if self.rtts_ms.len() == MAX_RTT_SAMPLES {
                self.rtts_ms.drain(..MAX_RTT_SAMPLES / 2);
            }
            self.rtts_ms.push(r);
        }
        self.elapsed += other.elapsed;
        self.prefill += other.prefill;
        self.draft += other.draft;
        self.wait += other.wait;
    }

    pub fn snapshot(&self) -> Stats {
        let mut s = self.counters.clone();
        let mut rtts = self.rtts_ms.clone();
        rtts.sort_by(f64::total_cmp);
        if !rtts.is_empty() {
            s.rtt_mean_ms = rtts.iter().sum::<f64>() / rtts.len() as f64;
            s.rtt_p50_ms = percentile(&rtts, 0.50);
            s.rtt_p95_ms = percentile(&rtts, 0.95);
        }
        s.elapsed_ms = self.elapsed.as_secs_f64() * 1e3;
        s.prefill_ms = self.prefill.as_secs_f64() * 1e3;
        s.draft_ms = self.draft.as_secs_f64() * 1e3;
        s.wait_ms = self.wait.as_secs_f64() * 1e3;
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            s.tokens_per_second = s.generated_tokens as f64 / secs;
        }
        s
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_merge() {
        let mut g = StatsAccumulator::default();
        for ms in 1..=100 {
            g.record_rtt(Duration::from_millis(ms));
        }
        g.counters.generated_tokens = 50;
        g.add_elapsed(Duration::from_secs(2));
        let s = g.snapshot();
        assert_eq!(s.round_trips, 100);
        assert!((s.rtt_p50_ms - 50.0).abs() < 1e-9);
        assert!((s.rtt_p95_ms - 95.0).abs() < 1e-9);
        assert!((s.rtt_mean_ms - 50.5).abs() < 1e-9);
        assert!((s.tokens_per_second - 25.0).abs() < 1e-9);
        let mut total = StatsAccumulator::default();
        g.draft = Duration::from_millis(1500);
        g.wait = Duration::from_millis(300);
        g.prefill = Duration::from_millis(100);
        total.merge(&g);
        total.merge(&g);
        let t = total.snapshot();
        assert_eq!(t.round_trips, 200);
        assert_eq!(t.generated_tokens, 100);
        assert!((t.tokens_per_second - 25.0).abs() < 1e-9);
        assert_eq!(
            (t.draft_ms, t.wait_ms, t.prefill_ms),
            (3000.0, 600.0, 200.0)
        );
    }
}
