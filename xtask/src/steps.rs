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

/// How long `cargo xtask` ran before it started this process: the time from the parent
/// process's start (cargo) to this one's, which is xtask's compilation when it was built.
/// `None` where `/proc` does not tell.
fn xtask_build_time() -> Option<Duration> {
    let parent = start_ticks(&format!(
        "/proc/{}/stat",
        std::os::unix::process::parent_id()
    ))?;
    let this = start_ticks("/proc/self/stat")?;
    // Start times are in clock ticks since boot; Linux's USER_HZ is 100 on every architecture
    // it exports to user space.
    Some(Duration::from_millis(this.checked_sub(parent)? * 10))
}

/// Field 22 of `/proc/PID/stat`, the process's start time in clock ticks since boot.
fn start_ticks(stat: &str) -> Option<u64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; fields from the third
    // on follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}
