//! Running a planned forward pass and answering every row: continuous batching.
//!
//! The engine scores every row of a [`Plan`] in one pass ([`Engine::score`]: the embedded
//! runtime runs every weight matmul once over all their rows, attention per session against its
//! own cache; llama-server gets every request at once), and what it reports at the rows each
//! session asks for answers it ([`super::decide`]).
//!
//! Batching changes no result: the embedded runtime's kernels are batch-invariant, so every session
//! gets bit for bit the logits it would get alone. If the batched pass fails (a model error or
//! a panic), each session is scored alone to find the one that failed: only its request fails.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use super::decide::{Position, engine_seed};
use super::plan::{Plan, Row, Work};
use super::{Entry, GenEvent, SessionKey, Streaming, Worker, engine_failure, fail, finished, gone};
use crate::engine::{Engine, EngineSession, ScoreItem, Target};
use uhlm_core::protocol::{Acceptance, ErrorCode, ErrorMessage, FinishReason, Verdict, Verify};

/// How scoring one row went.
enum Scored {
    /// The rows the work asked for.
    Targets(Vec<Target>),
    Failed(ErrorMessage),
    /// The model panicked on this session: it is dropped.
    Panicked,
}

impl<E: Engine> Worker<E> {
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
        // Whatever the prompt was, it is in: what comes next is a generating device's.
        entry.prefilling = false;
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
        entry.prefilling = false;
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
