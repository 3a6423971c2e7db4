//! One generation: the pipelined hybrid loop, drafting, and what becomes final.
//!
//! Per token: the SLM drafts `d ~ q'` and scores its uncertainty `u` (blocking thread); the
//! policy skips (a local token) or marks it for verification. Drafts to verify go to the server
//! as a chain `Verify`: every one drafted since the last request, with the local tokens between
//! them; between requests, local tokens go ahead once `EngineConfig::extend_after` of them
//! wait (`Extend`), so that the server scores them while the SLM drafts ([`chain`]). While a
//! chain is in flight the SLM keeps drafting on the assumption that it is accepted, up to a
//! lookahead sized to the round trip ([`uhlm_core::lookahead`]); the `Verdict` settles the
//! chain up to its first rejection, and what was drafted after a rejected token is dropped (the
//! SLM rolls back and takes the server's token). Only final tokens are emitted, so nothing
//! shown is ever revised. When the link is down, tokens that would have been sent keep their
//! draft and are marked `Offline`; as soon as a background reconnect succeeds, a new session
//! starts from the full context and the loop is hybrid again ([`server_session`]).
//!
//! [`Mode::Llm`] is the LLM-only baseline as a user would run it ([`llm_stream`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uhlm_core::codec::Codec;
use uhlm_core::lookahead::{Lookahead, LookaheadLimit, Settled, Uplink};
use uhlm_core::protocol::{self, Message};
use uhlm_core::sampling::SamplingOptions;
use uhlm_core::threshold::Decision;
use uhlm_core::uncertainty::combined::LogisticCombiner;

use crate::cancel::CancelToken;
use crate::config::{GenerationOptions, Mode, Prompt};
use crate::drafter::{Drafted, Drafter};
use crate::error::SdkError;
use crate::events::{GenerationSummary, StopReason, TokenEvent, TokenListener, TokenSource};
use crate::shared::Inner;
use crate::stats::StatsAccumulator;
use crate::text::TextStream;

mod chain;
mod llm_stream;
mod server_session;
mod session_link;

use session_link::{SessionLink, Wait, recv_until};

/// What the device keeps with each drafted token until it is final.
#[derive(Clone, Debug)]
struct Kept {
    uncertainty: f32,
    decision: Decision,
    /// A combined predictor's separate signals (what its policy refits from).
    signals: Vec<f32>,
}

/// What the SLM must do before its next draft, so that it continues the window.
#[derive(Default)]
struct SlmCursor {
    /// Roll back to this many tokens (after a rejection).
    truncate: Option<usize>,
    /// Then append this token (the last drafted one, or the server's after a rejection).
    feed: Option<u32>,
    /// Refitted weights of a combined uncertainty predictor.
    combiner: Option<LogisticCombiner>,
}

pub(crate) async fn run(
    inner: Arc<Inner>,
    prompt: Prompt,
    options: GenerationOptions,
    listener: Arc<dyn TokenListener>,
    cancel: CancelToken,
) -> Result<GenerationSummary, SdkError> {
    let _busy = inner.busy.lock().await;
    options
        .sampling
        .validate()
        .map_err(|e| SdkError::InvalidConfig(format!("sampling: {e}")))?;
    let mut sampling = options.sampling.clone();
    let seed = sampling.seed.unwrap_or_else(rand::random);
    sampling.seed = Some(seed);
    let prompt_ids = inner.render(&prompt, options.chat_template)?;
    let mode = inner.config.mode;
    let codec = matches!(mode, Mode::Uhlm | Mode::Hlm).then(|| inner.config.codec.clone());
    let mut g = Generation {
        codec,
        inner: inner.clone(),
        listener,
        cancel,
        mode,
        sampling,
        prompt_len: prompt_ids.len(),
        context: prompt_ids,
        window: Lookahead::new(),
        limit: lock(&inner.lookahead).clone(),
        slm: SlmCursor::default(),
        rollbacks: 0,
        unapplied_draft: None,
        pending_unverified: false,
        chain_sent: None,
        chain_deadline: None,
        resyncs: 0,
        seq: 0,
        link: None,
        online: false,
        retry_at: None,
        stats: StatsAccumulator::default(),
        eos: inner.model.tokenizer().eos_ids().to_vec(),
        last_verify: None,
    };
    let started = Instant::now();
    let result = g.run_loop(seed).await;
    let reason = match &result {
        Ok(_) => "done",
        Err(SdkError::Cancelled) => "cancelled",
        Err(_) => "error",
    };
    g.close_session(reason).await;
    *lock(&inner.lookahead) = g.limit.clone();
    g.stats.add_elapsed(started.elapsed());
    g.stats.counters.generations = 1;
    if let Ok(mut total) = inner.stats.lock() {
        total.merge(&g.stats);
    }
    let mut summary = result?;
    summary.stats = g.stats.snapshot();
    Ok(summary)
}

