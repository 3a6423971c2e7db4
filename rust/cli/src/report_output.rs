//! How every benchmark hands its report to the user: JSON on request, else its table and where
//! its files are. The `bench` subcommands share it.

use anyhow::Result;

/// Prints a benchmark's report on stdout: one JSON object (`--json`), or its table followed by
/// where its files are.
pub fn print_report<R: serde::Serialize>(
    report: &R,
    json: bool,
    dir: &std::path::Path,
    table: impl FnOnce(&R, &mut std::io::StdoutLock<'static>) -> Result<()>,
) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(report)?)?;
    } else {
        table(report, &mut out)?;
        writeln!(out, "files in {}", dir.display())?;
    }
    Ok(())
}
