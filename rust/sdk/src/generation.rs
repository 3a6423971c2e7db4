//! One generation: the pipelined hybrid loop, its server session and its offline fallback.
//!
//! Per token: the SLM drafts `d ~ q'` and scores its uncertainty `u` (blocking thread); the
//! policy skips (a local token) or marks it for verification. Drafts to verify go to the server
//! as a chain `Verify`: every one drafted since the last request, with the local tokens between
//! them. Between requests, local tokens go ahead once `EngineConfig::extend_after` of them
//! wait (`Extend`), so that the server scores them while the SLM drafts. While a chain is in flight the SLM keeps drafting on the assumption that it is
//! accepted, up to a lookahead sized to the round trip ([`uhlm_core::lookahead`]); the
//! `Verdict` settles the chain up to its first rejection, and what was drafted after a
//! rejected token is dropped (the SLM rolls back and takes the server's token). Only final
//! tokens are emitted, so nothing shown is ever revised. When the link is down, tokens that
//! would have been sent keep their draft and are marked `Offline`; as soon as a background
//! reconnect succeeds, a new session starts from the full context and the loop is hybrid again.
//!
//! [`Mode::Llm`] is the LLM-only baseline as a user would run it: one `Generate` request and the
//! server streams its tokens (no per-token round trip, and the SLM does not run). If the link
//! fails mid-stream, the SLM catches up on the context in one pass and continues on the device
//! (`Offline` tokens), and streaming resumes once a reconnect succeeds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uhlm_core::codec::Codec;
use uhlm_core::lookahead::{Lookahead, LookaheadLimit, Settled, Uplink};
use uhlm_core::protocol::{
    self, Close, Extend, FinishReason, Generate, Message, Recovery, Resync, SessionPhase,
    SessionStream, Side, Start, Verify,
};
use uhlm_core::sampling::SamplingOptions;
use uhlm_core::threshold::Decision;
use uhlm_core::uncertainty::combined::LogisticCombiner;

use crate::cancel::CancelToken;
use crate::config::{GenerationOptions, Mode, Prompt};
use crate::drafter::{Drafted, Drafter};
use crate::engine::Inner;
use crate::error::SdkError;
use crate::events::{GenerationSummary, StopReason, TokenEvent, TokenListener, TokenSource};
use crate::stats::StatsAccumulator;
use crate::text::TextStream;
use crate::transport::{ClientConn, FramedStream, LinkError};

/// How long the final `Close` may take to write before we stop caring.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// The server session of a generation.
struct SessionLink {
    conn: Arc<ClientConn>,
    stream: FramedStream,
    state: SessionStream,
    /// Context tokens the server has been given but not scored yet (a new or resynced
    /// context); the next answer waits for them.
    unscored: usize,
}

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

/// Why a network wait ended early.
enum Wait {
    Link(LinkError),
    Cancelled,
    Fatal(SdkError),
}

impl From<LinkError> for Wait {
    fn from(e: LinkError) -> Self {
        Wait::Link(e)
    }
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