struct Generation {
    inner: Arc<Inner>,
    /// The uplink encoding drafts are sampled from (`None`: modes that send no draft).
    codec: Option<Codec>,
    listener: Arc<dyn TokenListener>,
    cancel: CancelToken,
    mode: Mode,
    sampling: SamplingOptions,
    /// Prompt plus every final token: what a (re)started server session is given.
    context: Vec<u32>,
    /// How much of `context` is the prompt.
    prompt_len: usize,
    /// Drafted tokens the server has not been given: final local ones, and the speculative
    /// ones after the first unverified draft.
    window: Lookahead<Kept>,
    /// How far ahead of the final tokens the device drafts.
    limit: LookaheadLimit,
    slm: SlmCursor,
    /// Rejections so far: a draft that started before one is dropped.
    rollbacks: u64,
    /// A draft that finished after the chain's reply arrived, with `rollbacks` at that time.
    unapplied_draft: Option<(Drafted, u64)>,
    /// Drafts wait to be settled unverified (no session, or it was just lost).
    pending_unverified: bool,
    /// When the chain in flight was sent, and when its answer is overdue.
    chain_sent: Option<Instant>,
    chain_deadline: Option<Instant>,
    /// Resyncs since the last verdict: the server keeps losing the context after two.
    resyncs: u32,
    seq: u32,
    link: Option<SessionLink>,
    /// Whether the last link news given to the listener was "online".
    online: bool,
    /// No new session before this time (after a failed session start on a live connection).
    retry_at: Option<Instant>,
    stats: StatsAccumulator,
    /// End-of-sequence ids of the tokenizer: deciding one ends the generation.
    eos: Vec<u32>,
    /// The round trip of the last `Verdict`, given to the token it decided.
    last_verify: Option<Duration>,
}

/// What a generation has shown so far.
struct Output {
    text: TextStream,
    token_ids: Vec<u32>,
    sources: Vec<TokenSource>,
}

/// How a stretch of server-streamed generation ended.
enum Streamed {
    /// The generation is over.
    Done(StopReason),
    /// The link failed or the server asked to back off; the session is dropped and the
    /// generation continues on the device.
    Offline,
}

