//! The relay on real loopback sockets: a UDP echo server behind the emulator.
//!
//! Assertions are on what the emulator does to traffic (RTT at least the profile's, loss near
//! it, throughput never above the configured rate), with coarse upper bounds on delay so a
//! loaded 2-core CI machine passes; nothing asserts how fast our own code runs. Every test sends
//! a bounded number of packets and finishes in a few seconds.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use uhlm_linkemu::{EmulatorStats, LinkEmulator, LinkProfile, RelayOptions};

const LOOPBACK: &str = "127.0.0.1:0";
/// How long a receiver waits for stragglers once nothing more is expected.
const QUIET: Duration = Duration::from_millis(1500);

/// An echo server; returns its address. It stops when the test's runtime shuts down.
async fn echo_server() -> SocketAddr {
    let socket = UdpSocket::bind(LOOPBACK).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    addr
}

async fn emulator(profile: &str, seed: u64) -> LinkEmulator {
    let profile: LinkProfile = profile.parse().unwrap();
    LinkEmulator::start(
        LOOPBACK.parse().unwrap(),
        echo_server().await,
        profile,
        seed,
    )
    .await
    .unwrap()
}

async fn client(emulator: &LinkEmulator) -> UdpSocket {
    let socket = UdpSocket::bind(LOOPBACK).await.unwrap();
    socket.connect(emulator.local_addr()).await.unwrap();
    socket
}

/// Packet layout: sequence number, then send time in ns since `base`, then padding.
fn stamp(buf: &mut [u8], seq: u64, base: Instant) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    let ns = base.elapsed().as_nanos() as u64;
    buf[8..16].copy_from_slice(&ns.to_le_bytes());
}

fn read_stamp(buf: &[u8], base: Instant) -> (u64, Instant) {
    let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let ns = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    (seq, base + Duration::from_nanos(ns))
}

struct Echoes {
    sent: usize,
    /// Round-trip time of every packet that came back, in seconds.
    rtts: Vec<f64>,
    bytes_back: usize,
    first_sent: Instant,
    last_back: Instant,
}

