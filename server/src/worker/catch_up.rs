//! Catching a session up in chunks.
//!
//! A new prompt, a resync, or a `Verify` carrying many skipped tokens leaves a session with
//! context to score. Scored in one forward pass, a 2,000-token prompt holds the worker for tens
//! of seconds and every other device's `Verify` waits behind it. Instead each forward pass
//! scores at most `prefill_chunk` tokens of a session, beside the other sessions' requests,
//! round robin over the sessions with work left ([`super::forward`]): another device waits for
//! at most one pass. A `Verify` that needs more than a chunk of catch-up waits in its session and is
//! answered once the context is in (its device waits; nothing is sent twice). Work stops at
//! the next chunk once nobody wants it: the session was closed, or the deferred `Verify`'s
//! device stopped waiting.
//!
//! Chunks change no result: the runtime's kernels are batch-invariant, so scoring a context in
//! pieces gives the logits of one pass bit for bit.

use uhlm_core::protocol::Verify;

use super::{SessionKey, VerdictReply, Worker};
use crate::engine::{Engine, EngineSession};

impl<E: Engine> Worker<E> {
    /// Queues `key` for catch-up (once).
    pub(super) fn queue_catch_up(&mut self, key: SessionKey) {
        if !self.catching_up.contains(&key) {
            self.catching_up.push_back(key);
        }
    }

    /// Keeps `verify` in its session when catching the session up needs more than one whole
    /// `prefill_chunk` (not one cut to the pass target: the tokens a device committed since
    /// its last uplink are the `Verify`'s own latency-critical work, scored with it, where a
    /// prompt's prefill only fills what a pass has left);
    /// gives it back to be answered now otherwise (including every request that is wrong, so
    /// that `verify` answers it with its error).
    pub(super) fn defer_verify(
        &mut self,
        key: SessionKey,
        mut verify: Verify,
        reply: VerdictReply,
    ) -> Option<(Verify, VerdictReply)> {
        let chunk = self.settings.prefill_chunk.max(1);
        let (vocab, max_context, max_links) = (
            self.engine.vocab_size(),
            self.settings.max_context_tokens,
            self.settings.max_chain_links,
        );
        let Some(entry) = self.sessions.get_mut(&key) else {
            return Some((verify, reply));
        };
        let Some(llm) = entry.llm.as_ref() else {
            return Some((verify, reply));
        };
        let base = llm.len() + entry.pending.len();
        // The last pending token is scored with the Verify itself.
        let work = entry.pending.len() + verify.skipped.len();
        if entry.deferred.is_some()
            || work <= chunk + 1
            || verify.check(base, vocab, max_context, max_links).is_err()
        {
            return Some((verify, reply));
        }
        // The skipped tokens become context to catch up on; the Verify then carries none, at
        // the same position.
        self.metrics
            .catchup_tokens
            .inc_by(verify.skipped.len() as u64);
        entry.pending.append(&mut verify.skipped);
        entry.deferred = Some((verify, reply));
        self.queue_catch_up(key);
        None
    }
}
