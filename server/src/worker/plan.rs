//! What the next forward pass computes, and for whom: the scheduling policy.
//!
//! Each turn the worker plans a [`Plan`]: the `Verify`s queued (each session's skipped tokens
//! and the positions to decide: one, or a chain of drafts verified in order), one token for
//! every running generation, the tokens devices sent ahead (`Extend`), and chunks of the
//! sessions catching up on a prompt, as many as fit in `max_batch` sessions,
//! `max_batch_tokens` tokens and half the worker's memory budget (a chain is cut where its rows'
//! activations and logits would overrun it). What does not fit waits for the next turn, first
//! in line.
//! Catch-ups get a chunk per pass (cut to `pass_target`: by default twice a one-token pass)
//! however busy the worker is (over the token budget if need be): with a quarter of a chunk,
//! 64 busy devices left four 4,096-token prompts 100 s from their first token in the fault
//! campaign. No short request waits behind more than one pass. Every `Verdict` tells its
//! device how far ahead to draft: its share of a pass, so that a saturated server is not
//! filled with drafts thrown away behind rejections.

use std::collections::HashSet;

use super::{GenEvent, SessionKey, Streaming, VerdictReply, Worker, evicted, finished, live_entry};
use crate::config::{AUTO_PASS_MULTIPLE, PassTarget};
use crate::engine::{Engine, EngineSession, ScoreItem, Wanted};
use uhlm_core::protocol::{FinishReason, Link, Verify};
use uhlm_core::sampling::SamplingOptions;
use uhlm_model::PassCost;

/// What the next forward pass computes.
pub(super) struct Plan {
    pub(super) rows: Vec<Row>,
    pub(super) tokens: usize,
    /// What the pass allocates beyond the caches ([`PassCost`]), within `max_bytes`.
    pub(super) bytes: u64,
    /// What the caches it grows allocate (new buffers beside the old until copied): not
    /// capped per pass, since it becomes cache, but room is made for it before the pass runs.
    pub(super) growth: u64,
    keys: HashSet<SessionKey>,
    max_rows: usize,
    max_tokens: usize,
    cost: PassCost,
    max_bytes: u64,
}

/// One session's share of a forward pass.
pub(super) struct Row {
    pub(super) key: SessionKey,
    /// New tokens for the session's cache.
    pub(super) tokens: Vec<u32>,
    /// Positions of `tokens` whose logits the work needs; empty: the last one's.
    pub(super) outputs: Vec<usize>,
    pub(super) work: Work,
    /// The session's sampling and, per wanted row, the seed of the engine's own draw there
    /// (for engines that sample; set when the pass runs).
    pub(super) sampling: SamplingOptions,
    pub(super) seeds: Vec<u32>,
    /// Per wanted row, the device's draft there (empty: none), for engines asked about it.
    pub(super) drafts: Vec<Option<u32>>,
}

impl Row {
    /// Scores `tokens` of a session's pending context; nothing is decided from their logits.
    fn catch_up(key: SessionKey, tokens: Vec<u32>) -> Self {
        Self {
            key,
            tokens,
            outputs: Vec::new(),
            work: Work::CatchUp,
            sampling: SamplingOptions::default(),
            seeds: Vec::new(),
            drafts: Vec::new(),
        }
    }

    pub(super) fn wanted(&self) -> Wanted<'_> {
        if matches!(self.work, Work::CatchUp) {
            Wanted::Nothing
        } else if self.outputs.is_empty() {
            Wanted::Last
        } else {
            Wanted::Rows(&self.outputs)
        }
    }

    /// The context length at each wanted row, for a session holding `cached` tokens.
    pub(super) fn ends(&self, cached: usize) -> Vec<usize> {
        match self.wanted() {
            Wanted::Nothing => Vec::new(),
            Wanted::Last => vec![cached + self.tokens.len()],
            Wanted::Rows(rows) => rows.iter().map(|r| cached + r + 1).collect(),
        }
    }

    pub(super) fn item<'a, S>(&'a self, session: &'a mut S) -> ScoreItem<'a, S> {
        ScoreItem {
            session,
            tokens: &self.tokens,
            wanted: self.wanted(),
            sampling: &self.sampling,
            seeds: &self.seeds,
            drafts: &self.drafts,
        }
    }
}

