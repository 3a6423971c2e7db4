//! Model workers: the LLM runs on dedicated OS threads, never on the async I/O threads.
//!
//! Each worker owns the sessions routed to it (their KV caches live here, in uhlm-model
//! `Session`s) and serves requests from a channel, replying through oneshot channels. Requests
//! that arrive within `batch_wait` of the first are handled as one batch (up to `max_batch`).
//! A batch still runs its requests one after the other: uhlm-model's multi-session forward
//! pass (`Session::score_batch`, bit-identical to running each session alone) is not wired in
//! here yet; the batch-size histogram shows how much batching it could use.
//!
//! `Generate` (LLM-only streaming) is not one job but a stream of small ones: the worker keeps
//! each running generation in a run queue and samples one token per generation per turn, after
//! the requests already queued. A long generation therefore shares the model fairly with
//! verification traffic and with other generations instead of holding the worker until it ends.
//!
//! Catching a session up on a long context (a new prompt, a resync) is done in chunks between
//! the other requests ([`catch_up`]), so one long prompt cannot stall every device.
//!
//! Memory: a session's KV cache costs about `2 · layers · kv_heads · head_dim · 4` bytes per
//! token of its allocated capacity (which grows by a quarter at a time and shrinks only on a
//! resync).
//! When the allocated bytes over a worker's sessions exceed its share of the budget, the least
//! recently used sessions outside the current batch lose their cache; their next `Verify` is
//! answered `NeedResync`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc as async_mpsc, oneshot};
use uhlm_core::protocol::{ErrorCode, ErrorMessage, FinishReason, Generate, Verdict, Verify};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample};
use uhlm_model::{Model, ModelError, Session};

use crate::metrics::Metrics;

mod catch_up;

/// Server-wide identity of a session (device session ids are only unique per connection).
pub(crate) type SessionKey = u64;

/// What a request failed with, ready to become an `Error` frame.
pub(crate) type Failure = ErrorMessage;

/// A request to a worker.
pub(crate) enum Job {
    /// Creates the session with this context and queues its prefill.
    Open {
        key: SessionKey,
        context: Vec<u32>,
        sampling: SamplingOptions,
        reply: oneshot::Sender<Result<(), Failure>>,
    },
    /// Catches up on everything not yet in the cache, then decides the token at `position`.
    Verify {
        key: SessionKey,
        verify: Verify,
        reply: oneshot::Sender<Result<Verdict, Failure>>,
    },
    /// Starts sampling tokens after the session's context, streamed through `events`.
    Generate {
        key: SessionKey,
        generate: Generate,
        events: async_mpsc::UnboundedSender<GenEvent>,
        /// Set by the session task when the device sends `Cancel`.
        cancel: Arc<AtomicBool>,
    },
    /// Replaces the session's context.
    Resync {
        key: SessionKey,
        context: Vec<u32>,
        reply: oneshot::Sender<Result<(), Failure>>,
    },
    /// Frees the session.
    Close { key: SessionKey },
    /// Ends the worker thread.
    Stop,
}

impl Job {
    fn key(&self) -> Option<SessionKey> {
        match self {
            Job::Open { key, .. }
            | Job::Verify { key, .. }
            | Job::Generate { key, .. }
            | Job::Resync { key, .. }
            | Job::Close { key } => Some(*key),
            Job::Stop => None,
        }
    }
}

/// What a generation sends back to its session task, in order: tokens, then exactly one of
/// `Finished` or `Failed` (none if the device went away first).
#[derive(Debug)]
pub(crate) enum GenEvent {
    Token(u32),
    Finished {
        reason: FinishReason,
        context_len: u32,
    },
    Failed(Failure),
}

/// A generation in a worker's run queue.
struct Streaming {
    key: SessionKey,
    /// Tokens still allowed by `Generate.max_tokens`.
    left: u32,
    events: async_mpsc::UnboundedSender<GenEvent>,
    cancel: Arc<AtomicBool>,
}

/// Settings the workers need from the server configuration.
#[derive(Clone, Debug)]
pub(crate) struct WorkerSettings {
    pub workers: usize,
    pub batch_wait: Duration,
    pub max_batch: usize,
    pub kv_memory_budget_bytes: u64,
    pub max_context_tokens: usize,
    pub max_generate_tokens: u32,
    /// Most context tokens per forward pass when catching a session up.
    pub prefill_chunk: usize,
}

/// Estimated KV-cache bytes per context token: keys and values, f32, every layer.
pub fn kv_bytes_per_token(info: &uhlm_model::ModelInfo) -> u64 {
    let head_dim = info.n_embd / info.n_heads.max(1);
    (2 * info.n_layers * info.n_kv_heads * head_dim * 4) as u64
}

