//! What every connection and session task shares: the server's configuration, model card,
//! limits, metrics and workers, and the shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, watch};

use crate::auth::ApiKeys;
use crate::config::ServerConfig;
use crate::engine::EngineProbe;
use crate::key_quota::KeyQuota;
use crate::llm_card::LlmCard;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::worker::{SessionKey, WorkerPool};

/// State every connection and session task shares.
pub(crate) struct Shared {
    pub config: ServerConfig,
    pub llm: LlmCard,
    /// Checks the remote engine as each device connects (`None`: the embedded engine).
    pub engine_probe: Option<EngineProbe>,
    pub fingerprint: [u8; 32],
    pub max_context_tokens: u32,
    pub keys: ApiKeys,
    pub limiter: RateLimiter,
    pub metrics: Arc<Metrics>,
    pub workers: WorkerPool,
    pub session_slots: Arc<Semaphore>,
    /// Sessions and connections each API key holds (see `ServerConfig::per_key_caps`).
    pub key_sessions: KeyQuota,
    pub key_connections: KeyQuota,
    pub shutdown: watch::Receiver<bool>,
    /// The next [`SessionKey`] to hand out.
    pub next_key: AtomicU64,
}

impl Shared {
    pub fn next_session_key(&self) -> SessionKey {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }
}

/// Completes once shutdown has begun (or the server is gone). Holds no borrow of the channel
/// across awaits, so futures using it stay `Send`.
pub(crate) async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