/// What a row's logits are for.
pub(super) enum Work {
    /// Decide the token at `verify.position` (and at each chained link's); `pending` of
    /// `tokens` were the session's pending tokens (restored if the request fails), the rest the
    /// `Verify`'s inputs. `q`: each position's decoded draft distribution.
    Verify {
        verify: Verify,
        q: Vec<Option<Vec<f32>>>,
        pending: usize,
        reply: VerdictReply,
        /// The links cut off a long chain, decided in later passes once every link of this
        /// part is accepted ([`Verify::continuation`]).
        rest: Vec<Link>,
    },
    /// Sample the generation's next token.
    Generate(Streaming),
    /// Score the first `tokens.len()` pending tokens of a long context.
    CatchUp,
}

/// Fewest catch-up tokens a pass carries while a session is catching up, however full or slow
/// the pass: catching up never stops.
const MIN_CATCH_UP_TOKENS: usize = 16;

/// Context (in tokens) up to which a whole `prefill_chunk` is scored in one pass.
const FULL_CHUNK_CONTEXT: usize = 1024;

/// Tokens of a catch-up chunk that starts after `cached` tokens: `chunk`, or fewer deep in a
/// long context, so that no chunk costs more attention than a full one at
/// [`FULL_CHUNK_CONTEXT`] (`n * (cached + n)` query-key pairs per head and layer). Attention
/// grows with the context while the rest of a pass does not: a 128-token chunk at position
/// 4,000 held every other device's `Verify` for seconds in the fault campaign.
fn chunk_at(cached: usize, chunk: usize) -> usize {
    let budget = chunk * (chunk + FULL_CHUNK_CONTEXT);
    // Largest n with n * (cached + n) <= budget: the positive root of n^2 + cached n - budget.
    let c = cached as f64;
    let mut n = ((((c * c + 4.0 * budget as f64).sqrt() - c) / 2.0) as usize).clamp(1, chunk);
    // Float rounding can overshoot by one.
    while n > 1 && n * (cached + n) > budget {
        n -= 1;
    }
    n
}

/// Catch-up tokens `entry` may score in one pass with whole chunks of `full`: all but its last
/// pending token (the `Verify`, or the next one, scores that one with its decision), within
/// [`chunk_at`]'s attention bound.
fn catch_up_len<S: EngineSession>(entry: &super::Entry<S>, full: usize) -> usize {
    let cached = entry.llm.as_ref().map_or(0, EngineSession::len);
    entry
        .pending
        .len()
        .saturating_sub(1)
        .min(chunk_at(cached, full))
}

/// Bytes `entry`'s cache allocates to take a row of `tokens` new tokens.
fn grows<S: EngineSession>(entry: &super::Entry<S>, tokens: usize) -> u64 {
    entry
        .llm
        .as_ref()
        .map_or(0, |s| s.growth_bytes(tokens) as u64)
}

impl Plan {
    /// A pass of at most `max_rows` sessions, `max_tokens` tokens and `max_bytes` of the
    /// engine's memory at `cost`.
    pub(super) fn new(max_rows: usize, max_tokens: usize, cost: PassCost, max_bytes: u64) -> Self {
        Self {
            rows: Vec::new(),
            tokens: 0,
            bytes: 0,
            growth: 0,
            keys: HashSet::new(),
            max_rows: max_rows.max(1),
            max_tokens: max_tokens.max(1),
            cost,
            max_bytes,
        }
    }

    /// Whether `key` already has a row (a session gets one row per pass).
    pub(super) fn has(&self, key: SessionKey) -> bool {
        self.keys.contains(&key)
    }

    /// Whether a row of `n` tokens returning `outputs` rows of logits fits; the first row
    /// always does.
    fn fits(&self, n: usize, outputs: usize) -> bool {
        self.rows.is_empty()
            || (self.rows.len() < self.max_rows
                && self.tokens + n <= self.max_tokens
                && self.cost.bytes(n, outputs) <= self.free_bytes())
    }

    /// Bytes still free in this pass's memory budget.
    fn free_bytes(&self) -> u64 {
        self.max_bytes.saturating_sub(self.bytes)
    }

