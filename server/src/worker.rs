//! Model workers: the LLM runs on dedicated OS threads, never on the async I/O threads.
//!
//! Each worker owns the sessions routed to it (their KV caches live here, in uhlm-model
//! `Session`s) and serves requests from a channel, replying through oneshot channels. It
//! batches continuously: whenever it is free it takes everything queued and runs one forward
//! pass for all of it ([`forward`]): every queued `Verify`, one token of every running
//! `Generate` (LLM-only streaming), and chunks of the contexts being caught up ([`catch_up`]),
//! within `max_batch` sessions and `max_batch_tokens` tokens per pass. Nothing waits for company
//! unless `batch_wait` asks for it; a request that does not fit goes first in the next pass.
//! This file holds a worker's state and its requests; the loop is [`pass_loop`], what a pass
//! takes [`plan`], the memory budget [`memory`].
//!
//! Memory: a session's KV cache costs about `2 · layers · kv_heads · head_dim · 4` bytes per
//! token of its allocated capacity (which grows by a quarter at a time and shrinks only on a
//! resync).
//! A forward pass allocates too: activations per token and logits per decided row (the
//! engine's [`PassCost`](uhlm_model::PassCost)), planned within half a worker's share of the
//! budget ([`Plan`](plan::Plan) cuts chains and catch-up to fit, catch-up keeping a floor of 16
//! tokens so that it never stops), and the new buffers of the caches it grows (beside the old
//! ones until copied). Before it runs, the least recently used sessions outside it lose their
//! cache until caches and pass fit together (unless only caches the pass protects are left).
//! When the allocated bytes over a worker's sessions exceed its share of the budget after a
//! pass, the least recently used sessions outside it lose their cache too; their next
//! `Verify` is answered `NeedResync`.

use crate::config::PassTarget;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc as async_mpsc, oneshot};
use uhlm_core::protocol::{
    Acceptance, ErrorCode, ErrorMessage, FinishReason, Generate, Verdict, Verify,
};
use uhlm_core::sampling::SamplingOptions;
use uhlm_model::ModelError;

use crate::engine::{Engine, EngineError, EngineSession};

use crate::metrics::Metrics;

mod catch_up;
mod decide;
mod forward;
mod memory;
mod pass_loop;
mod pass_time;
mod plan;

use pass_time::PassClock;

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
        reply: VerdictReply,
    },
    /// Starts sampling tokens after the session's context, streamed through `events`.
    Generate {
        key: SessionKey,
        generate: Generate,
        events: async_mpsc::UnboundedSender<GenEvent>,
        /// Set by the session task when the device sends `Cancel`.
        cancel: Arc<AtomicBool>,
    },
    /// Appends tokens the device committed to the session's context, to be scored before its
    /// next `Verify` needs them. `Extend` has no answer: one that fails its checks fails the
    /// session's next request instead.
    Extend { key: SessionKey, tokens: Vec<u32> },
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
            | Job::Extend { key, .. }
            | Job::Close { key } => Some(*key),
            Job::Stop => None,
        }
    }

    /// Whether the job must wait for its session's row in the current pass: everything but a
    /// `Close` (closing drops the row's result, which nobody waits for any more).
    fn needs_order(&self) -> bool {
        !matches!(self, Job::Close { .. })
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
    /// Most sessions one forward pass serves.
    pub max_batch: usize,
    /// Most tokens one forward pass scores (catching up may add one chunk).
    pub max_batch_tokens: usize,
    pub kv_memory_budget_bytes: u64,
    pub max_context_tokens: usize,
    pub max_generate_tokens: u32,
    /// Most links a chain `Verify` may carry.
    pub max_chain_links: usize,
    /// Most context tokens per forward pass when catching a session up.
    pub prefill_chunk: usize,
    /// What a forward pass is sized to when catching up.
    pub pass_target: PassTarget,
}

/// KV-cache bytes per context token of the server's model (keys and values, f32, every layer),
/// as the model's own cache allocates them.
pub fn kv_bytes_per_token(info: &uhlm_model::ModelInfo) -> u64 {
    info.kv_bytes_per_token
}

