//! `cargo xtask`: the project's commands in one place, instead of shell scripts.
//!
//! `cargo xtask demo` runs the main job; `cargo xtask test` runs every test (it is what
//! `.ci/run` calls). Both install what they need and are safe to re-run.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(about = "uhlm project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the demo (the README's first command).
    Demo {
        /// Extra arguments for the demo.
        args: Vec<String>,
    },
    /// Run every check and test (the README's second command; what CI runs).
    Test,
    /// Check that uhlm-core stays free of I/O, async and model crates.
    CheckCoreDeps,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Demo { args } => demo(&args),
        Task::Test => test(),
        Task::CheckCoreDeps => check_core_deps(),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// Runs a command in the repository root, echoing it, failing on a non-zero exit.
fn run(program: &str, args: &[&str]) -> Result<()> {
    println!("\n==> {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    let mut cmd = vec![
        "run",
        "--release",
        "-p",
        "uhlm-core",
        "--example",
        "hybrid_step",
    ];
    if !args.is_empty() {
        cmd.push("--");
        cmd.extend(args.iter().map(String::as_str));
    }
    run("cargo", &cmd)
}

fn test() -> Result<()> {
    run("cargo", &["fmt", "--all", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    check_core_deps()?;
    run("cargo", &["test", "--workspace"])?;
    Ok(())
}

/// Crates that would mean uhlm-core does I/O, runs async, or links a model runtime.
const FORBIDDEN_IN_CORE: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "quinn",
    "rustls",
    "candle-core",
    "tokenizers",
    "reqwest",
    "hyper",
];

fn check_core_deps() -> Result<()> {
    println!("\n==> cargo tree -p uhlm-core -e normal");
    let out = Command::new("cargo")
        .args([
            "tree",
            "-p",
            "uhlm-core",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(root())
        .output()
        .context("cannot run cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8(out.stdout).context("cargo tree printed non-UTF-8")?;
    let found: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| FORBIDDEN_IN_CORE.contains(name))
        .collect();
    if !found.is_empty() {
        bail!("uhlm-core must stay I/O-free but depends on {found:?}");
    }
    println!("uhlm-core depends on none of {FORBIDDEN_IN_CORE:?}");
    Ok(())
}
