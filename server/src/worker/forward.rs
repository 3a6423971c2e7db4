//! One forward pass for every session with work: continuous batching.
//!
//! Each turn the worker plans a [`Plan`]: the `Verify`s queued (each session's skipped tokens
//! and the positions to decide: one, or a chain of drafts verified in order), one token for
//! every running generation, and chunks of the sessions catching up on a context, as many as
//! fit in `max_batch` sessions and `max_batch_tokens` tokens. The engine then scores them in
//! one pass ([`Engine::score`]: the embedded runtime runs every weight matmul once over all
//! their rows, attention per session against its own cache; llama-server gets every request at
//! once), and what it reports at the rows each session asks for answers it
//! ([`super::decide`]). What does not fit waits for the next turn, first in line. Catch-ups
//! get a chunk per pass (cut to `pass_target`: by default twice a one-token pass) however busy
//! the worker is (over the token budget if need be): with a quarter of a chunk, 64 busy
//! devices left four 4,096-token prompts 100 s from their first token in the fault campaign. No short request waits behind more than one pass. Every `Verdict` tells
//! its device how far ahead to draft: its share of a pass, so that a saturated server is not
//! filled with drafts thrown away behind rejections.
//!
//! Batching changes no result: the embedded runtime's kernels are batch-invariant, so every session
//! gets bit for bit the logits it would get alone. If the batched pass fails (a model error or
//! a panic), each session is scored alone to find the one that failed: only its request fails.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use super::decide::{Position, engine_seed};
use super::{Entry, GenEvent, SessionKey, Streaming, VerdictReply, Worker, engine_failure, fail};
use crate::config::{AUTO_PASS_MULTIPLE, PassTarget};
use crate::engine::{Engine, EngineSession, ScoreItem, Target, Wanted};
use uhlm_core::protocol::{
    Acceptance, ErrorCode, ErrorMessage, FinishReason, Link, Verdict, Verify,
};
use uhlm_core::sampling::SamplingOptions;

/// What the next forward pass computes.
pub(super) struct Plan {
    rows: Vec<Row>,
    tokens: usize,
    keys: HashSet<SessionKey>,
    max_rows: usize,
    max_tokens: usize,
}

/// One session's share of a forward pass.
struct Row {
    key: SessionKey,
    /// New tokens for the session's cache.
    tokens: Vec<u32>,
    /// Positions of `tokens` whose logits the work needs; empty: the last one's.
    outputs: Vec<usize>,
    work: Work,
    /// The session's sampling and, per wanted row, the seed of the engine's own draw there
    /// (for engines that sample; set when the pass runs).
    sampling: SamplingOptions,
    seeds: Vec<u32>,
    /// Per wanted row, the device's draft there (empty: none), for engines asked about it.
    drafts: Vec<Option<u32>>,
}

