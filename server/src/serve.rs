//! What the `uhlm-server` binary and `uhlm serve` run: flags over an optional TOML file, a
//! runtime, one machine-readable line on stdout once listening, and a graceful stop on Ctrl-C
//! or SIGTERM. Scripts (and `uhlm bench paper`) read the address and pin from that line:
//! `uhlm-server listening on 127.0.0.1:4433 fingerprint <sha256 hex>`, then
//! `uhlm-server metrics on 127.0.0.1:9464` when the metrics endpoint is enabled.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::{Server, ServerArgs, ServerConfig};

/// The command line of a server.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub args: ServerArgs,
}

/// Runs a server until Ctrl-C or SIGTERM, then lets in-flight requests finish.
pub fn serve_blocking(cli: ServeArgs) -> anyhow::Result<()> {
    return_big_frees_to_the_os();
    let mut config = match &cli.config {
        Some(path) => ServerConfig::from_toml_file(path)?,
        None => ServerConfig::default(),
    };
    cli.args.apply(&mut config)?;
    if config.self_signed && config.cert_dir.is_none() {
        config.cert_dir = Some(default_cert_dir()?);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("uhlm-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

/// Makes every allocation of 1 MiB or more its own mapping, returned to the OS when freed: the
/// KV caches of evicted and closed sessions. Without it glibc raises its mmap threshold after
/// the first such free (up to 32 MiB), serves later caches from its heap and keeps the server's
/// resident memory at its high-water mark, whatever the KV budget evicts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_big_frees_to_the_os() {
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_big_frees_to_the_os() {}

/// Where a self-signed pair lives unless told otherwise: the user's configuration directory
/// (`$XDG_CONFIG_HOME/uhlm`, `~/.config/uhlm`), never whatever directory the server was started
/// from.
fn default_cert_dir() -> anyhow::Result<PathBuf> {
    let dir = dirs::config_dir()
        .context("no configuration directory for the self-signed pair: give --cert-dir")?;
    Ok(dir.join("uhlm"))
}

async fn serve(config: ServerConfig) -> anyhow::Result<()> {
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
    tracing::info!("shutting down: finishing in-flight requests (a second signal stops at once)");
    tokio::select! {
        () = handle.shutdown() => Ok(()),
        r = wait_for_signal() => {
            r?;
            tracing::warn!("second signal: stopping without waiting for in-flight requests");
            // 128 + SIGINT, the status a shell reports for an interrupted program.
            std::process::exit(130);
        }
    }
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
