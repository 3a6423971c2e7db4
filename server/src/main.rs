//! `uhlm-server`: the verification server binary (see [`uhlm_server::serve`] for what it prints).

use clap::Parser;
use uhlm_server::serve::{ServeArgs, serve_blocking};

/// Hosts the LLM for uhlm devices over QUIC.
#[derive(Debug, Parser)]
#[command(name = "uhlm-server", version, about)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    serve_blocking(Cli::parse().serve)
}
