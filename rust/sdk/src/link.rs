//! The engine's connection to its server: created lazily, reused across generations, and
//! re-established in the background with exponential backoff after it drops, so generation
//! never waits on a dead server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::Endpoint;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::SdkError;
use crate::transport::{ClientConn, Target, bind_addr_for, client_endpoint, connect};

enum State {
    /// Never connected, or reset by `network_changed`.
    Idle,
    Up(Arc<ClientConn>),
    /// A background attempt is running; `backoff` is the delay to use if it fails.
    Connecting {
        rx: oneshot::Receiver<Result<Arc<ClientConn>, SdkError>>,
        backoff: Duration,
    },
    Down {
        retry_at: Instant,
        backoff: Duration,
    },
}

pub(crate) struct Link {
    target: Arc<Target>,
    endpoint: Mutex<Option<Endpoint>>,
    state: Mutex<State>,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl Link {
    pub fn new(target: Target, backoff_initial: Duration, backoff_max: Duration) -> Self {
        Self {
            target: Arc::new(target),
            endpoint: Mutex::new(None),
            state: Mutex::new(State::Idle),
            backoff_initial,
            backoff_max,
        }
    }

    pub fn addr(&self) -> &str {
        &self.target.addr
    }

    /// The endpoint, created on first use (must run inside the engine's runtime).
    async fn endpoint(&self) -> Result<Endpoint, SdkError> {
        if let Some(ep) = lock(&self.endpoint).clone() {
            return Ok(ep);
        }
        let ep = client_endpoint(&self.target.addr).await?;
        let mut slot = lock(&self.endpoint);
        Ok(slot.get_or_insert(ep).clone())
    }

    /// A live connection, connecting now if needed (used when a generation starts).
    pub async fn get(&self) -> Result<Arc<ClientConn>, SdkError> {
        if let State::Up(c) = &*lock(&self.state)
            && c.is_alive()
        {
            return Ok(c.clone());
        }
        let endpoint = self.endpoint().await?;
        match connect(&endpoint, &self.target).await {
            Ok(c) => {
                *lock(&self.state) = State::Up(c.clone());
                Ok(c)
            }
            Err(e) => {
                *lock(&self.state) = State::Down {
                    retry_at: Instant::now() + self.backoff_initial,
                    backoff: self.backoff_initial,
                };
                Err(e)
            }
        }
    }

    /// A live connection if one is ready, without waiting; otherwise starts a background
    /// attempt when the backoff allows.
    pub fn poll(&self, rt: &Handle) -> Option<Arc<ClientConn>> {
        let mut state = lock(&self.state);
        let next = match &mut *state {
            State::Up(c) if c.is_alive() => return Some(c.clone()),
            State::Up(_) | State::Idle => self.spawn_attempt(rt, self.backoff_initial),
            State::Connecting { rx, backoff } => match rx.try_recv() {
                Ok(Ok(c)) => {
                    *state = State::Up(c.clone());
                    return Some(c);
                }
                Ok(Err(e)) => {
                    let backoff = if e.is_fatal_for_connection() {
                        self.backoff_max
                    } else {
                        *backoff
                    };
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reconnect failed");
                    self.down(backoff)
                }
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => self.down(*backoff),
            },
            State::Down { retry_at, backoff } => {
                if Instant::now() < *retry_at {
                    return None;
                }
                self.spawn_attempt(rt, *backoff)
            }
        };
        *state = next;
        None
    }

    fn down(&self, backoff: Duration) -> State {
        State::Down {
            retry_at: Instant::now() + backoff,
            backoff: (backoff * 2).min(self.backoff_max),
        }
    }

    fn spawn_attempt(&self, rt: &Handle, backoff: Duration) -> State {
        let (tx, rx) = oneshot::channel();
        let target = self.target.clone();
        let endpoint = lock(&self.endpoint).clone();
        rt.spawn(async move {
            let result = match endpoint {
                Some(ep) => connect(&ep, &target).await,
                None => Err(SdkError::ServerUnreachable {
                    addr: target.addr.clone(),
                    reason: "no endpoint".into(),
                }),
            };
            let _ = tx.send(result);
        });
        State::Connecting { rx, backoff }
    }

    /// Forgets `conn` after it failed; the next `poll` after the backoff reconnects.
    pub fn mark_down(&self, conn: &Arc<ClientConn>, reason: &str) {
        conn.conn.close(0u32.into(), reason.as_bytes());
        let mut state = lock(&self.state);
        if matches!(&*state, State::Up(c) if Arc::ptr_eq(c, conn)) {
            *state = self.down(self.backoff_initial);
        }
    }

    /// The device's network changed (Wi-Fi ↔ cellular): move the endpoint to a fresh socket so
    /// QUIC migrates the connection; if that fails, drop the connection and reconnect lazily.
    pub fn network_changed(&self) {
        let endpoint = lock(&self.endpoint).clone();
        let Some(ep) = endpoint else {
            return;
        };
        let local = ep.local_addr().ok();
        let bind = local
            .map(|a| bind_addr_for(&a))
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let rebound = std::net::UdpSocket::bind(bind).and_then(|s| ep.rebind(s));
        if let Err(e) = rebound {
            tracing::warn!(error = %e, "rebinding the QUIC endpoint failed; reconnecting");
            let mut state = lock(&self.state);
            if let State::Up(c) = &*state {
                c.conn.close(0u32.into(), b"network changed");
            }
            *state = State::Idle;
        }
    }

    /// Closes the connection (engine shutdown).
    pub fn close(&self) {
        if let State::Up(c) = &*lock(&self.state) {
            c.conn.close(0u32.into(), b"client shutdown");
        }
    }
}

/// Locks a mutex, recovering from poisoning (the state is always left consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