    /// LLM-only mode: asks the server to generate what is left (several `Generate`s when it is
    /// more than the server allows per request) and commits the streamed tokens as they arrive.
    /// Stop strings, `max_tokens` and the context limit apply exactly as on the per-token path;
    /// stopping early needs no message, since the session's `Close` ends the server's work.
    async fn stream_remote(
        &mut self,
        out: &mut Output,
        context_limit: usize,
    ) -> Result<Streamed, SdkError> {
        // A resync that is not followed by progress twice in a row means the server cannot keep
        // this session; give up on it rather than loop.
        let mut resynced = false;
        loop {
            let generated = out.token_ids.len() as u32;
            let left = self.sampling.max_tokens.saturating_sub(generated);
            let room =
                u32::try_from(context_limit.saturating_sub(self.context.len())).unwrap_or(u32::MAX);
            let Some(link) = self.link.as_mut() else {
                return Ok(Streamed::Offline);
            };
            let want = left
                .min(room)
                .min(link.conn.welcome.max_generate_tokens.max(1));
            if want == 0 {
                return Ok(Streamed::Done(if left == 0 {
                    StopReason::MaxTokens
                } else {
                    StopReason::ContextFull
                }));
            }
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            let msg = Message::Generate(Generate {
                seq,
                max_tokens: want,
            });
            if let Err(c) = link.state.on_message(Side::Device, &msg) {
                self.drop_session(LinkError::Protocol(format!("cannot send Generate: {c}")));
                return Ok(Streamed::Offline);
            }
            let t0 = Instant::now();
            let c = &mut self.stats.counters;
            if let Err(e) = link.stream.send(&msg, &mut c.uplink_bytes).await {
                self.drop_session(e);
                return Ok(Streamed::Offline);
            }
            let mut first = true;
            loop {
                let Some(link) = self.link.as_mut() else {
                    return Ok(Streamed::Offline);
                };
                let timeout = self.inner.config.answer_timeout(link.unscored);
                let c = &mut self.stats.counters;
                let reply = match recv_within(
                    &mut link.stream,
                    &mut c.downlink_bytes,
                    timeout,
                    &self.cancel,
                )
                .await
                {
                    Ok(m) => m,
                    Err(Wait::Cancelled) => return Err(SdkError::Cancelled),
                    Err(Wait::Fatal(e)) => return Err(e),
                    Err(Wait::Link(e)) => {
                        self.drop_session(e);
                        return Ok(Streamed::Offline);
                    }
                };
                if first {
                    // One round trip per request: until its first answer.
                    self.stats.record_rtt(t0.elapsed());
                    first = false;
                }
                link.unscored = 0;
                if let Err(c) = link.state.on_message(Side::Server, &reply) {
                    self.drop_session(LinkError::Protocol(format!(
                        "unexpected {}: {c}",
                        reply.kind()
                    )));
                    return Ok(Streamed::Offline);
                }
                match reply {
                    Message::Tokens(t) => {
                        resynced = false;
                        for token in t.tokens {
                            // As on the per-token path: nothing is shown after a cancel.
                            if self.cancel.is_cancelled() {
                                return Err(SdkError::Cancelled);
                            }
                            let c = &mut self.stats.counters;
                            c.decisions += 1;
                            c.remote += 1;
                            if let Some(stop) =
                                self.commit(out, token, TokenSource::Remote, 0.0, None)
                            {
                                return Ok(Streamed::Done(stop));
                            }
                        }
                    }
                    Message::Finished(f) => match f.reason {
                        // More to generate than one request allows: ask again.
                        FinishReason::MaxTokens => break,
                        // An end-of-sequence id of the server's model that ours does not
                        // list, or a server context smaller than ours.
                        FinishReason::Eos => return Ok(Streamed::Done(StopReason::Eos)),
                        FinishReason::ContextFull => {
                            return Ok(Streamed::Done(StopReason::ContextFull));
                        }
                        // We never cancel (the state machine rejects this reason otherwise).
                        FinishReason::Cancelled => return Err(SdkError::Cancelled),
                    },
                    Message::Error(e) => match e.code.recovery() {
                        Recovery::Resync if !resynced => {
                            tracing::debug!(code = %e.code, "server asked for a resync");
                            if let Err(w) = self.resync().await {
                                return self.stream_failed(w);
                            }
                            resynced = true;
                            break;
                        }
                        Recovery::Fatal => return Err(SdkError::from_server(&e)),
                        Recovery::Reconnect => {
                            self.drop_session(LinkError::Down(e.to_string()));
                            return Ok(Streamed::Offline);
                        }
                        _ => {
                            self.drop_session(LinkError::Protocol(e.to_string()));
                            return Ok(Streamed::Offline);
                        }
                    },
                    other => {
                        self.drop_session(LinkError::Protocol(format!(
                            "expected Tokens or Finished, got {}",
                            other.kind()
                        )));
                        return Ok(Streamed::Offline);
                    }
                }
            }
            if self.cancel.is_cancelled() {
                return Err(SdkError::Cancelled);
            }
        }
    }

