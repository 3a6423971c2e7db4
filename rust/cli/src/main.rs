//! `uhlm`, the command line: fetch and derive models, tokenize, generate locally or against a
//! server (`run`), serve, demo, calibrate, benchmark and load-test.

mod bench;
mod calibrate;
mod capacity;
mod demo;
mod generate;
mod humaneval;
mod loadgen;
mod models;
mod pair_args;
mod paper;
mod pipeline;
mod report_output;
mod run;
mod tokenize;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "uhlm",
    version,
    about = "Uncertainty-aware hybrid language models"
)]
struct Cli {
    /// More logging on stderr (-v info, -vv debug); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch, list and derive models in the local cache.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Print the token ids of TEXT, comma-separated.
    Tokenize(tokenize::TokenizeArgs),
    /// Generate text locally with one model.
    Generate(generate::GenerateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Fit rejection probability against uncertainty on an SLM/LLM pair; write a calibration.
    Calibrate(calibrate::CalibrateArgs),
    /// Generate with the hybrid loop against a uhlm server.
    Run(run::RunArgs),
    /// Host the LLM for devices over QUIC (the same server as the `uhlm-server` binary).
    Serve(uhlm_server::serve::ServeArgs),
    /// Run the whole system locally: in-process server, on-device draft, coloured tokens.
    Demo(demo::DemoArgs),
    /// Many devices against one server, every generation checked (the soak campaign's load).
    Loadgen(loadgen::LoadgenArgs),
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let result = match cli.command {
        Command::Models(cmd) => models::run(cmd),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Run(args) => run::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Loadgen(args) => loadgen::run(args),
        Command::Serve(args) => uhlm_server::serve::serve_blocking(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