    /// Tokens still free in this pass's budgets for rows that return no logits (catch-up).
    fn room(&self) -> usize {
        if self.rows.len() >= self.max_rows {
            return 0;
        }
        self.max_tokens
            .saturating_sub(self.tokens)
            .min(self.room_in_memory())
    }

    /// Adds `row`, whose session's cache grows by `growth` bytes to take it.
    fn push(&mut self, row: Row, growth: u64) {
        let outputs = match row.wanted() {
            Wanted::Nothing => 0,
            Wanted::Last => 1,
            Wanted::Rows(rows) => rows.len(),
        };
        self.bytes += self.cost.bytes(row.tokens.len(), outputs);
        self.growth += growth;
        self.tokens += row.tokens.len();
        self.keys.insert(row.key);
        self.rows.push(row);
    }

    /// Tokens of catch-up the memory budget leaves room for, whatever the token budget.
    fn room_in_memory(&self) -> usize {
        match self.cost.bytes_per_token {
            0 => usize::MAX,
            per_token => (self.free_bytes() / per_token) as usize,
        }
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = SessionKey> + '_ {
        self.keys.iter().copied()
    }
}

impl<E: Engine> Worker<E> {
    /// Adds `verify` to `plan`, or answers it at once when it cannot be served (unknown or
    /// evicted session, a request that fails its checks). Gives it back when the pass is full.
    pub(super) fn plan_verify(
        &mut self,
        plan: &mut Plan,
        key: SessionKey,
        mut verify: Verify,
        reply: VerdictReply,
    ) -> Option<(Verify, VerdictReply)> {
        // The device stopped waiting: nothing to compute for it.
        if reply.is_closed() {
            return None;
        }
        let vocab = self.engine.vocab_size();
        let max_context = self.settings.max_context_tokens;
        let chunk = self.settings.prefill_chunk.max(1);
        let entry = match live_entry(self.sessions.get_mut(&key)) {
            Ok(entry) => entry,
            Err(e) => {
                let _ = reply.send(Err(e));
                return None;
            }
        };
        let cached = entry.llm.as_ref().map_or(0, EngineSession::len);
        let held = cached + entry.pending.len();
        let mut q = match verify.check(held, vocab, max_context, self.settings.max_chain_links) {
            Ok(q) => q,
            Err(e) => {
                let _ = reply.send(Err(e));
                return None;
            }
        };
        let pending = entry.pending.len();
        // A chain whose links carry more tokens than a prefill chunk is decided a part at a
        // time, each part in its own pass: scored at once, its skipped tokens would hold every
        // other session's request for as long as a prompt of that size did before prompts were
        // chunked. (The first position's skipped tokens were caught up already if many.)
        // So is a chain whose rows' activations and logits would take more than a pass's share
        // of the memory budget; a part that fits a pass but not what this one has left waits
        // whole for the next.
        let first = pending + verify.skipped.len();
        let (mut total, mut outputs) = (first, 1);
        let keep = verify
            .chain
            .iter()
            .take_while(|link| {
                total += 1 + link.skipped.len();
                outputs += 1;
                total <= chunk.max(first) && plan.cost.bytes(total, outputs) <= plan.max_bytes
            })
            .count();
        let rest = verify.split_chain(keep);
        q.truncate(1 + keep);
        let inputs = verify.inputs();
        let growth = grows(entry, pending + inputs.len());
        if !plan.fits(pending + inputs.len(), 1 + keep) {
            let mut whole = verify;
            whole.chain.extend(rest);
            return Some((whole, reply));
        }
        // A chain needs the row before each of its positions (checked above to follow the
        // cache); a single position, the last row.
        let outputs = match verify.positions() {
            Some(p) if p.len() > 1 => p.iter().map(|&p| p as usize - 1 - cached).collect(),
            _ => Vec::new(),
        };
        let mut tokens = std::mem::take(&mut entry.pending);
        tokens.extend_from_slice(&inputs);
        let drafts = std::iter::once(verify.draft.as_ref().map(|d| d.token))
            .chain(verify.chain.iter().map(|l| Some(l.draft.token)))
            .collect();
        plan.push(
            Row {
                key,
                tokens,
                outputs,
                drafts,
                work: Work::Verify {
                    verify,
                    q,
                    pending,
                    reply,
                    rest,
                },
                sampling: SamplingOptions::default(),
                seeds: Vec::new(),
            },
            growth,
        );
        None
    }