/// Sends `count` packets of `len` bytes, `per_tick` of them every `tick`, and collects echoes.
async fn send_and_echo(
    socket: &UdpSocket,
    count: usize,
    len: usize,
    per_tick: usize,
    tick: Duration,
) -> Echoes {
    let base = Instant::now();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut out = vec![0u8; len];
    let mut back = vec![0u8; 65_535];
    let mut seen = vec![false; count];
    let mut echoes = Echoes {
        sent: 0,
        rtts: Vec::new(),
        bytes_back: 0,
        first_sent: base,
        last_back: base,
    };
    let mut receive = |n: usize, back: &[u8], echoes: &mut Echoes| {
        let now = Instant::now();
        let (seq, sent_at) = read_stamp(&back[..n], base);
        let seq = seq as usize;
        assert!(
            seq < count && !seen[seq],
            "unexpected or duplicate echo {seq}"
        );
        seen[seq] = true;
        echoes.rtts.push((now - sent_at).as_secs_f64());
        echoes.bytes_back += n;
        echoes.last_back = now;
    };
    while echoes.sent < count {
        tokio::select! {
            _ = ticker.tick() => {
                for _ in 0..per_tick.min(count - echoes.sent) {
                    stamp(&mut out, echoes.sent as u64, base);
                    if echoes.sent == 0 {
                        echoes.first_sent = Instant::now();
                    }
                    socket.send(&out).await.unwrap();
                    echoes.sent += 1;
                }
            }
            n = socket.recv(&mut back) => receive(n.unwrap(), &back, &mut echoes),
        }
    }
    while echoes.rtts.len() < count {
        match timeout(QUIET, socket.recv(&mut back)).await {
            Ok(n) => receive(n.unwrap(), &back, &mut echoes),
            Err(_) => break,
        }
    }
    echoes
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::MAX, f64::min)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_profile_small_packets_rtt_and_no_loss() {
    let emu = emulator("good", 1).await;
    let profile = emu.profile().clone();
    let socket = client(&emu).await;
    let echoes = send_and_echo(&socket, 2000, 64, 2, Duration::from_millis(2)).await;

    let rtt = profile.rtt().as_secs_f64();
    assert!(
        min(&echoes.rtts) >= rtt,
        "min RTT {} < {rtt}",
        min(&echoes.rtts)
    );
    let mean_rtt = mean(&echoes.rtts);
    eprintln!(
        "good: {} of {} back, RTT min {:.4} s mean {mean_rtt:.4} s (profile {rtt} s)",
        echoes.rtts.len(),
        echoes.sent,
        min(&echoes.rtts)
    );
    assert!(mean_rtt < rtt + 0.1, "mean RTT {mean_rtt} far above {rtt}");
    // No loss configured; allow a sliver for a starved CI machine.
    assert!(
        echoes.rtts.len() as f64 >= 0.99 * echoes.sent as f64,
        "{} of {} back",
        echoes.rtts.len(),
        echoes.sent
    );

    let stats = emu.shutdown().await;
    assert_eq!(stats.uplink.offered.packets, 2000);
    assert_eq!(stats.uplink.dropped.loss.packets, 0);
    assert_eq!(stats.downlink.delivered.packets as usize, echoes.rtts.len());
    assert_eq!(stats.sessions_opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poor_profile_small_packets_rtt_and_loss() {
    let emu = emulator("poor", 2).await;
    let profile = emu.profile().clone();
    let socket = client(&emu).await;
    // 32-byte packets every 2 ms use half the 256 kbit/s uplink: loss, not queueing.
    let echoes = send_and_echo(&socket, 2000, 32, 1, Duration::from_millis(2)).await;

    let floor = (profile.rtt() - profile.uplink.jitter - profile.downlink.jitter).as_secs_f64()
        + (profile.uplink.serialisation(32) + profile.downlink.serialisation(32)).as_secs_f64();
    assert!(
        min(&echoes.rtts) >= floor,
        "min RTT {} < {floor}",
        min(&echoes.rtts)
    );
    let rtt = profile.rtt().as_secs_f64();
    let mean_rtt = mean(&echoes.rtts);
    // Jitter averages out (±10 ms each way, ~1900 samples); in-order delivery only adds.
    assert!(mean_rtt >= rtt - 0.002, "mean RTT {mean_rtt} below {rtt}");
    assert!(mean_rtt < rtt + 0.1, "mean RTT {mean_rtt} far above {rtt}");

    let survive = (1.0 - profile.uplink.mean_loss()) * (1.0 - profile.downlink.mean_loss());
    let expected = 1.0 - survive;
    let lost = 1.0 - echoes.rtts.len() as f64 / echoes.sent as f64;
    let se = (expected * (1.0 - expected) / echoes.sent as f64).sqrt();
    eprintln!(
        "poor: round-trip loss {lost:.4} (profile {expected:.4}), RTT min {:.4} s mean {mean_rtt:.4} s (profile {rtt} s)",
        min(&echoes.rtts)
    );
    assert!(
        (lost - expected).abs() < 4.0 * se,
        "round-trip loss {lost:.4} vs {expected:.4} (SE {se:.4})"
    );

    let stats = emu.shutdown().await;
    assert_eq!(stats.uplink.dropped.queue_full.packets, 0);
    assert_eq!(
        stats.uplink.dropped.loss.packets + stats.downlink.dropped.loss.packets,
        (echoes.sent - echoes.rtts.len()) as u64
    );
}

/// Offers 1000-byte packets at about 1.5× the uplink rate; the bottleneck must hold the rate.
async fn bulk(
    profile: &str,
    packets: usize,
    per_tick: usize,
    tick: Duration,
) -> (f64, f64, EmulatorStats) {
    let emu = emulator(profile, 3).await;
    let rate = emu.profile().uplink.rate_bps.unwrap() as f64;
    let socket = client(&emu).await;
    let echoes = send_and_echo(&socket, packets, 1000, per_tick, tick).await;
    let stats = emu.shutdown().await;
    // Every byte that came back crossed the uplink after the first was sent, so this is a hard
    // upper bound whatever the scheduling delays.
    let span = (echoes.last_back - echoes.first_sent).as_secs_f64();
    let measured = echoes.bytes_back as f64 * 8.0 / span;
    eprintln!("{profile} bulk: {measured:.0} bit/s measured through {rate} bit/s, {stats:?}");
    (measured, rate, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poor_profile_bulk_throughput_is_capped_at_the_rate() {
    // 96 kB at ~50 kB/s into a 32 kB/s uplink with a 16 KiB queue.
    let (measured, rate, stats) = bulk("poor", 96, 1, Duration::from_millis(20)).await;
    assert!(
        stats.uplink.dropped.queue_full.packets > 0,
        "the queue never filled: {stats:?}"
    );
    assert!(
        measured <= rate * 1.05,
        "{measured:.0} bit/s through a {rate} bit/s link"
    );
    // Coarse: the bottleneck was busy for most of the transfer (minus loss and the RTT).
    assert!(
        measured >= rate * 0.5,
        "{measured:.0} bit/s through a {rate} bit/s link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_profile_bulk_throughput_is_capped_at_the_rate() {
    // ~1.9 MB at ~9.4 MB/s offered into 6.25 MB/s with a 256 KiB queue.
    // On a loaded machine the kernel's socket buffers may drop some first; only the cap is
    // asserted.
    let (measured, rate, _) = bulk("good", 1880, 47, Duration::from_millis(5)).await;
    assert!(
        measured <= rate * 1.05,
        "{measured:.0} bit/s through a {rate} bit/s link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_gets_its_own_session_and_only_its_replies() {
    let emu = emulator("good", 4).await;
    let a = client(&emu).await;
    let b = client(&emu).await;
    for i in 0..20u8 {
        a.send(&[b'a', i]).await.unwrap();
        b.send(&[b'b', i]).await.unwrap();
    }
    for (socket, tag) in [(&a, b'a'), (&b, b'b')] {
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 20 {
            let n = timeout(QUIET, socket.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..1], &[tag]);
            got.push(buf[1]);
            assert_eq!(n, 2);
        }
        // In order: jitter-free profile, one bottleneck.
        assert_eq!(got, (0..20).collect::<Vec<u8>>());
    }
    let stats = emu.stats();
    assert_eq!(stats.sessions_opened, 2);
    assert_eq!(stats.sessions_active, 2);
    assert_eq!(stats.uplink.delivered.packets, 40);
    assert_eq!(stats.downlink.delivered.packets, 40);
    assert_eq!(stats.uplink.in_flight_packets(), 0);

    let addr = emu.local_addr();
    emu.shutdown().await;
    // The port is released: a fresh socket can bind it.
    UdpSocket::bind(addr).await.unwrap();
}

#[tokio::test]
async fn bad_profile_and_busy_port_are_errors() {
    let taken = UdpSocket::bind(LOOPBACK).await.unwrap();
    let err = LinkEmulator::start(
        taken.local_addr().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
        LinkProfile::good(),
        0,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, uhlm_linkemu::StartError::Bind { .. }),
        "{err}"
    );

    let mut profile = LinkProfile::good();
    profile.uplink.loss = 2.0;
    let err = LinkEmulator::start(
        LOOPBACK.parse().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
        profile,
        0,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, uhlm_linkemu::StartError::Profile(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_limited_and_closed_when_idle() {
    let options = RelayOptions {
        max_sessions: 1,
        session_idle_timeout: Duration::from_millis(200),
        ..RelayOptions::default()
    };
    let emu = LinkEmulator::start_with(
        LOOPBACK.parse().unwrap(),
        echo_server().await,
        LinkProfile::ideal(),
        5,
        options,
    )
    .await
    .unwrap();
    let a = client(&emu).await;
    let b = client(&emu).await;
    let mut buf = [0u8; 8];
    a.send(b"a").await.unwrap();
    timeout(QUIET, a.recv(&mut buf)).await.unwrap().unwrap();
    // The only session slot is taken: b's packet is dropped, not relayed.
    b.send(b"b").await.unwrap();
    assert!(
        timeout(Duration::from_millis(300), b.recv(&mut buf))
            .await
            .is_err()
    );
    let stats = emu.stats();
    assert_eq!(stats.uplink.dropped.overflow.packets, 1);
    assert_eq!(stats.sessions_opened, 1);

    // After a's session idles out (the relay's own stats say when), b gets the slot.
    let deadline = Instant::now() + QUIET * 10;
    while emu.stats().sessions_active > 0 {
        assert!(
            Instant::now() < deadline,
            "a's idle session was never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.send(b"b").await.unwrap();
    let n = timeout(QUIET, b.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"b");
    let stats = emu.shutdown().await;
    assert_eq!(stats.sessions_opened, 2);
    assert_eq!(stats.sessions_active, 1);
}
