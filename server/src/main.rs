//! `uhlm-server`: the verification server binary.
//!
//! Prints one machine-readable line once it listens, e.g.
//! `uhlm-server listening on 127.0.0.1:4433 fingerprint <sha256 hex>`, then
//! `uhlm-server metrics on 127.0.0.1:9464` when the metrics endpoint is enabled.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use uhlm_server::{Server, ServerArgs, ServerConfig};

/// Hosts the LLM for uhlm devices over QUIC.
#[derive(Debug, Parser)]
#[command(name = "uhlm-server", version, about)]
struct Cli {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    args: ServerArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => ServerConfig::from_toml_file(path)?,
        None => ServerConfig::default(),
    };
    cli.args.apply(&mut config);
    if config.self_signed && config.cert_dir.is_none() {
        config.cert_dir = Some(std::env::current_dir().context("current directory")?);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("uhlm-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let handle = Server::start(config)
        .await
        .context("starting uhlm-server")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "uhlm-server listening on {} fingerprint {}",
            handle.local_addr(),
            handle.cert_fingerprint()
        )?;
        if let Some(addr) = handle.metrics_addr() {
            writeln!(out, "uhlm-server metrics on {addr}")?;
        }
        out.flush()?;
    }
    wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight requests");
    handle.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    Ok(())
}