    /// Adds one token of every running generation that fits to `plan`; ends the ones nobody
    /// waits for any more. Generations left out go first next time.
    pub(super) fn plan_generations(&mut self, plan: &mut Plan) {
        let mut waiting = std::collections::VecDeque::new();
        while let Some(s) = self.streams.pop_front() {
            // Nobody is listening any more (stream reset, connection lost, session closed):
            // stop computing tokens for it.
            if s.events.is_closed() {
                self.metrics.generations_stopped.inc();
                continue;
            }
            // Its prompt is still being scored a chunk at a time: the first token comes after.
            if self.catching_up.contains(&s.key) || plan.has(s.key) {
                waiting.push_back(s);
                continue;
            }
            let entry = match live_entry(self.sessions.get_mut(&s.key)) {
                Ok(entry) => entry,
                Err(e) => {
                    let _ = s.events.send(GenEvent::Failed(e));
                    continue;
                }
            };
            if s.cancel.load(std::sync::atomic::Ordering::Acquire) {
                let len = entry.llm.as_ref().map_or(0, EngineSession::len) + entry.pending.len();
                // Counted before `Finished` leaves, so that whoever sees it sees the count too.
                self.metrics.generations_stopped.inc();
                let _ = s.events.send(finished(FinishReason::Cancelled, len));
                continue;
            }
            let growth = grows(entry, entry.pending.len());
            if !plan.fits(entry.pending.len(), 1) {
                waiting.push_back(s);
                continue;
            }
            // The same steps as a `Verify` without a draft: score what is not cached yet (the
            // prompt's last token, then each sampled one), sample with the session's RNG.
            let tokens = std::mem::take(&mut entry.pending);
            plan.push(
                Row {
                    key: s.key,
                    tokens,
                    outputs: Vec::new(),
                    work: Work::Generate(s),
                    sampling: SamplingOptions::default(),
                    seeds: Vec::new(),
                    drafts: Vec::new(),
                },
                growth,
            );
        }
        self.streams = waiting;
    }

    /// Tokens a whole pass may hold to end within `pass_target`, from the measured cost of
    /// recent passes; `None` when passes are sized by tokens only (or none was measured yet).
    fn timed_pass_tokens(&self) -> Option<usize> {
        let target = match self.settings.pass_target {
            PassTarget::Off => return None,
            PassTarget::Fixed(d) => d.as_secs_f64(),
            PassTarget::Auto => AUTO_PASS_MULTIPLE * self.pass_clock.seconds_for(1)?,
        };
        self.pass_clock.tokens_within(target)
    }

    /// Most tokens of catch-up one session gets in a pass: `prefill_chunk`, or fewer where a
    /// pass of that many would overrun `pass_target`.
    pub(super) fn catch_up_chunk(&self) -> usize {
        let chunk = self.settings.prefill_chunk.max(1);
        self.timed_pass_tokens()
            .map_or(chunk, |t| t.clamp(MIN_CATCH_UP_TOKENS.min(chunk), chunk))
    }

    /// Adds chunks of the sessions catching up to `plan`, round robin, in the room left in
    /// its token budget and its time budget (at least one [`catch_up_chunk`](Self::catch_up_chunk)
    /// in all, so that catching up never starves). A session whose context is in hands its
    /// waiting `Verify` to the next pass.
    pub(super) fn plan_catch_ups(&mut self, plan: &mut Plan) {
        let (full, chunk) = (self.settings.prefill_chunk.max(1), self.catch_up_chunk());
        self.plan_extends(plan, full);
        let room = match self.timed_pass_tokens() {
            Some(total) => total.saturating_sub(plan.tokens).min(plan.room()),
            None => plan.room(),
        };
        // At least a chunk whatever the token and time budgets, within the memory budget but
        // never under `MIN_CATCH_UP_TOKENS`: catching up never stops.
        let floor = MIN_CATCH_UP_TOKENS.min(chunk);
        let mut allowance = room.max(chunk).min(plan.room_in_memory().max(floor));
        let mut waiting = std::collections::VecDeque::new();
        while let Some(key) = self.catching_up.pop_front() {
            if plan.has(key) || allowance == 0 {
                waiting.push_back(key);
                continue;
            }
            // Closed: nothing to do.
            let Some(entry) = self.sessions.get_mut(&key) else {
                continue;
            };
            // The device stopped waiting (timed out, reset the stream, lost the connection);
            // it will start over with a resync or a new session.
            if entry.deferred.as_ref().is_some_and(|(_, r)| r.is_closed()) {
                entry.deferred = None;
                continue;
            }
            if entry.llm.is_none() {
                if let Some((_, reply)) = entry.deferred.take() {
                    let _ = reply.send(Err(evicted()));
                }
                continue;
            }
            // The attention bound is the whole chunk's: a time-cut chunk is not cut twice.
            let n = catch_up_len(entry, full).min(chunk).min(allowance);
            if n == 0 {
                entry.prefilling = false;
                if let Some(deferred) = entry.deferred.take() {
                    self.ready.push_back((key, deferred.0, deferred.1));
                }
                continue;
            }
            allowance -= n;
            let growth = grows(entry, n);
            plan.push(Row::catch_up(key, entry.pending[..n].to_vec()), growth);
        }
        self.catching_up = waiting;
    }

