//! Prometheus metrics. One registry per server, so in-process servers (tests, benches) do not
//! share counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use uhlm_core::protocol::ErrorCode;

/// Label of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// Every metric the server exports (names get the `uhlm_` prefix).
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub sessions: Gauge,
    /// Session tasks the connections hold, finished ones included until reaped: it follows
    /// `sessions` unless finished tasks pile up on a long-lived connection.
    pub session_tasks: Gauge,
    /// KV-cache bytes allocated over all sessions (what the memory budget bounds).
    pub kv_cache_bytes: Gauge,
    /// Over the workers, the most memory each counted against its budget at once.
    pub memory_peak_bytes: Gauge,
    pub tokens_verified: Counter,
    pub tokens_accepted: Counter,
    pub tokens_resampled: Counter,
    pub catchup_tokens: Counter,
    pub extended_tokens: Counter,
    pub prefilled_tokens: Counter,
    pub generate_requests: Counter,
    pub tokens_generated: Counter,
    pub generations_stopped: Counter,
    pub evictions: Counter,
    /// Sessions per forward pass.
    pub batch_size: Histogram,
    pub forward_passes: Counter,
    pub forward_tokens: Counter,
    /// Duration of each forward pass (what a request arriving during one waits for).
    pub forward_seconds: Histogram,
    pub verify_latency: Histogram,
    /// The drafting window each verdict asked for (`Verdict::window`): how busy the server
    /// tells its devices it is.
    pub drafting_window: Histogram,
    pub uplink_bytes: Counter,
    pub downlink_bytes: Counter,
    /// Requests sent to a remote inference engine (none with the embedded one).
    pub engine_requests: Counter,
    /// Prompt tokens the remote engine evaluated (what its prompt cache did not hold).
    pub engine_prompt_tokens: Counter,
    /// Bytes of the remote engine's answers.
    pub engine_response_bytes: Counter,
    errors: Family<CodeLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("uhlm");
        let m = Self {
            connections: Gauge::default(),
            sessions: Gauge::default(),
            session_tasks: Gauge::default(),
            kv_cache_bytes: Gauge::default(),
            memory_peak_bytes: Gauge::default(),
            tokens_verified: Counter::default(),
            tokens_accepted: Counter::default(),
            tokens_resampled: Counter::default(),
            catchup_tokens: Counter::default(),
            extended_tokens: Counter::default(),
            prefilled_tokens: Counter::default(),
            generate_requests: Counter::default(),
            tokens_generated: Counter::default(),
            generations_stopped: Counter::default(),
            evictions: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            forward_passes: Counter::default(),
            forward_tokens: Counter::default(),
            // 1 ms .. ~8 s.
            forward_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            // 0.5 ms .. ~4 s.
            verify_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            // 0 (one link at a time), then 1 .. 256 tokens.
            drafting_window: Histogram::new(
                std::iter::once(0.0).chain(exponential_buckets(1.0, 2.0, 9)),
            ),
            uplink_bytes: Counter::default(),
            downlink_bytes: Counter::default(),
            engine_requests: Counter::default(),
            engine_prompt_tokens: Counter::default(),
            engine_response_bytes: Counter::default(),
            errors: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open authenticated connections",
            m.connections.clone(),
        );
        registry.register("sessions", "Open generation sessions", m.sessions.clone());
        registry.register(
            "session_tasks",
            "Session tasks held by connections, finished ones until reaped",
            m.session_tasks.clone(),
        );
        registry.register(
            "kv_cache_bytes",
            "KV-cache bytes allocated over all sessions",
            m.kv_cache_bytes.clone(),
        );
        registry.register(
            "memory_peak_bytes",
            "Sum over workers of the most each held at once against --kv-memory-budget-bytes: \
             its KV caches and its running forward pass",
            m.memory_peak_bytes.clone(),
        );
        registry.register(
            "tokens_verified",
            "Tokens decided by Verify",
            m.tokens_verified.clone(),
        );
        registry.register(
            "tokens_accepted",
            "Draft tokens accepted",
            m.tokens_accepted.clone(),
        );
        registry.register(
            "tokens_resampled",
            "Tokens sampled by the server (draft rejected or absent)",
            m.tokens_resampled.clone(),
        );
        registry.register(
            "catchup_tokens",
            "Skipped tokens the server appended before verifying",
            m.catchup_tokens.clone(),
        );
        registry.register(
            "extended_tokens",
            "Tokens devices committed and sent ahead of their next Verify (Extend)",
            m.extended_tokens.clone(),
        );
        registry.register(
            "prefilled_tokens",
            "Context tokens scored ahead of a Verify: prompts, resyncs and the tokens devices sent ahead (Extend)",
            m.prefilled_tokens.clone(),
        );
        registry.register(
            "generate_requests",
            "Generate requests admitted (LLM-only streaming)",
            m.generate_requests.clone(),
        );
        registry.register(
            "tokens_generated",
            "Tokens sampled and streamed for Generate requests",
            m.tokens_generated.clone(),
        );
        registry.register(
            "generations_stopped",
            "Generations ended early because the device cancelled or went away",
            m.generations_stopped.clone(),
        );
        registry.register(
            "evictions",
            "Sessions whose KV cache was evicted",
            m.evictions.clone(),
        );
        registry.register(
            "batch_size",
            "Sessions served by one forward pass",
            m.batch_size.clone(),
        );
        registry.register(
            "drafting_window",
            "Tokens each verdict asked its device to draft ahead at most (its share of a pass)",
            m.drafting_window.clone(),
        );
        registry.register(
            "forward_passes",
            "Forward passes of the model",
            m.forward_passes.clone(),
        );
        registry.register(
            "forward_tokens",
            "Tokens scored by forward passes, over all their sessions",
            m.forward_tokens.clone(),
        );
        registry.register(
            "forward_pass_seconds",
            "Duration of one forward pass",
            m.forward_seconds.clone(),
        );
        registry.register(
            "verify_latency_seconds",
            "Time from receiving a Verify to sending its answer",
            m.verify_latency.clone(),
        );
        registry.register(
            "uplink_bytes",
            "Bytes received on session and control streams",
            m.uplink_bytes.clone(),
        );
        registry.register(
            "downlink_bytes",
            "Bytes sent on session and control streams",
            m.downlink_bytes.clone(),
        );
        registry.register(
            "engine_requests",
            "Requests sent to the remote inference engine",
            m.engine_requests.clone(),
        );
        registry.register(
            "engine_prompt_tokens",
            "Prompt tokens the remote inference engine evaluated (not found in its cache)",
            m.engine_prompt_tokens.clone(),
        );
        registry.register(
            "engine_response_bytes",
            "Bytes of the remote inference engine's answers",
            m.engine_response_bytes.clone(),
        );
        registry.register("errors", "Error frames sent, by code", m.errors.clone());
        Self { registry, ..m }
    }

    /// Counts an `Error` frame sent to a client.
    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_error_labels() {
        let m = Metrics::new();
        m.tokens_verified.inc_by(3);
        m.batch_size.observe(4.0);
        m.error(ErrorCode::Unauthorized);
        let text = m.render();
        assert!(text.contains("uhlm_tokens_verified_total 3"), "{text}");
        assert!(
            text.contains("uhlm_errors_total{code=\"Unauthorized\"} 1"),
            "{text}"
        );
        assert!(text.contains("uhlm_batch_size_count 1"), "{text}");
    }
}
