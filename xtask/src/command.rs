//! Running a program in the repository root: echoed and timed, failing on a non-zero exit,
//! or with its output captured.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// Runs a command in the repository root, echoing it, failing on a non-zero exit.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    run_with_env(program, args, &[])
}

/// [`run`] with extra environment variables.
pub(crate) fn run_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    println!("\n==> {program} {}", args.join(" "));
    let started = std::time::Instant::now();
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    // Where a CI run's time goes, step by step.
    println!(
        "<== {program} {} ({:.0} s)",
        args.iter()
            .find(|a| !a.starts_with('-'))
            .copied()
            .unwrap_or(""),
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

/// `cargo ARGS` in the repository root, its output captured: stdout, or an error with its
/// stderr.
pub(crate) fn cargo_stdout(args: &[&str]) -> Result<String> {
    let what = format!("cargo {}", args.join(" "));
    let out = Command::new("cargo")
        .args(args)
        .current_dir(root())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8(out.stdout).with_context(|| format!("{what} printed non-UTF-8"))
}