/// The worker threads and the channels to them.
pub(crate) struct WorkerPool {
    senders: Vec<mpsc::Sender<Job>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    pub fn start(
        model: Arc<Model>,
        settings: &WorkerSettings,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let n = settings.workers.max(1);
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::channel();
            let worker = Worker {
                model: model.clone(),
                sessions: HashMap::new(),
                settings: settings.clone(),
                budget: settings.kv_memory_budget_bytes / n as u64,
                metrics: metrics.clone(),
                probs: Vec::new(),
                scratch: Vec::new(),
                clock: 0,
                streams: VecDeque::new(),
                catching_up: VecDeque::new(),
                reported_kv_bytes: 0,
                eos: model.tokenizer().eos_ids().to_vec(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("uhlm-worker-{i}"))
                .spawn(move || worker.run(rx))?;
            senders.push(tx);
            threads.push(handle);
        }
        Ok(Self {
            senders,
            threads: Mutex::new(threads),
        })
    }

    /// Queues `job` on the worker that owns its session.
    pub fn submit(&self, job: Job) -> Result<(), Failure> {
        let idx = job
            .key()
            .map_or(0, |k| (k % self.senders.len() as u64) as usize);
        self.senders[idx].send(job).map_err(|_| {
            ErrorMessage::new(ErrorCode::ShuttingDown, "the model workers have stopped")
        })
    }

    /// Sends `job` and waits for its reply.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Failure>>) -> Job,
    ) -> Result<T, Failure> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx))?;
        rx.await.unwrap_or_else(|_| {
            Err(ErrorMessage::new(
                ErrorCode::Internal,
                "the model worker dropped the request",
            ))
        })
    }

    /// Stops every worker after the jobs already queued and waits for the threads (blocking).
    pub fn stop_blocking(&self) {
        for tx in &self.senders {
            let _ = tx.send(Job::Stop);
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a model worker thread panicked");
            }
        }
    }
}

/// One session's state in its worker.
struct Entry {
    /// The KV cache of the tokens scored so far; `None` once evicted.
    llm: Option<Session>,
    /// Committed tokens not yet scored: the prompt, then each verdict's token.
    pending: Vec<u32>,
    sampling: SamplingOptions,
    rng: ChaCha8Rng,
    last_used: u64,
    /// A `Verify` waiting for the session to be caught up (see [`catch_up`]).
    deferred: Option<(Verify, VerdictReply)>,
}

/// Where a `Verify`'s answer goes.
type VerdictReply = oneshot::Sender<Result<Verdict, Failure>>;

struct Worker {
    model: Arc<Model>,
    sessions: HashMap<SessionKey, Entry>,
    settings: WorkerSettings,
    budget: u64,
    metrics: Arc<Metrics>,
    probs: Vec<f32>,
    scratch: Vec<u32>,
    /// Logical time for LRU order.
    clock: u64,
    /// Running generations, each waiting for its next token (round robin).
    streams: VecDeque<Streaming>,
    /// Sessions with context still to score, one chunk each per turn (round robin).
    catching_up: VecDeque<SessionKey>,
    /// KV bytes this worker last added to the `kv_cache_bytes` gauge.
    reported_kv_bytes: u64,
    /// End-of-sequence ids of the model: a generation stops after sampling one.
    eos: Vec<u32>,
}