impl Generation {
    async fn run_loop(&mut self, seed: u64) -> Result<GenerationSummary, SdkError> {
        let prompt_tokens = self.context.len() as u32;
        if self.mode.uses_server() {
            match self.inner.link.get().await {
                Ok(conn) => self.open_session(conn, false).await?,
                Err(e) if e.is_fatal_for_connection() => return Err(e),
                Err(e) => self.went_offline(format!("{e}")),
            }
        }
        let context_limit = {
            let d = lock(&self.inner.drafter);
            d.context_length()
        };
        let mut out = Output {
            text: TextStream::new(&self.sampling.stop),
            token_ids: Vec::new(),
            sources: Vec::new(),
        };
        // Whether the SLM has scored the whole context. It starts after the session is open,
        // so that its prefill runs while the server scores the same prompt; LLM-only mode
        // starts it only if it has to take over.
        let mut slm_ready = false;
        let mut stop = 'generation: loop {
            if self.cancel.is_cancelled() {
                return Err(SdkError::Cancelled);
            }
            let mut settled = self.window.take_final();
            if std::mem::take(&mut self.pending_unverified) {
                settled.extend(self.window.settle_unverified());
            }
            for s in settled {
                if let Some(stop) = self.settle(&mut out, s, None)? {
                    break 'generation stop;
                }
            }
            if self.link.is_none() {
                // Nobody will send them: a new session starts from the whole context.
                self.window.drop_final();
            } else {
                self.send_extend().await;
            }
            let speculative = self.window.speculative();
            if out.token_ids.len() as u32 >= self.sampling.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.context.len() >= context_limit {
                break StopReason::ContextFull;
            }
            let may_retry = self.retry_at.is_none_or(|t| Instant::now() >= t);
            if self.mode.uses_server()
                && self.link.is_none()
                && may_retry
                && let Some(conn) = self.inner.link.poll(&self.inner.rt)
            {
                self.open_session(conn, true).await?;
            }
            if self.mode == Mode::Llm && self.link.is_some() {
                match self.stream_remote(&mut out, context_limit).await? {
                    Streamed::Done(stop) => break stop,
                    Streamed::Offline => {
                        slm_ready = false;
                        continue;
                    }
                }
            }
            if !slm_ready {
                self.catch_up(seed).await?;
                slm_ready = true;
                self.slm.feed = None;
                self.slm.truncate = None;
            }
            if self.link.is_some() && !self.window.in_flight() && self.window.links() > 0 {
                if !self.send_chain().await? {
                    self.pending_unverified = true;
                }
                continue;
            }
            // Draft ahead while a chain is in flight: up to the limits (tokens, context, the
            // lookahead), and never past an end-of-sequence draft.
            let drafted = out.token_ids.len() + speculative;
            let eos_pending = speculative > 0
                && self
                    .window
                    .unsent()
                    .last()
                    .is_some_and(|e| self.eos.contains(&e.token));
            let may_draft = drafted < self.sampling.max_tokens as usize
                && self.context.len() + speculative < context_limit
                && !eos_pending
                && (speculative == 0 || speculative < self.limit.limit());
            if !self.window.in_flight() {
                if !may_draft {
                    // Nothing to wait for: what is left is final as drafted.
                    for s in self.window.settle_unverified() {
                        if let Some(stop) = self.settle(&mut out, s, None)? {
                            break 'generation stop;
                        }
                    }
                    continue;
                }
                let drafted = self.draft().await?;
                self.on_drafted(drafted);
                continue;
            }
            let reply = if may_draft {
                self.draft_while_waiting().await?
            } else {
                self.wait_verdict().await
            };
            if let Some(reply) = reply
                && let Some(stop) = self.on_reply(&mut out, reply).await?
            {
                break stop;
            }
        };
        let (tail, hit) = out.text.finish();
        if hit {
            stop = StopReason::StopString;
        }
        if !tail.is_empty() {
            self.listener.on_tail_text(tail);
        }
        Ok(GenerationSummary {
            text: out.text.text().to_string(),
            token_ids: out.token_ids,
            sources: out.sources,
            stop,
            prompt_tokens,
            seed,
            stats: Default::default(),
        })
    }

    /// Commits a decided token: context, counters, the listener. `Some` ends the generation.
    fn commit(
        &mut self,
        out: &mut Output,
        token: u32,
        source: TokenSource,
        uncertainty: f32,
        verify_ms: Option<f64>,
    ) -> Option<StopReason> {
        self.context.push(token);
        if self.eos.contains(&token) {
            return Some(StopReason::Eos);
        }
        let position = out.token_ids.len() as u32;
        out.token_ids.push(token);
        out.sources.push(source);
        self.stats.counters.generated_tokens += 1;
        let (shown, hit) = out.text.push(self.inner.model.tokenizer(), token);
        self.listener.on_token(TokenEvent {
            text: shown,
            token_id: token,
            position,
            source,
            uncertainty,
            verify_ms,
        });
        hit.then_some(StopReason::StopString)
    }

    /// Commits a token that became final, counting it and teaching the policy from the
    /// server's verdict on it (`verify_ms`: the round trip that verified it). Nothing is shown
    /// after a cancel, even the rest of a verdict's tokens.
    fn settle(
        &mut self,
        out: &mut Output,
        settled: Settled<Kept>,
        verify_ms: Option<f64>,
    ) -> Result<Option<StopReason>, SdkError> {
        if self.cancel.is_cancelled() {
            return Err(SdkError::Cancelled);
        }
        let c = &mut self.stats.counters;
        c.decisions += 1;
        c.drafted += 1;
        let (token, kept, source, beta) = match settled {
            Settled::Local { token, meta } => {
                c.skipped += 1;
                (token, meta, TokenSource::Local, None)
            }
            Settled::Accepted {
                token,
                meta,
                acceptance,
            } => {
                c.sent += 1;
                c.accepted += 1;
                (token, meta, TokenSource::Accepted, Some(acceptance.beta))
            }
            Settled::Resampled {
                token,
                meta,
                acceptance,
                ..
            } => {
                c.sent += 1;
                c.resampled += 1;
                (token, meta, TokenSource::Resampled, Some(acceptance.beta))
            }
            Settled::Unverified { token, meta } => {
                c.offline += 1;
                (token, meta, TokenSource::Offline, None)
            }
        };
        if let (Some(beta), Mode::Uhlm) = (beta, self.mode) {
            let mut policy = lock(&self.inner.policy);
            policy.observe_signals(kept.decision, kept.uncertainty, &kept.signals, beta);
            // The threshold is on the refitted weights' scale from the next draft on.
            if let Some(combiner) = policy.take_combiner_update() {
                self.slm.combiner = Some(combiner);
            }
        }
        let verify_ms = verify_ms.filter(|_| beta.is_some());
        Ok(self.commit(out, token, source, kept.uncertainty, verify_ms))
    }

    /// Prepares the SLM to draft: scores the context it has not seen (the prompt, and in
    /// LLM-only mode every streamed token) in one pass.
    async fn catch_up(&mut self, seed: u64) -> Result<(), SdkError> {
        let (ids, s, codec) = (
            self.context.clone(),
            self.sampling.clone(),
            self.codec.clone(),
        );
        let started = Instant::now();
        let r = blocking(&self.inner.drafter, move |d| d.start(&ids, s, codec, seed)).await;
        self.stats.prefill += started.elapsed();
        r
    }

    /// Drafts the next token on the SLM's thread, first bringing the SLM to the window's end
    /// (a rollback after a rejection, the token to append).
    fn spawn_draft(&mut self) -> tokio::task::JoinHandle<Result<(Drafted, Duration), SdkError>> {
        let d = self.inner.drafter.clone();
        let (truncate, feed, combiner) = (
            self.slm.truncate.take(),
            self.slm.feed.take(),
            self.slm.combiner.take(),
        );
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut d = lock(&d);
            if let Some(combiner) = combiner {
                d.set_combiner(&combiner);
            }
            if let Some(n) = truncate {
                d.truncate(n);
            }
            if let Some(t) = feed {
                d.feed(t)?;
            }
            Ok((d.draft()?, started.elapsed()))
        })
    }

    async fn draft(&mut self) -> Result<Drafted, SdkError> {
        let joined = self.spawn_draft().await;
        self.finish_draft(joined)
    }

    /// A draft task's result, its time counted towards the lookahead.
    fn finish_draft(&mut self, joined: Joined<(Drafted, Duration)>) -> Result<Drafted, SdkError> {
        let (drafted, took) = joined_model(joined)?;
        self.stats.draft += took;
        self.limit.observe_draft(took.as_secs_f64());
        Ok(drafted)
    }

    /// Drafts one token while the chain in flight is out; returns its reply if that came
    /// meanwhile. A draft made before a rejection arrived is dropped (it followed a rejected
    /// token).
    async fn draft_while_waiting(&mut self) -> Result<Option<Result<Message, Wait>>, SdkError> {
        if self.link.is_none() {
            return Ok(None);
        }
        let mut task = self.spawn_draft();
        let reply = {
            let Some(link) = self.link.as_mut() else {
                return Ok(None);
            };
            let deadline = self.chain_deadline.unwrap_or_else(Instant::now);
            let c = &mut self.stats.counters;
            tokio::select! {
                biased;
                r = recv_until(&mut link.stream, &mut c.downlink_bytes, deadline, &self.cancel) => {
                    Some(r)
                }
                d = &mut task => {
                    let drafted = self.finish_draft(d)?;
                    self.on_drafted(drafted);
                    return Ok(None);
                }
            }
        };
        // The reply came first: the draft finishes, and `on_reply` keeps it unless the reply
        // rolled the window back (it followed a rejected token then).
        let before = self.rollbacks;
        let drafted = self.finish_draft(task.await)?;
        self.unapplied_draft = Some((drafted, before));
        Ok(reply)
    }

    /// Waits for the chain in flight's answer (the lookahead is full).
    async fn wait_verdict(&mut self) -> Option<Result<Message, Wait>> {
        let link = self.link.as_mut()?;
        let deadline = self.chain_deadline.unwrap_or_else(Instant::now);
        let started = Instant::now();
        let c = &mut self.stats.counters;
        let reply = recv_until(
            &mut link.stream,
            &mut c.downlink_bytes,
            deadline,
            &self.cancel,
        )
        .await;
        self.stats.wait += started.elapsed();
        Some(reply)
    }

    /// Takes a drafted token into the window: the policy decides whether it is verified.
    fn on_drafted(&mut self, draft: Drafted) {
        let decision = match self.mode {
            Mode::Slm => Decision::Skip,
            Mode::Hlm | Mode::Llm => Decision::Send { probe: false },
            Mode::Uhlm => lock(&self.inner.policy).decide(draft.uncertainty),
        };
        // A mode that sends no distribution (LLM-only, offline here) keeps its draft all the same.
        let uplink = matches!(decision, Decision::Send { .. }).then(|| Uplink {
            draft: protocol::Draft {
                token: draft.token,
                q: draft.q.unwrap_or_default(),
            },
            uncertainty: draft.uncertainty,
        });
        let offline = uplink.is_some() && (self.link.is_none() || self.mode == Mode::Llm);
        let kept = Kept {
            uncertainty: draft.uncertainty,
            decision,
            signals: draft.signals,
        };
        self.window.push(draft.token, kept, uplink);
        self.slm.feed = Some(draft.token);
        if offline {
            self.pending_unverified = true;
        }
    }
}

/// What a blocking model task gives back when joined.
type Joined<T> = Result<Result<T, SdkError>, tokio::task::JoinError>;

/// A joined model task's result; a task that panicked is a model error.
fn joined_model<T>(joined: Joined<T>) -> Result<T, SdkError> {
    joined.map_err(|e| SdkError::Model(format!("the model thread failed: {e}")))?
}

/// Runs SLM work on a blocking thread.
async fn blocking<T: Send + 'static>(
    drafter: &Arc<Mutex<Drafter>>,
    f: impl FnOnce(&mut Drafter) -> Result<T, SdkError> + Send + 'static,
) -> Result<T, SdkError> {
    let d = drafter.clone();
    joined_model(tokio::task::spawn_blocking(move || f(&mut lock(&d))).await)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
