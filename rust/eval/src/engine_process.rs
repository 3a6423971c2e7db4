//! A llama.cpp `llama-server` child process for the measured runs on another engine
//! (`uhlm bench humaneval --engine llama-server`): the gateway then runs with `--engine
//! llama-server URL` in front of it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::EvalError;

/// Environment variable naming the `llama-server` binary (`cargo xtask llama-server` prints
/// one); without it, `llama-server` is looked up on `PATH`.
pub const LLAMA_SERVER_ENV: &str = "UHLM_LLAMA_SERVER";

/// A `llama-server` serving one model on a free loopback port; killed on drop.
pub struct EngineProcess {
    child: Child,
    url: String,
}

impl EngineProcess {
    /// Starts llama-server on `model` with `slots` sequences of `ctx` tokens each and
    /// `threads` CPU threads, and waits (up to two minutes) until it answers `/health`.
    pub fn start(
        model: &Path,
        slots: usize,
        ctx: usize,
        threads: usize,
    ) -> Result<Self, EvalError> {
        let fail = |reason: String| EvalError::Server(format!("llama-server: {reason}"));
        let binary = std::env::var_os(LLAMA_SERVER_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("llama-server"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| fail(format!("no free port: {e}")))?
            .port();
        let mut child = Command::new(&binary)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-np", &slots.to_string(), "-c", &(slots * ctx).to_string()])
            .args(["-t", &threads.to_string(), "--no-webui"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot start {} ({e}); build one with `cargo xtask llama-server` and set \
                     {LLAMA_SERVER_ENV}",
                    binary.display()
                ))
            })?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !healthy(&addr) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(fail(format!("exited at start ({status})")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(fail("did not become healthy within two minutes".into()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Self {
            child,
            url: format!("http://{addr}"),
        })
    }

    /// Its process id (CPU and memory are counted with the gateway's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The arguments that put `uhlm serve` in front of it: `--engine llama-server URL`.
    pub fn serve_args(&self) -> [&str; 3] {
        ["--engine", "llama-server", &self.url]
    }
}

/// Whether `GET /health` answers 200 (the model is loaded).
fn healthy(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