fn fail(code: ErrorCode, message: impl Into<String>) -> Failure {
    ErrorMessage::new(code, message)
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let mut batch = Vec::new();
            if self.streams.is_empty() && self.catching_up.is_empty() {
                match rx.recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
                let deadline = Instant::now() + self.settings.batch_wait;
                while batch.len() < self.settings.max_batch {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match rx.recv_timeout(deadline - now) {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            } else {
                // Generations wait for their next token and catch-ups for their next chunk:
                // take only what is already queued, so neither pays the batching delay.
                while batch.len() < self.settings.max_batch {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
            let verifies = batch
                .iter()
                .filter(|j| matches!(j, Job::Verify { .. }))
                .count();
            if verifies > 0 {
                self.metrics.batch_size.observe(verifies as f64);
            }
            let mut protected: HashSet<SessionKey> = batch.iter().filter_map(Job::key).collect();
            protected.extend(self.streams.iter().map(|s| s.key));
            protected.extend(self.catching_up.iter().copied());
            let mut stop = false;
            for job in batch {
                if matches!(job, Job::Stop) {
                    stop = true;
                    continue;
                }
                self.handle(job, &protected);
            }
            if stop {
                break;
            }
            self.step_generation(&protected);
            self.step_catch_up(&protected);
            // Closes and resyncs free caches without an eviction pass.
            self.report_kv_bytes(self.allocated_kv_bytes());
        }
        // Generations still running end here; their session tasks see the channel close.
        self.streams.clear();
        self.metrics.sessions.dec_by(self.sessions.len() as i64);
        self.sessions.clear();
        self.report_kv_bytes(0);
    }

    fn handle(&mut self, job: Job, protected: &HashSet<SessionKey>) {
        self.clock += 1;
        match job {
            Job::Open {
                key,
                context,
                sampling,
                reply,
            } => {
                let r = self.open(key, context, sampling);
                if r.is_ok() {
                    self.queue_catch_up(key);
                }
                let _ = reply.send(r);
            }
            Job::Resync {
                key,
                context,
                reply,
            } => {
                let r = self.resync(key, context);
                if r.is_ok() {
                    self.queue_catch_up(key);
                }
                let _ = reply.send(r);
            }
            Job::Verify { key, verify, reply } => {
                if let Some((verify, reply)) = self.defer_verify(key, verify, reply) {
                    let r = self.answer_verify(key, &verify, protected);
                    let _ = reply.send(r);
                }
            }
            Job::Generate {
                key,
                generate,
                events,
                cancel,
            } => match self.admit_generation(key, &generate) {
                Ok(()) => {
                    self.metrics.generate_requests.inc();
                    self.streams.push_back(Streaming {
                        key,
                        left: generate.max_tokens,
                        events,
                        cancel,
                    });
                }
                Err(e) => {
                    let _ = events.send(GenEvent::Failed(e));
                }
            },
            Job::Close { key } => {
                if self.sessions.remove(&key).is_some() {
                    self.metrics.sessions.dec();
                }
            }
            Job::Stop => {}
        }
    }

    fn check_context(&self, context: &[u32]) -> Result<(), Failure> {
        if context.is_empty() {
            return Err(fail(ErrorCode::InvalidRequest, "the context is empty"));
        }
        if context.len() > self.settings.max_context_tokens {
            return Err(fail(
                ErrorCode::ContextTooLong,
                format!(
                    "{} tokens exceed the limit of {}",
                    context.len(),
                    self.settings.max_context_tokens
                ),
            ));
        }
        self.check_tokens(context)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), Failure> {
        let vocab = self.model.info().vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => Err(fail(
                ErrorCode::InvalidRequest,
                format!("token id {t} is outside the vocabulary of {vocab}"),
            )),
            None => Ok(()),
        }
    }

    fn open(
        &mut self,
        key: SessionKey,
        context: Vec<u32>,
        sampling: SamplingOptions,
    ) -> Result<(), Failure> {
        self.check_context(&context)?;
        let seed = sampling.seed.unwrap_or_else(rand::random);
        let entry = Entry {
            llm: Some(self.model.session()),
            pending: context,
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
            last_used: self.clock,
            deferred: None,
        };
        if self.sessions.insert(key, entry).is_none() {
            self.metrics.sessions.inc();
        }
        Ok(())
    }

    fn resync(&mut self, key: SessionKey, context: Vec<u32>) -> Result<(), Failure> {
        self.check_context(&context)?;
        let clock = self.clock;
        let model = self.model.clone();
        let entry = self.sessions.get_mut(&key).ok_or_else(|| {
            fail(
                ErrorCode::Internal,
                "resync of a session the worker does not know",
            )
        })?;
        match entry.llm.as_mut() {
            Some(llm) => llm.reset(),
            None => entry.llm = Some(model.session()),
        }
        // A well-behaved device has no Verify outstanding when it resyncs.
        if let Some((_, reply)) = entry.deferred.take() {
            let _ = reply.send(Err(fail(
                ErrorCode::UnexpectedMessage,
                "the session was resynced while this Verify waited",
            )));
        }
        entry.pending = context;
        entry.last_used = clock;
        Ok(())
    }

    /// [`verify`](Self::verify), with the memory budget checked after it. A panic in the model
    /// must not take the worker (and every session on it) down: it drops the session only.
    fn answer_verify(
        &mut self,
        key: SessionKey,
        v: &Verify,
        protected: &HashSet<SessionKey>,
    ) -> Result<Verdict, Failure> {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.verify(key, v))).unwrap_or_else(
            |_| {
                tracing::error!(key, "model panicked during verify; dropping the session");
                self.sessions.remove(&key);
                Err(fail(
                    ErrorCode::Internal,
                    "the model failed on this request",
                ))
            },
        );
        if r.is_ok() {
            self.enforce_budget(protected);
        }
        r
    }

    fn verify(&mut self, key: SessionKey, v: &Verify) -> Result<Verdict, Failure> {
        let vocab = self.model.info().vocab_size;
        let max_context = self.settings.max_context_tokens;
        let clock = self.clock;
        let entry = self.sessions.get_mut(&key).ok_or_else(|| {
            fail(
                ErrorCode::NeedResync,
                "the server has no context for this session",
            )
        })?;
        let Some(llm) = entry.llm.as_mut() else {
            return Err(fail(
                ErrorCode::NeedResync,
                "this session's cache was evicted to free memory; resend the context",
            ));
        };
        let q = v.check(llm.len() + entry.pending.len(), vocab, max_context)?;
        let pending_len = entry.pending.len();
        let mut chunk = std::mem::take(&mut entry.pending);
        chunk.extend_from_slice(&v.skipped);
        let old_len = llm.len();
        let logits = match llm.score_last(&chunk) {
            Ok(l) => l,
            Err(e) => {
                chunk.truncate(pending_len);
                entry.pending = chunk;
                return Err(model_failure(e));
            }
        };
        let undo = |entry: &mut Entry, mut chunk: Vec<u32>| {
            if let Some(llm) = entry.llm.as_mut() {
                llm.truncate(old_len);
            }
            chunk.truncate(pending_len);
            entry.pending = chunk;
        };
        if !probabilities_into(&logits, &entry.sampling, &mut self.probs, &mut self.scratch) {
            undo(entry, chunk);
            return Err(fail(
                ErrorCode::Internal,
                "the model produced no finite logits",
            ));
        }
        let verdict = match (&v.draft, q) {
            (Some(d), Some(q)) => {
                match uhlm_core::verify::verify(&self.probs, &q, d.token, &mut entry.rng) {
                    Ok(r) => Verdict {
                        seq: v.seq,
                        token: r.token,
                        accepted: r.accepted,
                        beta: r.beta,
                        tv_distance: r.tv_distance,
                    },
                    Err(e) => {
                        undo(entry, chunk);
                        return Err(fail(
                            ErrorCode::InvalidRequest,
                            format!("cannot verify the draft: {e}"),
                        ));
                    }
                }
            }
            _ => Verdict {
                seq: v.seq,
                token: sample(&self.probs, &mut entry.rng),
                accepted: false,
                beta: 0.0,
                tv_distance: 0.0,
            },
        };
        entry.pending = vec![verdict.token];
        entry.last_used = clock;
        self.metrics.tokens_verified.inc();
        self.metrics.catchup_tokens.inc_by(v.skipped.len() as u64);
        if verdict.accepted {
            self.metrics.tokens_accepted.inc();
        } else {
            self.metrics.tokens_resampled.inc();
        }
        Ok(verdict)
    }

    /// Checks a `Generate` against the session and the limits before it joins the run queue.
    fn admit_generation(&self, key: SessionKey, g: &Generate) -> Result<(), Failure> {
        if self.streams.iter().any(|s| s.key == key) {
            return Err(fail(
                ErrorCode::UnexpectedMessage,
                "this session is already generating",
            ));
        }
        let entry = self.sessions.get(&key).ok_or_else(|| {
            fail(
                ErrorCode::NeedResync,
                "the server has no context for this session",
            )
        })?;
        let Some(llm) = entry.llm.as_ref() else {
            return Err(fail(
                ErrorCode::NeedResync,
                "this session's cache was evicted to free memory; resend the context",
            ));
        };
        g.check(
            llm.len() + entry.pending.len(),
            self.settings.max_context_tokens,
            self.settings.max_generate_tokens,
        )
    }

    /// Samples one token for the generation at the front of the run queue and puts it back at
    /// the end unless it is over.
    fn step_generation(&mut self, protected: &HashSet<SessionKey>) {
        let Some(mut s) = self.streams.pop_front() else {
            return;
        };
        // Its prompt is still being scored a chunk at a time: the first token comes after.
        if self.catching_up.contains(&s.key) && !s.events.is_closed() {
            self.streams.push_back(s);
            return;
        }
        self.clock += 1;
        // Nobody is listening any more (stream reset, connection lost, session closed): stop
        // computing tokens for it.
        if s.events.is_closed() {
            self.metrics.generations_stopped.inc();
            return;
        }
        let key = s.key;
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.generate_one(&mut s)))
            .unwrap_or_else(|_| {
                tracing::error!(key, "model panicked during generate; dropping the session");
                self.sessions.remove(&key);
                Err(fail(
                    ErrorCode::Internal,
                    "the model failed on this request",
                ))
            });
        match r {
            Ok(None) => {
                self.enforce_budget(protected);
                self.streams.push_back(s);
            }
            Ok(Some(_)) => self.enforce_budget(protected),
            Err(e) => {
                let _ = s.events.send(GenEvent::Failed(e));
            }
        }
    }

    /// One step of a generation: `Some(reason)` once it is over (`Finished` already sent).
    fn generate_one(&mut self, s: &mut Streaming) -> Result<Option<FinishReason>, Failure> {
        let max_context = self.settings.max_context_tokens;
        let clock = self.clock;
        let entry = self.sessions.get_mut(&s.key).ok_or_else(|| {
            fail(
                ErrorCode::NeedResync,
                "the server has no context for this session",
            )
        })?;
        let Some(llm) = entry.llm.as_mut() else {
            return Err(fail(
                ErrorCode::NeedResync,
                "this session's cache was evicted to free memory; resend the context",
            ));
        };
        let finish = |reason, len: usize| GenEvent::Finished {
            reason,
            context_len: u32::try_from(len).unwrap_or(u32::MAX),
        };
        if s.cancel.load(Ordering::Acquire) {
            let len = llm.len() + entry.pending.len();
            // Counted before `Finished` leaves, so that whoever sees it sees the count too.
            self.metrics.generations_stopped.inc();
            let _ = s.events.send(finish(FinishReason::Cancelled, len));
            return Ok(Some(FinishReason::Cancelled));
        }
        // The same steps as a `Verify` without a draft: score what is not cached yet (the
        // prompt, then the last token), sample from the session's distribution with its RNG.
        // At temperature 0 that is the LLM's greedy continuation, token for token.
        let chunk = std::mem::take(&mut entry.pending);
        let logits = match llm.score_last(&chunk) {
            Ok(l) => l,
            Err(e) => {
                entry.pending = chunk;
                return Err(model_failure(e));
            }
        };
        if !probabilities_into(&logits, &entry.sampling, &mut self.probs, &mut self.scratch) {
            let old_len = llm.len() - chunk.len();
            llm.truncate(old_len);
            entry.pending = chunk;
            return Err(fail(
                ErrorCode::Internal,
                "the model produced no finite logits",
            ));
        }
        let token = sample(&self.probs, &mut entry.rng);
        entry.pending = vec![token];
        entry.last_used = clock;
        let len = llm.len() + 1;
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
        let _ = s.events.send(finish(reason, len));
        Ok(Some(reason))
    }

    /// KV bytes this worker's caches hold allocated.
    fn allocated_kv_bytes(&self) -> u64 {
        self.sessions.values().map(kv_bytes).sum()
    }

    /// Publishes this worker's share of the allocated KV bytes, `bytes`.
    fn report_kv_bytes(&mut self, bytes: u64) {
        self.metrics
            .kv_cache_bytes
            .inc_by(bytes as i64 - self.reported_kv_bytes as i64);
        self.reported_kv_bytes = bytes;
    }

    /// Evicts least recently used sessions outside `protected` until the caches fit the budget.
    /// A cache counts what it holds allocated, not the tokens in use: a session rolled back or
    /// started on a short context after a long one still holds its buffers.
    fn enforce_budget(&mut self, protected: &HashSet<SessionKey>) {
        let mut used = self.allocated_kv_bytes();
        while used > self.budget {
            let victim = self
                .sessions
                .iter()
                .filter(|(k, e)| e.llm.is_some() && !protected.contains(k))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k);
            let Some(victim) = victim else { break };
            if let Some(e) = self.sessions.get_mut(&victim) {
                used -= kv_bytes(e);
                e.llm = None;
                e.pending.clear();
                self.metrics.evictions.inc();
                tracing::debug!(session = victim, "evicted an idle session's KV cache");
            }
        }
        self.report_kv_bytes(used);
    }
}

/// KV bytes an entry's cache holds allocated (none once evicted).
fn kv_bytes(e: &Entry) -> u64 {
    e.llm.as_ref().map_or(0, |s| s.kv_cache_bytes() as u64)
}

/// Maps a model error on client-supplied tokens to the code the client can act on.
fn model_failure(e: ModelError) -> Failure {
    match e {
        ModelError::ContextOverflow { .. } => fail(ErrorCode::ContextTooLong, e.to_string()),
        ModelError::InvalidToken { .. } | ModelError::EmptyPrompt => {
            fail(ErrorCode::InvalidRequest, e.to_string())
        }
        other => {
            tracing::error!(error = %other, "model failure");
            fail(ErrorCode::Internal, "the model failed on this request")
        }
    }
}
