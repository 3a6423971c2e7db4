//! The time each step of `cargo xtask test` took, printed as a table at the end of every run,
//! passed or failed, so that whoever reads a CI log sees where the time went.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;

/// One finished (or failed) step.
struct Step {
    name: String,
    took: Duration,
    passed: bool,
}

static STEPS: Mutex<Vec<Step>> = Mutex::new(Vec::new());

/// Marks the end of xtask's build: call first thing in `main`'s command.
pub fn begin() {
    xtask_build_time();
}

/// Runs `f` as the step `name`, recording how long it took and whether it passed.
pub fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let result = f();
    STEPS
        .lock()
        .expect("no step panics while recording")
        .push(Step {
            name: name.to_string(),
            took: started.elapsed(),
            passed: result.is_ok(),
        });
    result
}

/// Prints every recorded step with its seconds, the build of xtask itself first (what
/// `cargo xtask` compiled before this process started), and the total.
pub fn print_table(passed: bool) {
    let steps = STEPS.lock().expect("no step panics while recording");
    let build = xtask_build_time();
    let total = build.unwrap_or_default() + steps.iter().map(|s| s.took).sum::<Duration>();
    println!("\n{:<40} {:>8}", "cargo xtask test, step", "seconds");
    match build {
        Some(took) => println!("{:<40} {:>8.0}", "building xtask", took.as_secs_f64()),
        None => println!("{:<40} {:>8}", "building xtask", "?"),
    }
    for s in steps.iter() {
        let mark = if s.passed { "" } else { "  FAILED" };
        println!("{:<40} {:>8.0}{mark}", s.name, s.took.as_secs_f64());
    }
    let outcome = if passed { "passed" } else { "failed" };
    println!(
        "{:<40} {:>8.0}",
        format!("total ({outcome})"),
        total.as_secs_f64()
    );
}

/// How long `cargo xtask` ran before this process's `main`: the time from the process's start
/// to the first call (from [`begin`]). Cargo and rustup's proxy `exec` on Unix, so the
/// process that `.ci/run` started as `cargo` is this one, and that time is xtask's build.
/// `None` where `/proc` does not tell.
fn xtask_build_time() -> Option<Duration> {
    *BUILD_TIME.get_or_init(|| {
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold spaces; fields from the
        // third on follow the last ')'. Field 22 is the start time in clock ticks since boot,
        // and Linux's USER_HZ is 100 on every architecture it exports to user space.
        let rest = &text[text.rfind(')')? + 1..];
        let started: f64 = rest.split_whitespace().nth(22 - 3)?.parse().ok()?;
        Some(Duration::from_secs_f64((uptime - started / 100.0).max(0.0)))
    })
}

static BUILD_TIME: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