impl Row {
    fn wanted(&self) -> Wanted<'_> {
        if matches!(self.work, Work::CatchUp) {
            Wanted::Nothing
        } else if self.outputs.is_empty() {
            Wanted::Last
        } else {
            Wanted::Rows(&self.outputs)
        }
    }

    /// The context length at each wanted row, for a session holding `cached` tokens.
    fn ends(&self, cached: usize) -> Vec<usize> {
        match self.wanted() {
            Wanted::Nothing => Vec::new(),
            Wanted::Last => vec![cached + self.tokens.len()],
            Wanted::Rows(rows) => rows.iter().map(|r| cached + r + 1).collect(),
        }
    }

    fn item<'a, S>(&'a self, session: &'a mut S) -> ScoreItem<'a, S> {
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
enum Work {
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

/// How scoring one row went.
enum Scored {
    /// The rows the work asked for.
    Targets(Vec<Target>),
    Failed(ErrorMessage),
    /// The model panicked on this session: it is dropped.
    Panicked,
}

impl Plan {
    pub(super) fn new(max_rows: usize, max_tokens: usize) -> Self {
        Self {
            rows: Vec::new(),
            tokens: 0,
            keys: HashSet::new(),
            max_rows: max_rows.max(1),
            max_tokens: max_tokens.max(1),
        }
    }

    /// Whether `key` already has a row (a session gets one row per pass).
    pub(super) fn has(&self, key: SessionKey) -> bool {
        self.keys.contains(&key)
    }

    /// Whether a row of `n` tokens fits; the first row always does.
    fn fits(&self, n: usize) -> bool {
        self.rows.is_empty()
            || (self.rows.len() < self.max_rows && self.tokens + n <= self.max_tokens)
    }

    /// Tokens still free in this pass's budget.
    fn room(&self) -> usize {
        if self.rows.len() >= self.max_rows {
            0
        } else {
            self.max_tokens.saturating_sub(self.tokens)
        }
    }

    fn push(&mut self, row: Row) {
        self.tokens += row.tokens.len();
        self.keys.insert(row.key);
        self.rows.push(row);
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
        let first = pending + verify.skipped.len();
        let mut total = first;
        let keep = verify
            .chain
            .iter()
            .take_while(|link| {
                total += 1 + link.skipped.len();
                total <= chunk.max(first)
            })
            .count();
        let rest = verify.split_chain(keep);
        q.truncate(1 + keep);
        let inputs = verify.inputs();
        if !plan.fits(pending + inputs.len()) {
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
        plan.push(Row {
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
        });
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
            if !plan.fits(entry.pending.len()) {
                waiting.push_back(s);
                continue;
            }
            // The same steps as a `Verify` without a draft: score what is not cached yet (the
            // prompt's last token, then each sampled one), sample with the session's RNG.
            let tokens = std::mem::take(&mut entry.pending);
            plan.push(Row {
                key: s.key,
                tokens,
                outputs: Vec::new(),
                work: Work::Generate(s),
                sampling: SamplingOptions::default(),
                seeds: Vec::new(),
                drafts: Vec::new(),
            });
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
        let mut allowance = room.max(chunk);
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
            // All but the last pending token: the Verify (or the next one) scores that one.
            let cached = entry.llm.as_ref().map_or(0, EngineSession::len);
            let n = entry
                .pending
                .len()
                .saturating_sub(1)
                // The attention bound is the whole chunk's: a time-cut chunk is not cut twice.
                .min(chunk_at(cached, full).min(chunk))
                .min(allowance);
            if n == 0 {
                entry.prefilling = false;
                if let Some(deferred) = entry.deferred.take() {
                    self.ready.push_back((key, deferred.0, deferred.1));
                }
                continue;
            }
            allowance -= n;
            plan.push(Row {
                key,
                tokens: entry.pending[..n].to_vec(),
                outputs: Vec::new(),
                work: Work::CatchUp,
                sampling: SamplingOptions::default(),
                seeds: Vec::new(),
                drafts: Vec::new(),
            });
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
            let room = plan.room();
            let n = match self.sessions.get(&key) {
                Some(e) if !e.prefilling && e.deferred.is_none() && !plan.has(key) => {
                    let cached = e.llm.as_ref().map_or(0, EngineSession::len);
                    // All but the last pending token: the Verify scores that one.
                    e.pending
                        .len()
                        .saturating_sub(1)
                        .min(chunk_at(cached, full))
                        .min(room)
                }
                _ => 0,
            };
            let Some(entry) = self.sessions.get(&key).filter(|e| n > 0 && e.llm.is_some()) else {
                rest.push_back(key);
                continue;
            };
            plan.push(Row {
                key,
                tokens: entry.pending[..n].to_vec(),
                outputs: Vec::new(),
                work: Work::CatchUp,
                sampling: SamplingOptions::default(),
                seeds: Vec::new(),
                drafts: Vec::new(),
            });
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

    /// Runs `plan` as one forward pass and answers every row.
    pub(super) fn run_plan(&mut self, mut plan: Plan) {
        if plan.rows.is_empty() {
            return;
        }
        self.metrics.batch_size.observe(plan.rows.len() as f64);
        self.metrics.forward_passes.inc();
        self.metrics.forward_tokens.inc_by(plan.tokens as u64);
        let started = Instant::now();
        let mut sessions: Vec<Option<E::Session>> = plan
            .rows
            .iter()
            .map(|r| self.sessions.get_mut(&r.key).and_then(|e| e.llm.take()))
            .collect();
        for (row, session) in plan.rows.iter_mut().zip(&sessions) {
            if let (Some(entry), Some(session)) = (self.sessions.get(&row.key), session) {
                let session_seed = entry.rng.get_seed();
                row.seeds = row
                    .ends(session.len())
                    .into_iter()
                    .map(|end| engine_seed(session_seed, end, 0))
                    .collect();
                row.sampling = entry.sampling.clone();
            }
        }
        let scored = score_rows(&*self.engine, &mut sessions, &plan.rows);
        let seconds = started.elapsed().as_secs_f64();
        self.pass_clock.record(plan.tokens, seconds);
        self.metrics.forward_seconds.observe(seconds);
        for ((row, session), scored) in plan.rows.into_iter().zip(sessions).zip(scored) {
            if matches!(scored, Scored::Panicked) {
                tracing::error!(key = row.key, "the model panicked; dropping the session");
                if self.sessions.remove(&row.key).is_some() {
                    self.metrics.sessions.dec();
                }
            } else if let (Some(entry), Some(session)) = (self.sessions.get_mut(&row.key), session)
            {
                entry.llm = Some(session);
            }
            self.finish_row(row, scored);
        }
    }

    fn finish_row(&mut self, row: Row, scored: Scored) {
        let Row {
            key, tokens, work, ..
        } = row;
        let failure = match scored {
            Scored::Targets(targets) => {
                match work {
                    Work::Verify {
                        verify,
                        q,
                        pending,
                        mut reply,
                        rest,
                    } => {
                        let r = self.finish_verify(key, &verify, q, tokens, pending, targets);
                        match r {
                            // Every link of this part accepted: the next part in a later pass.
                            Ok(v) if v.accepted && !rest.is_empty() => {
                                reply.earlier.extend(v.accepted_links);
                                reply.earlier.push(Acceptance {
                                    beta: v.beta,
                                    tv_distance: v.tv_distance,
                                });
                                let Some(next) = verify.continuation(rest) else {
                                    let e = fail(ErrorCode::Internal, "a chain's part is lost");
                                    let _ = reply.send(Err(e));
                                    return;
                                };
                                if let Some(ready) = self.defer_verify(key, next, reply) {
                                    self.ready.push_front((key, ready.0, ready.1));
                                }
                            }
                            r => {
                                let _ = reply.send(r);
                            }
                        }
                    }
                    Work::Generate(mut s) => {
                        match self.finish_generation(&mut s, tokens, targets) {
                            Ok(None) => self.streams.push_back(s),
                            Ok(Some(_)) => {}
                            Err(e) => {
                                let _ = s.events.send(GenEvent::Failed(e));
                            }
                        }
                    }
                    Work::CatchUp => self.finish_catch_up(key, tokens.len()),
                }
                return;
            }
            Scored::Failed(e) => e,
            Scored::Panicked => fail(ErrorCode::Internal, "the model failed on this request"),
        };
        // Nothing was appended: the tokens stay pending, as before the request.
        let restore = |worker: &mut Self, n: usize| {
            if let Some(entry) = worker.sessions.get_mut(&key) {
                let mut tokens = tokens;
                tokens.truncate(n);
                tokens.append(&mut entry.pending);
                entry.pending = tokens;
            }
        };
        match work {
            Work::Verify { pending, reply, .. } => {
                restore(self, pending);
                let _ = reply.send(Err(failure));
            }
            Work::Generate(s) => {
                restore(self, usize::MAX);
                let _ = s.events.send(GenEvent::Failed(failure));
            }
            Work::CatchUp => {
                tracing::debug!(key, ?failure, "catch-up failed");
                // Without a waiting Verify the tokens stay pending, and the next Verify meets
                // the error itself.
                if let Some((_, reply)) =
                    self.sessions.get_mut(&key).and_then(|e| e.deferred.take())
                {
                    let _ = reply.send(Err(failure));
                }
            }
        }
    }

    /// Decides the token at `v.position` from the LLM's target there, and for a chain each
    /// link in turn from its row, up to the first rejection (the standard sequential
    /// speculative-sampling rule): the cache then ends before the decided position.
    fn finish_verify(
        &mut self,
        key: SessionKey,
        v: &Verify,
        q: Vec<Option<Vec<f32>>>,
        tokens: Vec<u32>,
        pending: usize,
        targets: Vec<Target>,
    ) -> Result<Verdict, ErrorMessage> {
        let clock = self.clock;
        let engine = self.engine.clone();
        let entry = self
            .sessions
            .get_mut(&key)
            .ok_or_else(|| fail(ErrorCode::Internal, "the session vanished"))?;
        let undo = |entry: &mut Entry<E::Session>, mut tokens: Vec<u32>| {
            if let Some(llm) = entry.llm.as_mut() {
                llm.truncate(llm.len() - tokens.len());
            }
            tokens.truncate(pending);
            entry.pending = tokens;
        };
        let positions = v.positions().unwrap_or_default();
        let mut drafts = v.drafts();
        let rows = q.len().max(1);
        if targets.len() != rows || positions.len() != rows {
            undo(entry, tokens);
            return Err(fail(ErrorCode::Internal, "the model returned too few rows"));
        }
        let mut accepted_links = Vec::new();
        let mut decided = None;
        for (i, (q, target)) in q.iter().zip(targets).enumerate() {
            // Without a draft there is one position and nothing to verify (`Verify::check`).
            let draft = drafts.next();
            let Some(session) = entry.llm.as_ref() else {
                return Err(fail(ErrorCode::Internal, "the session lost its cache"));
            };
            let position = Position {
                engine: &*engine,
                session,
                sampling: &entry.sampling,
                len: positions[i] as usize,
                draft: match (draft, q) {
                    (Some(d), Some(q)) => Some((d.token, q.as_slice())),
                    _ => None,
                },
            };
            let decision =
                position.decide(target, &mut entry.rng, &mut self.probs, &mut self.scratch);
            let r = match decision {
                Ok(r) => r,
                Err(e) => {
                    undo(entry, tokens);
                    return Err(e);
                }
            };
            let verdict = Verdict {
                seq: v.seq,
                token: r.token,
                accepted: r.accepted,
                beta: r.beta,
                tv_distance: r.tv_distance,
                accepted_links: Vec::new(),
                window: None,
            };
            if verdict.accepted && i + 1 < rows {
                accepted_links.push(Acceptance {
                    beta: verdict.beta,
                    tv_distance: verdict.tv_distance,
                });
                continue;
            }
            decided = Some((i, verdict));
            break;
        }
        let Some((link, mut verdict)) = decided else {
            undo(entry, tokens);
            return Err(fail(ErrorCode::Internal, "no position was decided"));
        };
        verdict.accepted_links = accepted_links;
        verdict.window = Some(self.window);
        self.metrics.drafting_window.observe(f64::from(self.window));
        // What was scored after the decided position (a rejected chain's tail) leaves the cache.
        if let Some(llm) = entry.llm.as_mut() {
            llm.truncate(positions[link] as usize);
        }
        entry.pending = vec![verdict.token];
        entry.last_used = clock;
        let links = link as u64 + 1;
        self.metrics.tokens_verified.inc_by(links);
        let local = v.skipped.len() + v.chain.iter().map(|l| l.skipped.len()).sum::<usize>();
        self.metrics.catchup_tokens.inc_by(local as u64);
        self.metrics.tokens_accepted.inc_by(link as u64);
        if verdict.accepted {
            self.metrics.tokens_accepted.inc();
        } else {
            self.metrics.tokens_resampled.inc();
        }
        Ok(verdict)
    }

    /// Samples and streams a generation's next token: `Some(reason)` once it is over
    /// (`Finished` already sent).
    fn finish_generation(
        &mut self,
        s: &mut Streaming,
        tokens: Vec<u32>,
        targets: Vec<Target>,
    ) -> Result<Option<FinishReason>, ErrorMessage> {
        let max_context = self.settings.max_context_tokens;
        let clock = self.clock;
        let engine = self.engine.clone();
        let entry = self
            .sessions
            .get_mut(&s.key)
            .ok_or_else(|| fail(ErrorCode::Internal, "the session vanished"))?;
        let Some(session) = entry.llm.as_ref() else {
            return Err(fail(ErrorCode::Internal, "the session lost its cache"));
        };
        let len = session.len();
        let decided = match targets.into_iter().next() {
            Some(target) => Position {
                engine: &*engine,
                session,
                sampling: &entry.sampling,
                len,
                draft: None,
            }
            .decide(target, &mut entry.rng, &mut self.probs, &mut self.scratch),
            None => Err(fail(ErrorCode::Internal, "the model returned no row")),
        };
        let token = match decided {
            Ok(v) => v.token,
            Err(e) => {
                if let Some(llm) = entry.llm.as_mut() {
                    llm.truncate(len - tokens.len());
                }
                entry.pending = tokens;
                return Err(e);
            }
        };
        entry.pending = vec![token];
        entry.last_used = clock;
        let len = len + 1;
        self.metrics.tokens_generated.inc();
        s.left -= 1;
        let _ = s.events.send(GenEvent::Token(token));
        let reason = if self.eos.contains(&token) {
            FinishReason::Eos
        } else if s.left == 0 {
            FinishReason::MaxTokens
        } else if len >= max_context {
            FinishReason::ContextFull
        } else {
            return Ok(None);
        };
        let _ = s.events.send(finished(reason, len));
        Ok(Some(reason))
    }

    /// Drops the `n` pending tokens a catch-up chunk scored; queues the session again while
    /// more is left, else hands its waiting `Verify` to the next pass.
    fn finish_catch_up(&mut self, key: SessionKey, n: usize) {
        let Some(entry) = self.sessions.get_mut(&key) else {
            return;
        };
        entry.pending.drain(..n);
        self.metrics.prefilled_tokens.inc_by(n as u64);
        if entry.pending.len() > 1 {
            self.catching_up.push_back(key);
            return;
        }
        entry.prefilling = false;
        if let Some((verify, reply)) = entry.deferred.take() {
            self.ready.push_back((key, verify, reply));
        }
    }
}

/// Scores every row in one pass; if that fails, each row alone, so that only the failing
/// session's request fails. A row whose session is gone (closed while planned) fails alone.
fn score_rows<E: Engine>(
    engine: &E,
    sessions: &mut [Option<E::Session>],
    rows: &[Row],
) -> Vec<Scored> {
    let present = sessions.iter().filter(|s| s.is_some()).count();
    if present > 1 {
        let batched = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut items: Vec<ScoreItem<'_, E::Session>> = sessions
                .iter_mut()
                .zip(rows)
                .filter_map(|(s, r)| Some(r.item(s.as_mut()?)))
                .collect();
            engine.score(&mut items)
        }));
        if let Ok(Ok(targets)) = batched {
            // One result per present session, in order: an absent one takes none (an eager
            // `Option::and(targets.next())` here handed every later row its neighbour's).
            let mut targets = targets.into_iter();
            return sessions
                .iter()
                .map(|s| match s.as_ref().map(|_| targets.next()) {
                    Some(Some(t)) => Scored::Targets(t),
                    Some(None) => Scored::Failed(fail(
                        ErrorCode::Internal,
                        "the model returned too few results",
                    )),
                    None => Scored::Failed(gone()),
                })
                .collect();
        }
    }
    sessions
        .iter_mut()
        .zip(rows)
        .map(|(session, row)| {
            let Some(session) = session.as_mut() else {
                return Scored::Failed(gone());
            };
            let alone = || {
                let mut item = [row.item(session)];
                engine.score(&mut item).map(|mut l| l.remove(0))
            };
            match std::panic::catch_unwind(AssertUnwindSafe(alone)) {
                Ok(Ok(targets)) => Scored::Targets(targets),
                Ok(Err(e)) => Scored::Failed(engine_failure(e)),
                Err(_) => Scored::Panicked,
            }
        })
        .collect()
}

/// The session's entry, if it exists and still has its cache.
fn live_entry<S>(entry: Option<&mut Entry<S>>) -> Result<&mut Entry<S>, ErrorMessage> {
    let entry = entry.ok_or_else(gone)?;
    if entry.llm.is_none() {
        return Err(evicted());
    }
    Ok(entry)
}

fn gone() -> ErrorMessage {
    fail(
        ErrorCode::NeedResync,
        "the server has no context for this session",
    )
}

fn evicted() -> ErrorMessage {
    fail(
        ErrorCode::NeedResync,
        "this session's cache was evicted to free memory; resend the context",
    )
}

fn finished(reason: FinishReason, len: usize) -> GenEvent {
    GenEvent::Finished {
        reason,
        context_len: u32::try_from(len).unwrap_or(u32::MAX),
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