    /// A failed resync while streaming: the session is gone, the device takes over.
    fn stream_failed(&mut self, w: Wait) -> Result<Streamed, SdkError> {
        match w {
            Wait::Cancelled => Err(SdkError::Cancelled),
            Wait::Fatal(e) => Err(e),
            Wait::Link(e) => {
                self.drop_session(e);
                Ok(Streamed::Offline)
            }
        }
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

    /// Sends the window's next chain; `false` if there was none to send. Trouble leaves the
    /// generation offline (the drafts stay unverified); only cancellation and fatal errors are
    /// returned.
    async fn send_chain(&mut self) -> Result<bool, SdkError> {
        let Some(link) = self.link.as_ref() else {
            return Ok(false);
        };
        let welcome = &link.conn.welcome;
        // Room for the frame: distributions plus at most 5 bytes per token id.
        let max_bytes = welcome.max_frame_bytes as usize / 2;
        let max_links = (welcome.max_chain_links as usize).min(self.inner.config.max_lookahead);
        let Some(request) = self.window.request(max_links, max_bytes) else {
            return Ok(false);
        };
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let Some(link) = self.link.as_mut() else {
            return Ok(false);
        };
        let Some(position) = link.state.next_position(request.skipped.len()) else {
            self.lose_session(LinkError::Protocol("session not ready".into()));
            return Ok(true);
        };
        let verify = Verify {
            seq,
            position,
            skipped: request.skipped,
            draft: Some(request.draft),
            uncertainty: request.uncertainty,
            chain: request.chain,
        };
        self.listener.on_verify(&verify);
        let timeout = self
            .inner
            .config
            .answer_timeout(link.unscored + verify.inputs().len());
        let msg = Message::Verify(verify);
        if let Err(c) = link.state.on_message(Side::Device, &msg) {
            self.lose_session(LinkError::Protocol(format!("cannot send Verify: {c}")));
            return Ok(true);
        }
        let c = &mut self.stats.counters;
        if let Err(e) = link.stream.send(&msg, &mut c.uplink_bytes).await {
            self.lose_session(e);
            return Ok(true);
        }
        let now = Instant::now();
        self.chain_sent = Some(now);
        self.chain_deadline = Some(now + timeout);
        Ok(true)
    }

    /// Gives the server the local tokens committed since the last request once
    /// `extend_after` of them wait (see [`Lookahead::take_extend`]). Trouble leaves the
    /// generation offline, as for a chain; the tokens are in the context a new session starts
    /// from.
    async fn send_extend(&mut self) {
        let min = self.inner.config.extend_after;
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.state.phase() != SessionPhase::Ready {
            return;
        }
        let Some(tokens) = self.window.take_extend(min) else {
            return;
        };
        let n = tokens.len();
        let msg = Message::Extend(Extend { tokens });
        if let Err(c) = link.state.on_message(Side::Device, &msg) {
            self.lose_session(LinkError::Protocol(format!("cannot send Extend: {c}")));
            return;
        }
        link.unscored += n;
        self.stats.counters.extends += 1;
        let c = &mut self.stats.counters;
        if let Err(e) = link.stream.send(&msg, &mut c.uplink_bytes).await {
            self.lose_session(e);
        }
    }

    /// Applies the answer to the chain in flight. `Some` ends the generation.
    async fn on_reply(
        &mut self,
        out: &mut Output,
        reply: Result<Message, Wait>,
    ) -> Result<Option<StopReason>, SdkError> {
        let settled = match reply {
            Ok(m) => self.accept_reply(m).await?,
            Err(w) => self.lost(w)?,
        };
        let verify_ms = self.last_verify.take().map(|d| d.as_secs_f64() * 1e3);
        for s in settled {
            if let Some(stop) = self.settle(out, s, verify_ms)? {
                return Ok(Some(stop));
            }
        }
        // A draft made while the verdict came is kept unless the verdict rolled back.
        if let Some((drafted, rollbacks)) = self.unapplied_draft.take()
            && rollbacks == self.rollbacks
        {
            self.on_drafted(drafted);
        }
        Ok(None)
    }

    /// The tokens a server message settles (none if it asks for a resync, which is done).
    async fn accept_reply(&mut self, reply: Message) -> Result<Vec<Settled<Kept>>, SdkError> {
        let Some(link) = self.link.as_mut() else {
            return Ok(self.window.settle_unverified());
        };
        if let Err(c) = link.state.on_message(Side::Server, &reply) {
            self.lose_session(LinkError::Protocol(format!(
                "unexpected {}: {c}",
                reply.kind()
            )));
            return Ok(Vec::new());
        }
        match reply {
            Message::Verdict(v) => {
                link.unscored = 0;
                let applied = match self.window.on_verdict(&v) {
                    Ok(a) => a,
                    Err(e) => {
                        self.lose_session(LinkError::Protocol(e.to_string()));
                        return Ok(Vec::new());
                    }
                };
                self.resyncs = 0;
                if let Some(sent) = self.chain_sent.take() {
                    let rtt = sent.elapsed();
                    self.stats.record_rtt(rtt);
                    self.limit.observe_round_trip(rtt.as_secs_f64());
                    self.last_verify = Some(rtt);
                }
                let decided = applied.settled.len() + applied.rejected.unwrap_or(0);
                self.limit
                    .observe_chain(decided, applied.rejected.is_some());
                self.limit.observe_server_window(v.window);
                if let Some(dropped) = applied.rejected {
                    self.stats.counters.discarded += dropped as u64;
                    // The SLM forgets the rejected draft and what followed it, and takes the
                    // server's token: its context is the final one.
                    self.rollbacks += 1;
                    self.slm.truncate = Some(self.context.len() + applied.settled.len() - 1);
                    self.slm.feed = Some(v.token);
                }
                Ok(applied.settled)
            }
            Message::Error(e) => match e.code.recovery() {
                Recovery::Resync if self.resyncs < 2 => {
                    tracing::debug!(code = %e.code, "server asked for a resync");
                    self.resyncs += 1;
                    match self.resync().await {
                        Ok(()) => Ok(Vec::new()),
                        Err(w) => self.lost(w),
                    }
                }
                Recovery::Resync => {
                    self.lose_session(LinkError::Protocol(
                        "the server keeps losing this session's context".into(),
                    ));
                    Ok(Vec::new())
                }
                Recovery::RetryLater => {
                    tracing::debug!(code = %e.code, "server busy; tokens decided locally");
                    Ok(self.window.settle_unverified())
                }
                Recovery::EndSession => {
                    self.lose_session(LinkError::Protocol(e.to_string()));
                    Ok(Vec::new())
                }
                Recovery::Reconnect => {
                    self.lose_session(LinkError::Down(e.to_string()));
                    Ok(Vec::new())
                }
                Recovery::Fatal => Err(SdkError::from_server(&e)),
            },
            other => {
                self.lose_session(LinkError::Protocol(format!(
                    "expected Verdict, got {}",
                    other.kind()
                )));
                Ok(Vec::new())
            }
        }
    }

    /// A failed wait (for a verdict or a resync): the session is gone, its drafts stay
    /// unverified; only cancellation and fatal errors are returned.
    fn lost(&mut self, w: Wait) -> Result<Vec<Settled<Kept>>, SdkError> {
        match w {
            Wait::Cancelled => Err(SdkError::Cancelled),
            Wait::Fatal(e) => Err(e),
            Wait::Link(e) => {
                self.lose_session(e);
                Ok(Vec::new())
            }
        }
    }

    /// Drops the session and keeps every draft the server did not verify; they are settled
    /// (shown) at the next step.
    fn lose_session(&mut self, e: LinkError) {
        self.drop_session(e);
        self.chain_sent = None;
        self.chain_deadline = None;
        self.pending_unverified = true;
    }

    /// Replaces the server's context with ours.
    async fn resync(&mut self) -> Result<(), Wait> {
        let msg = Message::Resync(Resync {
            context: self.context.clone(),
        });
        let reply = self.round_trip(msg).await?;
        match reply {
            Message::Started(_) => {
                // The server holds the final tokens now; the speculative ones go again.
                self.window.drop_final();
                self.chain_sent = None;
                if let Some(link) = self.link.as_mut() {
                    link.unscored = self.context.len();
                }
                Ok(())
            }
            Message::Error(e) => Err(Wait::Link(LinkError::Protocol(e.to_string()))),
            other => Err(Wait::Link(LinkError::Protocol(format!(
                "expected Started, got {}",
                other.kind()
            )))),
        }
    }

    /// Sends `msg` (a `Resync`) on the session and waits, within the request timeout, for the
    /// server's answer (`Started` comes back before any scoring); both pass the session's state
    /// machine, and bytes and round-trip time are counted. Chains go out with `send_chain`.
    async fn round_trip(&mut self, msg: Message) -> Result<Message, Wait> {
        let Some(link) = self.link.as_mut() else {
            return Err(Wait::Link(LinkError::Down("no session".into())));
        };
        let timeout = self.inner.config.request_timeout();
        link.state
            .on_message(Side::Device, &msg)
            .map_err(|c| LinkError::Protocol(format!("cannot send {}: {c}", msg.kind())))?;
        let t0 = Instant::now();
        let c = &mut self.stats.counters;
        link.stream.send(&msg, &mut c.uplink_bytes).await?;
        let reply = recv_within(
            &mut link.stream,
            &mut c.downlink_bytes,
            timeout,
            &self.cancel,
        )
        .await?;
        self.stats.record_rtt(t0.elapsed());
        link.state
            .on_message(Side::Server, &reply)
            .map_err(|c| LinkError::Protocol(format!("unexpected {}: {c}", reply.kind())))?;
        Ok(reply)
    }

    /// Opens a session stream starting from the full context. Link trouble leaves the
    /// generation offline; only cancellation and fatal errors are returned.
    async fn open_session(
        &mut self,
        conn: Arc<ClientConn>,
        reconnect: bool,
    ) -> Result<(), SdkError> {
        match self.try_open(conn.clone(), reconnect).await {
            Ok(link) => {
                self.link = Some(link);
                // The session starts from the whole (final) context.
                self.window.clear();
                if reconnect {
                    self.stats.counters.reconnects += 1;
                }
                if !self.online {
                    self.online = true;
                    self.listener
                        .on_link_change(true, format!("connected to {}", self.inner.link.addr()));
                }
                Ok(())
            }
            Err(Wait::Cancelled) => Err(SdkError::Cancelled),
            Err(Wait::Fatal(e)) => Err(e),
            Err(Wait::Link(e)) => {
                if let LinkError::Down(_) = e {
                    self.inner.link.mark_down(&conn, "session start failed");
                }
                self.went_offline(e.to_string());
                Ok(())
            }
        }
    }

    /// A request that can never fit the server's context is an error at the start; on a
    /// reconnect only what is left to generate counts, and a server that cannot take even
    /// that (a smaller one than before) leaves the generation on the device, where the tokens
    /// already shown stay.
    async fn try_open(
        &mut self,
        conn: Arc<ClientConn>,
        reconnect: bool,
    ) -> Result<SessionLink, Wait> {
        let max_ctx = conn.welcome.max_context_tokens as usize;
        let generated = self.context.len() - self.prompt_len;
        let left = (self.sampling.max_tokens as usize).saturating_sub(generated);
        if self.context.len() + left > max_ctx {
            let what = format!(
                "the context ({} prompt + {generated} generated tokens) plus the {left} tokens \
                 still to generate exceed the server's context of {max_ctx} tokens",
                self.prompt_len
            );
            return Err(if reconnect {
                Wait::Link(LinkError::Protocol(what))
            } else {
                Wait::Fatal(SdkError::InvalidConfig(what))
            });
        }
        let timeout = self.inner.config.request_timeout();
        let mut stream = conn.open_session().await?;
        // A token id our model cannot take is a broken server: this session ends, not the app.
        let mut state = SessionStream::new().with_vocab(self.inner.model.info().vocab_size);
        let msg = Message::Start(Start {
            session_id: self.inner.next_session_id(),
            prompt: protocol::Prompt::Tokens(self.context.clone()),
            sampling: self.sampling.clone(),
        });
        state
            .on_message(Side::Device, &msg)
            .map_err(|c| LinkError::Protocol(format!("cannot send Start: {c}")))?;
        let t0 = Instant::now();
        let c = &mut self.stats.counters;
        stream.send(&msg, &mut c.uplink_bytes).await?;
        let reply = recv_within(&mut stream, &mut c.downlink_bytes, timeout, &self.cancel).await?;
        self.stats.record_rtt(t0.elapsed());
        state
            .on_message(Side::Server, &reply)
            .map_err(|c| LinkError::Protocol(format!("unexpected {}: {c}", reply.kind())))?;
        match reply {
            Message::Started(_) => Ok(SessionLink {
                conn,
                stream,
                state,
                unscored: self.context.len(),
            }),
            Message::Error(e) => match e.code.recovery() {
                Recovery::Fatal => Err(Wait::Fatal(SdkError::from_server(&e))),
                Recovery::Reconnect => Err(Wait::Link(LinkError::Down(e.to_string()))),
                _ => Err(Wait::Link(LinkError::Protocol(e.to_string()))),
            },
            other => Err(Wait::Link(LinkError::Protocol(format!(
                "expected Started, got {}",
                other.kind()
            )))),
        }
    }

    /// Abandons the session after a failure: a dead link also takes the connection down (the
    /// background reconnect then starts); a protocol problem only ends this session.
    fn drop_session(&mut self, e: LinkError) {
        if let Some(mut link) = self.link.take() {
            link.stream.finish();
            if let LinkError::Down(reason) = &e {
                self.inner.link.mark_down(&link.conn, reason);
            }
        }
        self.went_offline(e.to_string());
    }

    fn went_offline(&mut self, reason: String) {
        self.retry_at =
            Some(Instant::now() + Duration::from_millis(self.inner.config.reconnect_backoff_ms));
        tracing::warn!(%reason, "server unavailable; continuing on the device");
        self.online = false;
        self.listener.on_link_change(false, reason);
    }

    /// Sends `Close` so the server frees the session's KV cache, without waiting for it.
    async fn close_session(&mut self, reason: &str) {
        let Some(mut link) = self.link.take() else {
            return;
        };
        let msg = Message::Close(Close {
            reason: reason.to_string(),
        });
        if link.state.on_message(Side::Device, &msg).is_ok() {
            let c = &mut self.stats.counters;
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, link.stream.send(&msg, &mut c.uplink_bytes))
                    .await;
        }
        link.stream.finish();
    }
}

/// Receives one message, giving up at `deadline` (link down) or on cancellation.
async fn recv_until(
    stream: &mut FramedStream,
    downlink: &mut u64,
    deadline: Instant,
    cancel: &CancelToken,
) -> Result<Message, Wait> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    recv_within(stream, downlink, timeout, cancel).await
}

/// What a blocking model task gives back when joined.
type Joined<T> = Result<Result<T, SdkError>, tokio::task::JoinError>;

/// A joined model task's result; a task that panicked is a model error.
fn joined_model<T>(joined: Joined<T>) -> Result<T, SdkError> {
    joined.map_err(|e| SdkError::Model(format!("the model thread failed: {e}")))?
}

/// Receives one message, giving up on timeout (link down) or cancellation.
async fn recv_within(
    stream: &mut FramedStream,
    downlink: &mut u64,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<Message, Wait> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Wait::Cancelled),
        r = tokio::time::timeout(timeout, stream.recv(downlink)) => match r {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(Wait::Link(e)),
            Err(_) => Err(Wait::Link(LinkError::Down(format!(
                "no answer within {} ms",
                timeout.as_millis()
            )))),
        },
    }
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