    /// Adds the tokens generating devices sent ahead (`Extend`) to `plan`, before any prompt:
    /// they are as latency-critical as a `Verify`'s own skipped tokens (its next `Verify` waits
    /// for them), so they take up to a whole chunk each in the pass's token budget, not only
    /// what the pass target leaves. Sessions still prefilling a prompt, or holding a `Verify`
    /// that waits for a long catch-up, stay in the queue for [`plan_catch_ups`](Self::plan_catch_ups).
    fn plan_extends(&mut self, plan: &mut Plan, full: usize) {
        let mut rest = std::collections::VecDeque::new();
        while let Some(key) = self.catching_up.pop_front() {
            let entry = self.sessions.get(&key).filter(|e| {
                e.llm.is_some() && !e.prefilling && e.deferred.is_none() && !plan.has(key)
            });
            match entry.map(|e| (e, catch_up_len(e, full).min(plan.room()))) {
                Some((e, n)) if n > 0 => {
                    plan.push(Row::catch_up(key, e.pending[..n].to_vec()), grows(e, n))
                }
                _ => rest.push_back(key),
            }
        }
        self.catching_up = rest;
    }

    /// Each session's share of a pass (the tokens one holds over `sessions` with work), sent
    /// in every `Verdict` as the drafting window the device should keep: at a saturated
    /// server the tokens a device drafts ahead and loses to a rejection take a pass that all
    /// devices wait for (docs/RELIABILITY.md run 10: 2.4 tokens scored per token generated
    /// under the devices' own windows, p95 1.8 s).
    ///
    /// An automatic pass target bounds what catch-up adds to a pass, not the `Verify` rows
    /// (they always go in): the share is then of the token budget, so that pipelining still
    /// hides the round trip where passes are cheap in time and dear in tokens (a CPU).
    pub(super) fn drafting_window(&self, sessions: usize) -> u16 {
        let timed = match self.settings.pass_target {
            PassTarget::Fixed(_) => self.timed_pass_tokens(),
            PassTarget::Auto | PassTarget::Off => None,
        };
        let pass = timed.map_or(self.settings.max_batch_tokens, |t| {
            t.min(self.settings.max_batch_tokens)
        });
        u16::try_from(pass / sessions.max(1)).unwrap_or(u16::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_up_chunks_shrink_deep_in_a_long_context() {
        let chunk = 128;
        let budget = chunk * (chunk + FULL_CHUNK_CONTEXT);
        assert_eq!(chunk_at(0, chunk), chunk);
        assert_eq!(chunk_at(FULL_CHUNK_CONTEXT, chunk), chunk);
        assert_eq!(chunk_at(4000, chunk), 36);
        assert_eq!(chunk_at(usize::MAX / 4, chunk), 1, "always progresses");
        let mut last = chunk;
        for cached in (0..50_000).step_by(97) {
            let n = chunk_at(cached, chunk);
            assert!(n <= last, "never grows with the context");
            assert!(n == 1 || n * (cached + n) <= budget);
            // The largest that fits: one more would exceed the budget or the chunk.
            assert!(n == chunk || (n + 1) * (cached + n + 1) > budget);
            last = n;
        }
    }
}
