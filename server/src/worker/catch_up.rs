//! Catching a session up in chunks.
//!
//! A new prompt, a resync, or a `Verify` carrying many skipped tokens leaves a session with
//! context to score. Scored in one forward pass, a 2,000-token prompt holds the worker for tens
//! of seconds and every other device's `Verify` waits behind it. Instead the worker scores at
//! most `prefill_chunk` tokens of one session per turn of its loop, after the requests already
//! queued, round robin over the sessions with work left: another device waits for at most one
//! chunk. A `Verify` that needs more than a chunk of catch-up waits in its session and is
//! answered once the context is in (its device waits; nothing is sent twice). Work stops at
//! the next chunk once nobody wants it: the session was closed, or the deferred `Verify`'s
//! device stopped waiting.
//!
//! Chunks change no result: the runtime's kernels are batch-invariant, so scoring a context in
//! pieces gives the logits of one pass bit for bit.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;

use uhlm_core::protocol::{ErrorCode, Verify};

use super::{SessionKey, VerdictReply, Worker, fail, model_failure};

impl Worker {
    /// Queues `key` for catch-up (once).
    pub(super) fn queue_catch_up(&mut self, key: SessionKey) {
        if !self.catching_up.contains(&key) {
            self.catching_up.push_back(key);
        }
    }

    /// Keeps `verify` in its session when catching the session up needs more than one chunk;
    /// gives it back to be answered now otherwise (including every request that is wrong, so
    /// that `verify` answers it with its error).
    pub(super) fn defer_verify(
        &mut self,
        key: SessionKey,
        mut verify: Verify,
        reply: VerdictReply,
    ) -> Option<(Verify, VerdictReply)> {
        let chunk = self.settings.prefill_chunk.max(1);
        let (vocab, max_context) = (
            self.model.info().vocab_size,
            self.settings.max_context_tokens,
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
            || verify.check(base, vocab, max_context).is_err()
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

    /// Scores one chunk of the session at the front of the queue; answers its deferred
    /// `Verify` once it is caught up, else puts it back at the end.
    pub(super) fn step_catch_up(&mut self, protected: &HashSet<SessionKey>) {
        let Some(key) = self.catching_up.pop_front() else {
            return;
        };
        let chunk = self.settings.prefill_chunk.max(1);
        // Closed: nothing to do.
        let Some(entry) = self.sessions.get_mut(&key) else {
            return;
        };
        // The device stopped waiting (timed out, reset the stream, lost the connection); it
        // will start over with a resync or a new session.
        if entry.deferred.as_ref().is_some_and(|(_, r)| r.is_closed()) {
            entry.deferred = None;
            return;
        }
        let Some(llm) = entry.llm.as_mut() else {
            if let Some((_, reply)) = entry.deferred.take() {
                let _ = reply.send(Err(fail(
                    ErrorCode::NeedResync,
                    "this session's cache was evicted to free memory; resend the context",
                )));
            }
            return;
        };
        // All but the last pending token: the Verify (or the next one) scores that one.
        let n = entry.pending.len().saturating_sub(1).min(chunk);
        if n > 0 {
            let old_len = llm.len();
            let scored =
                std::panic::catch_unwind(AssertUnwindSafe(|| llm.score_last(&entry.pending[..n])));
            match scored {
                Ok(Ok(_)) => {
                    entry.pending.drain(..n);
                    self.metrics.prefilled_tokens.inc_by(n as u64);
                }
                failed => {
                    llm.truncate(old_len);
                    let failure = match failed {
                        Ok(Err(e)) => model_failure(e),
                        _ => fail(ErrorCode::Internal, "the model failed on this request"),
                    };
                    tracing::debug!(key, ?failure, "catch-up failed");
                    // Without a waiting Verify the tokens stay pending, and the next Verify
                    // meets the error itself.
                    if let Some((_, reply)) = entry.deferred.take() {
                        let _ = reply.send(Err(failure));
                    }
                    return;
                }
            }
        }
        if entry.pending.len() > 1 {
            self.catching_up.push_back(key);
        } else if let Some((verify, reply)) = entry.deferred.take() {
            let r = self.answer_verify(key, &verify, protected);
            let _ = reply.send(r);
            return;
        }
        self.enforce_budget(protected);
    }
}
