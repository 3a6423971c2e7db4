//! The memory budget: what a worker's caches hold allocated, room made for a pass, and the
//! sessions that lose their cache when the two do not fit.

use std::collections::HashSet;

use super::{Entry, SessionKey, Worker};
use crate::engine::{Engine, EngineSession};

impl<E: Engine> Worker<E> {
    /// KV bytes this worker's caches hold allocated.
    fn allocated_kv_bytes(&self) -> u64 {
        self.sessions.values().map(kv_bytes).sum()
    }

    /// Publishes this worker's share of the allocated KV bytes, `bytes`.
    pub(super) fn report_kv_bytes(&mut self, bytes: u64) {
        self.metrics
            .kv_cache_bytes
            .inc_by(bytes as i64 - self.reported_kv_bytes as i64);
        self.reported_kv_bytes = bytes;
    }

    /// Evicts least recently used sessions outside `protected` until their caches and a pass of
    /// `pass_bytes` fit the budget together (or only protected caches are left), and records
    /// what that came to.
    pub(super) fn make_room(&mut self, pass_bytes: u64, protected: &HashSet<SessionKey>) {
        let used = self.evict_down_to(self.budget.saturating_sub(pass_bytes), protected);
        self.report_kv_bytes(used);
        self.record_peak(used + pass_bytes);
    }

    /// Publishes `bytes` as this worker's peak if it is one.
    fn record_peak(&mut self, bytes: u64) {
        if bytes > self.peak_bytes {
            self.metrics
                .memory_peak_bytes
                .inc_by((bytes - self.peak_bytes) as i64);
            self.peak_bytes = bytes;
        }
    }

    /// Evicts the least recently used caches outside `protected` until the caches hold at
    /// most `limit` bytes or only protected ones are left; returns what they hold then.
    fn evict_down_to(&mut self, limit: u64, protected: &HashSet<SessionKey>) -> u64 {
        let mut used = self.allocated_kv_bytes();
        while used > limit {
            let victim = self
                .sessions
                .iter()
                .filter(|(k, e)| e.llm.is_some() && !protected.contains(k))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k);
            let Some(victim) = victim else { break };
            used -= self.evict(victim);
        }
        used
    }

    /// Evicts least recently used sessions outside `protected` until the caches fit the budget.
    /// A cache counts what it holds allocated, not the tokens in use: a session rolled back or
    /// started on a short context after a long one still holds its buffers.
    pub(super) fn enforce_budget(&mut self, protected: &HashSet<SessionKey>) {
        let mut used = self.evict_down_to(self.budget, protected);
        // Sessions still prefilling are protected so that their work is not thrown away, but
        // not past the budget (four 4,096-token prompts at once took 712 MiB of a 512 MiB
        // budget in the fault campaign): the one furthest along keeps its cache, the others go,
        // least progressed first, and their devices resync (answered `NeedResync`).
        if used > self.budget {
            let mut prefilling: Vec<(u64, SessionKey)> = self
                .catching_up
                .iter()
                .filter_map(|k| Some((kv_bytes(self.sessions.get(k)?), *k)))
                .filter(|&(bytes, _)| bytes > 0)
                .collect();
            prefilling.sort_unstable();
            prefilling.pop();
            for (_, key) in prefilling {
                if used <= self.budget {
                    break;
                }
                used -= self.evict(key);
            }
        }
        self.report_kv_bytes(used);
        self.record_peak(used);
    }

    /// Drops `key`'s KV cache; returns the bytes it held.
    fn evict(&mut self, key: SessionKey) -> u64 {
        let Some(e) = self.sessions.get_mut(&key) else {
            return 0;
        };
        let bytes = kv_bytes(e);
        e.llm = None;
        e.pending.clear();
        self.metrics.evictions.inc();
        tracing::debug!(session = key, "evicted a session's KV cache");
        bytes
    }
}

/// KV bytes an entry's cache holds allocated (none once evicted).
fn kv_bytes<S: EngineSession>(e: &Entry<S>) -> u64 {
    e.llm.as_ref().map_or(0, |s| s.kv_cache_bytes() as u64)
}
