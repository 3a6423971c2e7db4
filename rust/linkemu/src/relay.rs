//! The thin tokio layer: a UDP relay that pushes real packets through two [`Link`]s.
//!
//! Clients send to the emulator's address. Each client address gets its own upstream socket
//! connected to the server, so the server sees one peer per client (QUIC connection IDs and
//! address validation work) and its replies find their way back to the right client. One task
//! owns the uplink model and the client-facing socket's receive side; another owns the downlink
//! model; each keeps a deadline-ordered heap of packets waiting out their delay and sends them
//! when due. Memory is bounded: the bottleneck queues by the profile, packets in propagation by
//! [`RelayOptions::max_in_flight_bytes`], sessions by [`RelayOptions::max_sessions`].

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use crate::link::{DropReason, Fate, Link};
use crate::profile::{LinkProfile, ProfileError};
use crate::stats::{DirectionStats, EmulatorStats};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Limits that keep the relay's memory bounded whatever the traffic.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Client addresses served at once; packets from further clients are dropped (`Overflow`).
    pub max_sessions: usize,
    /// A session with no packet either way for this long is closed (its upstream socket too).
    pub session_idle_timeout: Duration,
    /// Bytes per direction that may be in propagation (past the bottleneck, not yet delivered);
    /// beyond it packets are dropped (`Overflow`). Only an unlimited-rate, long-delay profile
    /// under a flood comes near the default.
    pub max_in_flight_bytes: usize,
    /// Server → client packets buffered between the session sockets and the downlink model.
    pub downlink_channel: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            max_sessions: 1024,
            session_idle_timeout: Duration::from_secs(60),
            max_in_flight_bytes: 32 << 20,
            downlink_channel: 4096,
        }
    }
}

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid link profile: {0}")]
    Profile(#[from] ProfileError),
    #[error("cannot bind the emulator's socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A running link emulator. Dropping it stops the relay at once; [`LinkEmulator::shutdown`]
/// stops it and returns the final counters.
#[derive(Debug)]
pub struct LinkEmulator {
    local_addr: SocketAddr,
    upstream: SocketAddr,
    profile: LinkProfile,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

#[derive(Debug)]
struct Shared {
    start: Instant,
    stats: Mutex<EmulatorStats>,
}

impl Shared {
    fn update<T>(&self, f: impl FnOnce(&mut EmulatorStats) -> T) -> T {
        // Counters stay meaningful even if a holder panicked mid-update.
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut stats)
    }

    fn since_start(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }
}

impl LinkEmulator {
    /// Listens on `listen` and relays to `upstream` through `profile`, with loss and jitter
    /// drawn from `seed` (uplink and downlink use independent streams of it).
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        profile: LinkProfile,
        seed: u64,
    ) -> Result<Self, StartError> {
        Self::start_with(listen, upstream, profile, seed, RelayOptions::default()).await
    }

    /// [`LinkEmulator::start`] with explicit limits.
    pub async fn start_with(
        listen: SocketAddr,
        upstream: SocketAddr,
        profile: LinkProfile,
        seed: u64,
        options: RelayOptions,
    ) -> Result<Self, StartError> {
        let uplink = Link::with_rng(profile.uplink.clone(), stream_rng(seed, 0))?;
        let downlink = Link::with_rng(profile.downlink.clone(), stream_rng(seed, 1))?;
        let socket = UdpSocket::bind(listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
        let socket = Arc::new(socket);
        let shared = Arc::new(Shared {
            start: Instant::now(),
            stats: Mutex::new(EmulatorStats::default()),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (down_tx, down_rx) = mpsc::channel(options.downlink_channel.max(1));

        let mut tasks = JoinSet::new();
        tasks.spawn(
            Uplink {
                client_socket: socket.clone(),
                upstream,
                link: uplink,
                shared: shared.clone(),
                down_tx,
                options: options.clone(),
                sessions: HashMap::new(),
                readers: JoinSet::new(),
                scheduled: Scheduler::new(options.max_in_flight_bytes),
            }
            .run(shutdown_rx.clone()),
        );
        tasks.spawn(
            Downlink {
                client_socket: socket,
                link: downlink,
                shared: shared.clone(),
                scheduled: Scheduler::new(options.max_in_flight_bytes),
            }
            .run(down_rx, shutdown_rx),
        );
        Ok(LinkEmulator {
            local_addr,
            upstream,
            profile,
            shared,
            shutdown,
            tasks,
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn profile(&self) -> &LinkProfile {
        &self.profile
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EmulatorStats {
        self.shared.update(|s| *s)
    }

    /// Stops relaying (packets still in the emulated link are discarded), closes every socket
    /// and returns the final counters.
    pub async fn shutdown(mut self) -> EmulatorStats {
        // Receivers only go away when the tasks have already ended.
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.stats()
    }
}

fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// A packet waiting out its propagation delay.
struct Entry<D> {
    at: Instant,
    seq: u64,
    dest: D,
    data: Vec<u8>,
}

impl<D> PartialEq for Entry<D> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<D> Eq for Entry<D> {}
impl<D> PartialOrd for Entry<D> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<D> Ord for Entry<D> {
    /// Reversed so `BinaryHeap` pops the earliest deadline; `seq` keeps equal deadlines FIFO.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Deadline-ordered packets of one direction, bounded in bytes.
struct Scheduler<D> {
    heap: BinaryHeap<Entry<D>>,
    bytes: usize,
    limit: usize,
    seq: u64,
}

impl<D> Scheduler<D> {
    fn new(limit: usize) -> Self {
        Scheduler {
            heap: BinaryHeap::new(),
            bytes: 0,
            limit,
            seq: 0,
        }
    }

    /// Queues `data` for `at`; `false` (and nothing queued) when over the byte limit.
    fn push(&mut self, at: Instant, dest: D, data: Vec<u8>) -> bool {
        if self.bytes + data.len() > self.limit {
            return false;
        }
        self.bytes += data.len();
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            dest,
            data,
        });
        true
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<(D, Vec<u8>)> {
        if self.heap.peek()?.at > now {
            return None;
        }
        let entry = self.heap.pop()?;
        self.bytes -= entry.data.len();
        Some((entry.dest, entry.data))
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Offers a packet to `link`, counts its fate and returns when to deliver it, if ever.
fn admit(
    link: &mut Link,
    shared: &Shared,
    direction: fn(&mut EmulatorStats) -> &mut DirectionStats,
    arrived: Instant,
    len: usize,
) -> Option<Instant> {
    let fate = link.offer(shared.since_start(arrived), len);
    shared.update(|s| {
        let d = direction(s);
        d.offered.add(len);
        match fate {
            Fate::Dropped(reason) => {
                d.dropped.get_mut(reason).add(len);
                None
            }
            Fate::Deliver(at) => Some(shared.start + at),
        }
    })
}

fn uplink_stats(s: &mut EmulatorStats) -> &mut DirectionStats {
    &mut s.uplink
}

fn downlink_stats(s: &mut EmulatorStats) -> &mut DirectionStats {
    &mut s.downlink
}

/// One client's upstream socket and the task reading the server's replies on it.
struct Session {
    socket: Arc<UdpSocket>,
    /// Milliseconds since the emulator's start at the last packet either way.
    last_active_ms: Arc<AtomicU64>,
    reader: AbortHandle,
}

/// A server → client packet handed from a session reader to the downlink task.
struct DownPacket {
    client: SocketAddr,
    arrived: Instant,
    data: Vec<u8>,
}

struct Uplink {
    client_socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    link: Link,
    shared: Arc<Shared>,
    down_tx: mpsc::Sender<DownPacket>,
    options: RelayOptions,
    sessions: HashMap<SocketAddr, Session>,
    readers: JoinSet<()>,
    scheduled: Scheduler<Arc<UdpSocket>>,
}

impl Uplink {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let reap_every = (self.options.session_idle_timeout / 4).max(Duration::from_millis(10));
        let mut reap = tokio::time::interval(reap_every);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                received = self.client_socket.recv_from(&mut buf) => match received {
                    Ok((len, client)) => self.on_client_packet(client, &buf[..len]),
                    // ICMP errors from earlier sends to clients surface here; nothing to do.
                    Err(e) => debug!(error = %e, "client socket receive error"),
                },
                () = sleep_until_some(self.scheduled.next_deadline()) => self.send_due(),
                _ = reap.tick() => self.reap_idle(),
                Some(_) = self.readers.join_next(), if !self.readers.is_empty() => {}
            }
        }
        // Dropping `readers` aborts the session readers.
    }

    fn on_client_packet(&mut self, client: SocketAddr, data: &[u8]) {
        let arrived = Instant::now();
        let Some(socket) = self.session_socket(client, arrived, data.len()) else {
            return;
        };
        let Some(at) = admit(
            &mut self.link,
            &self.shared,
            uplink_stats,
            arrived,
            data.len(),
        ) else {
            return;
        };
        if !self.scheduled.push(at, socket, data.to_vec()) {
            self.shared
                .update(|s| s.uplink.dropped.overflow.add(data.len()));
        }
    }

    /// The upstream socket for `client`, opening a session if needed; `None` (packet counted
    /// as dropped) when no session can be had.
    fn session_socket(
        &mut self,
        client: SocketAddr,
        arrived: Instant,
        len: usize,
    ) -> Option<Arc<UdpSocket>> {
        let now_ms = self.shared.since_start(arrived).as_millis() as u64;
        if let Some(session) = self.sessions.get(&client) {
            session
                .last_active_ms
                .store(now_ms, AtomicOrdering::Relaxed);
            return Some(session.socket.clone());
        }
        let refuse = |reason: DropReason| {
            self.shared.update(|s| {
                s.uplink.offered.add(len);
                s.uplink.dropped.get_mut(reason).add(len);
            });
            None
        };
        if self.sessions.len() >= self.options.max_sessions {
            warn!(%client, limit = self.options.max_sessions, "session limit reached; dropping");
            return refuse(DropReason::Overflow);
        }
        let socket = match connect_upstream(self.upstream) {
            Ok(socket) => Arc::new(socket),
            Err(e) => {
                warn!(%client, upstream = %self.upstream, error = %e, "cannot open upstream socket");
                return refuse(DropReason::SendFailed);
            }
        };
        let last_active_ms = Arc::new(AtomicU64::new(now_ms));
        let reader = self.readers.spawn(read_upstream(
            socket.clone(),
            client,
            last_active_ms.clone(),
            self.shared.clone(),
            self.down_tx.clone(),
        ));
        debug!(%client, local = ?socket.local_addr().ok(), "session opened");
        self.sessions.insert(
            client,
            Session {
                socket: socket.clone(),
                last_active_ms,
                reader,
            },
        );
        self.shared.update(|s| {
            s.sessions_opened += 1;
            s.sessions_active = self.sessions.len() as u64;
        });
        Some(socket)
    }

    fn send_due(&mut self) {
        let now = Instant::now();
        while let Some((socket, data)) = self.scheduled.pop_due(now) {
            let outcome = socket.try_send(&data);
            self.shared.update(|s| match outcome {
                Ok(_) => s.uplink.delivered.add(data.len()),
                Err(_) => s.uplink.dropped.send_failed.add(data.len()),
            });
        }
    }

    fn reap_idle(&mut self) {
        let now_ms = self.shared.since_start(Instant::now()).as_millis() as u64;
        let idle_ms = self.options.session_idle_timeout.as_millis() as u64;
        self.sessions.retain(|client, session| {
            let last = session.last_active_ms.load(AtomicOrdering::Relaxed);
            let keep = now_ms.saturating_sub(last) < idle_ms;
            if !keep {
                debug!(%client, "session idle; closing");
                session.reader.abort();
            }
            keep
        });
        let active = self.sessions.len() as u64;
        self.shared.update(|s| s.sessions_active = active);
    }
}

/// A fresh socket connected to `upstream`, bound to loopback when the server is local so the
/// emulator opens no externally reachable port.
fn connect_upstream(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match (upstream, upstream.ip().is_loopback()) {
        (SocketAddr::V4(_), true) => (Ipv4Addr::LOCALHOST, 0).into(),
        (SocketAddr::V4(_), false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (SocketAddr::V6(_), true) => (Ipv6Addr::LOCALHOST, 0).into(),
        (SocketAddr::V6(_), false) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(upstream)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Forwards the server's replies on one session socket to the downlink task.
async fn read_upstream(
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    last_active_ms: Arc<AtomicU64>,
    shared: Arc<Shared>,
    down_tx: mpsc::Sender<DownPacket>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(len) => {
                let arrived = Instant::now();
                last_active_ms.store(
                    shared.since_start(arrived).as_millis() as u64,
                    AtomicOrdering::Relaxed,
                );
                let packet = DownPacket {
                    client,
                    arrived,
                    data: buf[..len].to_vec(),
                };
                match down_tx.try_send(packet) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => shared.update(|s| {
                        s.downlink.offered.add(len);
                        s.downlink.dropped.overflow.add(len);
                    }),
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            // The server is not (yet) listening: the kernel reports the ICMP error here.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                debug!(%client, "upstream refused a packet");
            }
            Err(e) => {
                debug!(%client, error = %e, "upstream receive error");
                tokio::task::yield_now().await;
            }
        }
    }
}

struct Downlink {
    client_socket: Arc<UdpSocket>,
    link: Link,
    shared: Arc<Shared>,
    scheduled: Scheduler<SocketAddr>,
}

impl Downlink {
    async fn run(
        mut self,
        mut packets: mpsc::Receiver<DownPacket>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                packet = packets.recv() => match packet {
                    Some(packet) => self.on_server_packet(packet),
                    None => break,
                },
                () = sleep_until_some(self.scheduled.next_deadline()) => self.send_due(),
            }
        }
    }

    fn on_server_packet(&mut self, packet: DownPacket) {
        let len = packet.data.len();
        let Some(at) = admit(
            &mut self.link,
            &self.shared,
            downlink_stats,
            packet.arrived,
            len,
        ) else {
            return;
        };
        if !self.scheduled.push(at, packet.client, packet.data) {
            self.shared.update(|s| s.downlink.dropped.overflow.add(len));
        }
    }

    fn send_due(&mut self) {
        let now = Instant::now();
        while let Some((client, data)) = self.scheduled.pop_due(now) {
            let outcome = self.client_socket.try_send_to(&data, client);
            self.shared.update(|s| match outcome {
                Ok(_) => s.downlink.delivered.add(data.len()),
                Err(_) => s.downlink.dropped.send_failed.add(data.len()),
            });
        }
    }
}
