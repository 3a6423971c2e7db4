//! Cooperative cancellation: checked before every token and raced against every network wait;
//! and the tokens of an engine's running generations, so that one call stops them all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Cancels a generation; cheap to clone and share with UI code.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    cancelled: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the generation to stop; it returns [`SdkError::Cancelled`](crate::SdkError) soon
    /// after (within one token's compute) and releases its server session.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Completes once [`cancel`](Self::cancel) has been called.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// The cancel tokens of an engine's running generations.
#[derive(Debug, Default)]
pub(crate) struct Running {
    tokens: Mutex<HashMap<u64, CancelToken>>,
    next: AtomicU64,
}

impl Running {
    /// Registers a starting generation's token; [`finish`](Self::finish) it with the id.
    pub fn start(&self, token: CancelToken) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(id, token);
        }
        id
    }

    pub fn finish(&self, id: u64) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.remove(&id);
        }
    }

    /// Cancels every generation registered and not finished.
    pub fn cancel_all(&self) {
        if let Ok(tokens) = self.tokens.lock() {
            tokens.values().for_each(CancelToken::cancel);
        }
    }
}
