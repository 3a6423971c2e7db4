//! Model workers: the LLM runs on dedicated OS threads, never on the async I/O threads.
//!
//! Each worker owns the sessions routed to it (their KV caches live here, in uhlm-model
//! `Session`s) and serves requests from a channel, replying through oneshot channels. Requests
//! that arrive within `batch_wait` of the first are handled as one batch (up to `max_batch`).
//! uhlm-model has no multi-session forward pass yet, so a batch runs its requests one after the
//! other; the batch-size histogram still shows how much batching a batched forward could use.
//!
//! Memory: a session's KV cache costs about `2 · layers · kv_heads · head_dim · 4` bytes per
//! token. When the sum over a worker's sessions exceeds its share of the budget, the least
//! recently used sessions outside the current batch lose their cache; their next `Verify` is
//! answered `NeedResync`.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::oneshot;
use uhlm_core::codec;
use uhlm_core::protocol::{ErrorCode, ErrorMessage, Verdict, Verify};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample};
use uhlm_model::{Model, ModelError, Session};

use crate::metrics::Metrics;

/// Server-wide identity of a session (device session ids are only unique per connection).
pub(crate) type SessionKey = u64;

/// What a request failed with, ready to become an `Error` frame.
pub(crate) type Failure = ErrorMessage;

/// A request to a worker.
pub(crate) enum Job {
    /// Creates the session with this context (nothing is computed until the first `Verify`).
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
            | Job::Resync { key, .. }
            | Job::Close { key } => Some(*key),
            Job::Stop => None,
        }
    }
}

/// Settings the workers need from the server configuration.
#[derive(Clone, Debug)]
pub(crate) struct WorkerSettings {
    pub workers: usize,
    pub batch_wait: Duration,
    pub max_batch: usize,
    pub kv_memory_budget_bytes: u64,
    pub max_context_tokens: usize,
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
        let bytes_per_token = kv_bytes_per_token(model.info()).max(1);
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::channel();
            let worker = Worker {
                model: model.clone(),
                sessions: HashMap::new(),
                settings: settings.clone(),
                budget: settings.kv_memory_budget_bytes / n as u64,
                bytes_per_token,
                metrics: metrics.clone(),
                probs: Vec::new(),
                scratch: Vec::new(),
                clock: 0,
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
}

struct Worker {
    model: Arc<Model>,
    sessions: HashMap<SessionKey, Entry>,
    settings: WorkerSettings,
    budget: u64,
    bytes_per_token: u64,
    metrics: Arc<Metrics>,
    probs: Vec<f32>,
    scratch: Vec<u32>,
    /// Logical time for LRU order.
    clock: u64,
}

fn fail(code: ErrorCode, message: impl Into<String>) -> Failure {
    ErrorMessage::new(code, message)
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
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
            let verifies = batch
                .iter()
                .filter(|j| matches!(j, Job::Verify { .. }))
                .count();
            if verifies > 0 {
                self.metrics.batch_size.observe(verifies as f64);
            }
            let protected: HashSet<SessionKey> = batch.iter().filter_map(Job::key).collect();
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
        }
        self.metrics.sessions.dec_by(self.sessions.len() as i64);
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
                let _ = reply.send(r);
            }
            Job::Resync {
                key,
                context,
                reply,
            } => {
                let r = self.resync(key, context);
                let _ = reply.send(r);
            }
            Job::Verify { key, verify, reply } => {
                // A panic in the model must not take the worker (and every session on it) down.
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.verify(key, &verify)))
                    .unwrap_or_else(|_| {
                        tracing::error!(key, "model panicked during verify; dropping the session");
                        self.sessions.remove(&key);
                        Err(fail(
                            ErrorCode::Internal,
                            "the model failed on this request",
                        ))
                    });
                if r.is_ok() {
                    self.enforce_budget(protected);
                }
                let _ = reply.send(r);
            }
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
        entry.pending = context;
        entry.last_used = clock;
        Ok(())
    }

    fn verify(&mut self, key: SessionKey, v: &Verify) -> Result<Verdict, Failure> {
        let vocab = self.model.info().vocab_size;
        let max_context = self.settings.max_context_tokens;
        self.check_tokens(&v.skipped)?;
        let q = match &v.draft {
            Some(d) => Some(codec::decode(&d.q, Some(vocab)).map_err(|e| {
                fail(
                    ErrorCode::InvalidRequest,
                    format!("cannot decode the draft distribution: {e}"),
                )
            })?),
            None => None,
        };
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
        let base = llm.len() + entry.pending.len();
        if v.base_len() != u32::try_from(base).ok() {
            return Err(fail(
                ErrorCode::PositionMismatch,
                format!(
                    "Verify at position {} after {} skipped tokens, but the server holds {base} tokens",
                    v.position,
                    v.skipped.len()
                ),
            ));
        }
        if v.position as usize >= max_context {
            return Err(fail(
                ErrorCode::ContextTooLong,
                format!(
                    "position {} reaches the context limit of {max_context}",
                    v.position
                ),
            ));
        }
        let pending_len = entry.pending.len();
        let mut chunk = std::mem::take(&mut entry.pending);
        chunk.extend_from_slice(&v.skipped);
        let old_len = llm.len();
        let logits = match llm.score(&chunk) {
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
        if !probabilities_into(
            logits.last(),
            &entry.sampling,
            &mut self.probs,
            &mut self.scratch,
        ) {
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

    /// Evicts least recently used sessions outside `protected` until the caches fit the budget.
    fn enforce_budget(&mut self, protected: &HashSet<SessionKey>) {
        let cached = |e: &Entry| e.llm.as_ref().map_or(0, |s| s.len() as u64);
        let mut used: u64 = self.sessions.values().map(cached).sum::<u64>() * self.bytes_per_token;
        while used > self.budget {
            let victim = self
                .sessions
                .iter()
                .filter(|(k, e)| e.llm.is_some() && !protected.contains(k))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k);
            let Some(victim) = victim else { break };
            if let Some(e) = self.sessions.get_mut(&victim) {
                used -= cached(e) * self.bytes_per_token;
                e.llm = None;
                e.pending.clear();
                self.metrics.evictions.inc();
                tracing::debug!(session = victim, "evicted an idle session's KV cache");
            }
        }
    }
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