/// The worker threads and the channels to them.
pub(crate) struct WorkerPool {
    senders: Vec<mpsc::Sender<Job>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    /// Starts `settings.workers` threads over `engine`; `eos`: the model's end-of-sequence ids.
    pub fn start<E: Engine>(
        engine: Arc<E>,
        eos: &[u32],
        settings: &WorkerSettings,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let n = settings.workers.max(1);
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::channel();
            let worker = Worker {
                engine: engine.clone(),
                sessions: HashMap::new(),
                settings: settings.clone(),
                budget: settings.kv_memory_budget_bytes / n as u64,
                metrics: metrics.clone(),
                probs: Vec::new(),
                scratch: Vec::new(),
                clock: 0,
                streams: VecDeque::new(),
                catching_up: VecDeque::new(),
                held: VecDeque::new(),
                ready: VecDeque::new(),
                reported_kv_bytes: 0,
                peak_bytes: 0,
                pass_clock: PassClock::default(),
                eos: eos.to_vec(),
                window: 0,
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
struct Entry<S> {
    /// The engine's context of the tokens scored so far; `None` once evicted.
    llm: Option<S>,
    /// Committed tokens not yet scored: the prompt, then each verdict's token and each
    /// `Extend`'s tokens.
    pending: Vec<u32>,
    /// The pending tokens include a prompt (or resync) not yet scored: they fill what a pass
    /// has left. Otherwise they are a generating device's (`Extend`), as latency-critical as
    /// a `Verify`'s own skipped tokens.
    prefilling: bool,
    sampling: SamplingOptions,
    rng: ChaCha8Rng,
    last_used: u64,
    /// A `Verify` waiting for the session to be caught up (see [`catch_up`]).
    deferred: Option<(Verify, VerdictReply)>,
    /// Why the last `Extend` was refused, for the session's next request.
    refused: Option<Failure>,
}

/// Where a `Verify`'s answer goes, with the links of its chain already accepted in earlier
/// passes (a long chain is decided a part at a time: see `forward::plan_verify`).
pub(crate) struct VerdictReply {
    tx: oneshot::Sender<Result<Verdict, Failure>>,
    /// The chain's links accepted in earlier passes, before the ones this part decides.
    earlier: Vec<Acceptance>,
}

impl VerdictReply {
    pub fn new(tx: oneshot::Sender<Result<Verdict, Failure>>) -> Self {
        Self {
            tx,
            earlier: Vec::new(),
        }
    }

    /// Answers the device: the verdict's links follow the ones accepted before.
    fn send(self, mut r: Result<Verdict, Failure>) -> Result<(), Result<Verdict, Failure>> {
        if let Ok(v) = &mut r
            && !self.earlier.is_empty()
        {
            let mut links = self.earlier;
            links.append(&mut v.accepted_links);
            v.accepted_links = links;
        }
        self.tx.send(r)
    }

    /// Whether the device stopped waiting (timed out, reset the stream, lost the connection).
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

struct Worker<E: Engine> {
    engine: Arc<E>,
    sessions: HashMap<SessionKey, Entry<E::Session>>,
    settings: WorkerSettings,
    budget: u64,
    metrics: Arc<Metrics>,
    probs: Vec<f32>,
    scratch: Vec<u32>,
    /// Logical time for LRU order.
    clock: u64,
    /// Running generations, each waiting for its next token (round robin).
    streams: VecDeque<Streaming>,
    /// Sessions with context still to score, one chunk each per pass (round robin).
    catching_up: VecDeque<SessionKey>,
    /// Requests that did not fit in the last pass (or came after one of their session's that
    /// did), in arrival order: they go first.
    held: VecDeque<Job>,
    /// `Verify`s whose session has just been caught up, for the next pass.
    ready: VecDeque<(SessionKey, Verify, VerdictReply)>,
    /// KV bytes this worker last added to the `kv_cache_bytes` gauge.
    reported_kv_bytes: u64,
    /// The most this worker has held against its budget at once (caches and a pass), as
    /// added to the `memory_peak_bytes` gauge.
    peak_bytes: u64,
    /// What a forward pass costs on this machine now, for sizing catch-up chunks.
    pass_clock: PassClock,
    /// End-of-sequence ids of the model: a generation stops after sampling one.
    eos: Vec<u32>,
    /// The drafting window the verdicts of the pass being run carry ([`Verdict::window`]).
    window: u16,
}

fn fail(code: ErrorCode, message: impl Into<String>) -> Failure {
    ErrorMessage::new(code, message)
}

/// The session's entry, if it exists and still has its cache.
fn live_entry<S>(entry: Option<&mut Entry<S>>) -> Result<&mut Entry<S>, ErrorMessage> {
    let entry = entry.ok_or_else(gone)?;
    if entry.llm.is_none() {
        return Err(evicted());
    }
    Ok(entry)
}

/// The session is unknown here (closed, or never opened on this worker).
fn gone() -> ErrorMessage {
    fail(
        ErrorCode::NeedResync,
        "the server has no context for this session",
    )
}

/// The session lost its cache to the memory budget.
fn evicted() -> ErrorMessage {
    fail(
        ErrorCode::NeedResync,
        "this session's cache was evicted to free memory; resend the context",
    )
}

/// A generation's last event.
fn finished(reason: FinishReason, len: usize) -> GenEvent {
    GenEvent::Finished {
        reason,
        context_len: u32::try_from(len).unwrap_or(u32::MAX),
    }
}

impl<E: Engine> Worker<E> {
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
        let vocab = self.engine.vocab_size();
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
            llm: Some(self.engine.session()),
            pending: context,
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
            last_used: self.clock,
            deferred: None,
            prefilling: true,
            refused: None,
        };
        if self.sessions.insert(key, entry).is_none() {
            self.metrics.sessions.inc();
        }
        Ok(())
    }

    fn resync(&mut self, key: SessionKey, context: Vec<u32>) -> Result<(), Failure> {
        self.check_context(&context)?;
        let clock = self.clock;
        let engine = self.engine.clone();
        let entry = self.sessions.get_mut(&key).ok_or_else(|| {
            fail(
                ErrorCode::Internal,
                "resync of a session the worker does not know",
            )
        })?;
        match entry.llm.as_mut() {
            Some(llm) => llm.reset(),
            None => entry.llm = Some(engine.session()),
        }
        // A well-behaved device has no Verify outstanding when it resyncs.
        if let Some((_, reply)) = entry.deferred.take() {
            let _ = reply.send(Err(fail(
                ErrorCode::UnexpectedMessage,
                "the session was resynced while this Verify waited",
            )));
        }
        entry.pending = context;
        entry.prefilling = true;
        entry.refused = None;
        entry.last_used = clock;
        Ok(())
    }

    /// Queues an `Extend`'s tokens for scoring. A session whose cache was evicted drops them:
    /// its next `Verify` is answered `NeedResync` and the device resends its whole context.
    fn extend(&mut self, key: SessionKey, mut tokens: Vec<u32>) {
        let checked = self.check_tokens(&tokens);
        let max_context = self.settings.max_context_tokens;
        let Some(entry) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(llm) = entry.llm.as_ref() else {
            return;
        };
        let len = llm.len() + entry.pending.len() + tokens.len();
        let checked = checked.and_then(|()| match len > max_context {
            true => Err(fail(
                ErrorCode::ContextTooLong,
                format!("an Extend made the context {len} tokens, over the limit of {max_context}"),
            )),
            false => Ok(()),
        });
        if let Err(e) = checked {
            entry.refused = Some(e);
            return;
        }
        entry.last_used = self.clock;
        self.metrics.extended_tokens.inc_by(tokens.len() as u64);
        entry.pending.append(&mut tokens);
        self.queue_catch_up(key);
    }

    /// The refusal of an `Extend` the session's request must answer with, if any.
    fn take_refusal(&mut self, key: SessionKey) -> Option<Failure> {
        self.sessions.get_mut(&key)?.refused.take()
    }

    /// Checks a `Generate` against the session and the limits before it joins the run queue.
    fn admit_generation(&self, key: SessionKey, g: &Generate) -> Result<(), Failure> {
        if self.streams.iter().any(|s| s.key == key) {
            return Err(fail(
                ErrorCode::UnexpectedMessage,
                "this session is already generating",
            ));
        }
        let entry = self.sessions.get(&key).ok_or_else(gone)?;
        let Some(llm) = entry.llm.as_ref() else {
            return Err(evicted());
        };
        g.check(
            llm.len() + entry.pending.len(),
            self.settings.max_context_tokens,
            self.settings.max_generate_tokens,
        )
    }
}

/// Maps an engine error on client-supplied tokens to the code the client can act on.
fn engine_failure(e: EngineError) -> Failure {
    match e {
        EngineError::Model(
            e @ (ModelError::ContextOverflow { .. }
            | ModelError::InvalidToken { .. }
            | ModelError::EmptyPrompt),
        ) => {
            let code = if matches!(e, ModelError::ContextOverflow { .. }) {
                ErrorCode::ContextTooLong
            } else {
                ErrorCode::InvalidRequest
            };
            fail(code, e.to_string())
        }
        EngineError::Model(other) => {
            tracing::error!(error = %other, "model failure");
            fail(ErrorCode::Internal, "the model failed on this request")
        }
        // The device goes on alone and tries again later; the operator sees why in the log.
        remote @ (EngineError::Remote { .. }
        | EngineError::Vocabulary { .. }
        | EngineError::Unsupported { .. }) => {
            tracing::error!(error = %remote, "inference engine failure");
            fail(
                ErrorCode::Internal,
                "the server's inference engine failed on this request",
            )
        }
    }
}
