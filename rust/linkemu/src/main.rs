//! `uhlm-linkemu`: relay UDP between a client and a server through an emulated link.
//!
//! ```text
//! uhlm-server --listen 127.0.0.1:4433 ...
//! uhlm-linkemu --listen 127.0.0.1:5544 --upstream 127.0.0.1:4433 --profile cell-edge --seed 7
//! uhlm run --server 127.0.0.1:5544 ...
//! ```

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tracing::info;
use uhlm_linkemu::{DirectionStats, LinkEmulator, LinkProfile, profile::PRESET_NAMES};

#[derive(Parser, Debug)]
#[command(
    name = "uhlm-linkemu",
    version,
    about = "Userspace UDP link emulator: rate, queue, delay, jitter and loss per direction, no root needed."
)]
struct Args {
    /// Address clients send to.
    #[arg(long, default_value = "127.0.0.1:5544", env = "UHLM_LINKEMU_LISTEN")]
    listen: SocketAddr,
    /// The server's UDP address.
    #[arg(
        long,
        env = "UHLM_LINKEMU_UPSTREAM",
        required_unless_present = "list_profiles"
    )]
    upstream: Option<SocketAddr>,
    /// A preset (ideal, good, cell-edge, poor) optionally followed by overrides, e.g.
    /// `poor,up.loss=5%,rtt=200ms` or `rate=1mbit,queue=32KiB,delay=20ms,loss=1%`.
    #[arg(long, default_value = "good", env = "UHLM_LINKEMU_PROFILE")]
    profile: LinkProfile,
    /// Seed for loss and jitter; a random one (printed) when absent.
    #[arg(long, env = "UHLM_LINKEMU_SEED")]
    seed: Option<u64>,
    /// How often to log the counters.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    stats_interval: Duration,
    /// Print the presets as JSON, one per line, and exit.
    #[arg(long)]
    list_profiles: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    if args.list_profiles {
        for name in PRESET_NAMES {
            let profile = LinkProfile::preset(name).context("preset list out of date")?;
            println!("{}", serde_json::to_string(&profile)?);
        }
        return Ok(());
    }
    let upstream = args.upstream.context("--upstream is required to relay")?;
    let seed = args.seed.unwrap_or_else(rand::random);

    let emulator = LinkEmulator::start(args.listen, upstream, args.profile.clone(), seed)
        .await
        .with_context(|| format!("starting the link emulator on {}", args.listen))?;
    // Scripts wait for this line on stdout before starting the client.
    println!("uhlm-linkemu listening on {}", emulator.local_addr());
    info!(
        profile = %args.profile,
        upstream = %upstream,
        seed,
        uplink = ?args.profile.uplink,
        downlink = ?args.profile.downlink,
        "relaying"
    );

    let mut ticker = tokio::time::interval(args.stats_interval.max(Duration::from_millis(100)));
    ticker.tick().await;
    loop {
        tokio::select! {
            signal = tokio::signal::ctrl_c() => {
                signal.context("waiting for Ctrl-C")?;
                break;
            }
            _ = ticker.tick() => log_stats("stats", &emulator.stats()),
        }
    }
    let stats = emulator.shutdown().await;
    log_stats("final", &stats);
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

fn log_stats(what: &str, stats: &uhlm_linkemu::EmulatorStats) {
    let line = |d: &DirectionStats| {
        format!(
            "offered {} pkt / {} B, delivered {} pkt / {} B, dropped queue {} loss {} overflow {} send {}",
            d.offered.packets,
            d.offered.bytes,
            d.delivered.packets,
            d.delivered.bytes,
            d.dropped.queue_full.packets,
            d.dropped.loss.packets,
            d.dropped.overflow.packets,
            d.dropped.send_failed.packets,
        )
    };
    info!(
        sessions = stats.sessions_active,
        uplink = %line(&stats.uplink),
        downlink = %line(&stats.downlink),
        "{what}"
    );
}
