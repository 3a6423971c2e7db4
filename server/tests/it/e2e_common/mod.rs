//! End-to-end test support: a real `uhlm-server` process on loopback, SDK engines pointed at
//! it, the LLM-alone reference generation, and a listener that records events.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use statrs::distribution::{ChiSquared, ContinuousCDF};
use uhlm_model::{LoadOptions, Model};
use uhlm_sdk::{Codec, EngineConfig, Mode, PolicyConfig, TokenEvent, TokenListener, TokenSource};

/// The default LLM in the model cache (`$UHLM_MODELS`, else the user's cache dir).
pub fn llm_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| cached_file("SmolLM2-135M-Instruct.Q4_1.gguf"))
}
/// Gemma 3 270M in the model cache: a model with another vocabulary.
pub fn gemma_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| cached_file("gemma-3-270m-q4_k_m.gguf"))
}
pub const API_KEY: &str = "e2e-key";

/// The default on-device draft: the cached one, else derived once into the target dir.
pub fn draft_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let cached = Path::new(llm_path()).with_file_name(uhlm_model::DEFAULT_DRAFT_FILE_NAME);
        if cached.is_file() {
            return cached;
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("uhlm-e2e");
        std::fs::create_dir_all(&dir).expect("create the draft cache dir");
        let out = dir.join(uhlm_model::DEFAULT_DRAFT_FILE_NAME);
        if !out.is_file() {
            // Derive under a unique name and rename: test binaries may race for it.
            let tmp = dir.join(format!("draft-{}.tmp", std::process::id()));
            uhlm_model::derive_draft(
                Path::new(llm_path()),
                &tmp,
                &uhlm_model::DeriveOptions::default_draft(),
            )
            .expect("derive the default draft");
            std::fs::rename(&tmp, &out).expect("publish the draft");
        }
        out
    })
    .clone()
}

/// A `uhlm-server` child process; killed on drop.
pub struct ServerProc {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub metrics: SocketAddr,
    dir: tempfile::TempDir,
    /// More `uhlm-server` flags, used from the next [`restart`](Self::restart) on.
    pub extra_args: Vec<String>,
    model: String,
}

impl ServerProc {
    /// Starts a server on a free loopback port with a self-signed certificate.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with more `uhlm-server` flags (kept for restarts).
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_model(llm_path(), extra_args)
    }

    /// [`start_with`](Self::start_with) serving the model at `model` instead of the default.
    pub fn start_model(model: &str, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("keys.txt"), format!("{API_KEY}\n")).expect("keys file");
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let (child, addr, fingerprint, metrics) = spawn(
            model,
            dir.path(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &extra_args,
        );
        Self {
            child: Some(child),
            addr,
            fingerprint,
            metrics,
            dir,
            extra_args,
            model: model.to_string(),
        }
    }

    /// Kills the process without any goodbye (like a crash or a pulled cable).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same certificate (same pin).
    pub fn restart(&mut self) {
        self.kill();
        let (child, addr, fingerprint, metrics) =
            spawn(&self.model, self.dir.path(), self.addr, &self.extra_args);
        assert_eq!(addr, self.addr, "restarted on another address");
        assert_eq!(fingerprint, self.fingerprint, "the certificate changed");
        self.child = Some(child);
        self.metrics = metrics;
    }

    /// A handle that kills the process from another thread (e.g. a token listener).
    pub fn killer(&mut self) -> Killer {
        Killer(Arc::new(Mutex::new(self.child.take())))
    }

    /// Reads one Prometheus sample (`uhlm_sessions`, `uhlm_uplink_bytes_total`, ...).
    pub fn metric(&self, name: &str) -> f64 {
        read_metric(self.metrics, name)
    }

    /// Waits (up to 20 s) until `metric(name)` satisfies `ok`; returns the last value.
    pub fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.metric(name);
            if ok(v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Engine settings for this server, with short timeouts so offline tests stay quick.
    pub fn engine_config(&self, mode: Mode, codec: Codec, policy: PolicyConfig) -> EngineConfig {
        EngineConfig {
            slm_path: draft_path(),
            server: Some(self.addr.to_string()),
            pin: Some(self.fingerprint.clone()),
            api_key: API_KEY.into(),
            mode,
            codec,
            policy,
            threads: Some(1),
            connect_timeout_ms: 3_000,
            request_timeout_ms: 3_000,
            reconnect_backoff_ms: 100,
            reconnect_backoff_max_ms: 500,
            ..EngineConfig::default()
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills a server process from any thread.
#[derive(Clone)]
pub struct Killer(Arc<Mutex<Option<Child>>>);

impl Killer {
    pub fn kill(&self) {
        if let Some(mut c) = self.0.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads one sample from a server's `/metrics` endpoint at `addr`.
pub fn read_metric(addr: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request /metrics");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read /metrics");
    body.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<f64>().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{body}"))
}

fn spawn(
    model: &str,
    dir: &Path,
    listen: SocketAddr,
    extra_args: &[String],
) -> (Child, SocketAddr, String, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_uhlm-server"))
        .args([
            "--model",
            model,
            "--listen",
            &listen.to_string(),
            "--self-signed",
        ])
        .arg("--cert-dir")
        .arg(dir)
        .arg("--api-keys")
        .arg(dir.join("keys.txt"))
        .args(["--metrics", "127.0.0.1:0", "--kernel-threads", "1"])
        .args(extra_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn uhlm-server");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut listening = None;
    let mut metrics = None;
    while listening.is_none() || metrics.is_none() {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => panic!("uhlm-server exited before printing its address"),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["uhlm-server", "listening", "on", addr, "fingerprint", fp] => {
                listening = Some((addr.parse().expect("address"), fp.to_string()));
            }
            ["uhlm-server", "metrics", "on", addr] => {
                metrics = Some(addr.parse().expect("address"))
            }
            _ => {}
        }
    }
    let (addr, fp) = listening.expect("listening line");
    (child, addr, fp, metrics.expect("metrics line"))
}

/// The LLM loaded in this test process, for reference generations.
pub fn llm() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Model::load(llm_path().as_ref(), &LoadOptions::default()).expect("load the LLM")
        })
        .clone()
}

/// What the LLM alone generates greedily from `prompt` (EOS excluded).
pub fn llm_greedy(prompt: &[u32], max_tokens: u32) -> Vec<u32> {
    let model = llm();
    let mut session = model.session();
    let opts = uhlm_core::sampling::SamplingOptions::greedy(max_tokens);
    let mut rng = rand::rng();
    uhlm_model::generate::generate(&mut session, prompt, &opts, &mut rng, |_, _| {
        std::ops::ControlFlow::Continue(())
    })
    .expect("reference generation")
    .tokens
}

/// How many leading tokens of a generation the server verified; every later one must be
/// `Offline` (the link was lost for good).
pub fn verified_then_offline(sources: &[TokenSource]) -> usize {
    let verified = sources
        .iter()
        .take_while(|s| matches!(s, TokenSource::Accepted | TokenSource::Resampled))
        .count();
    assert!(
        sources[verified..]
            .iter()
            .all(|s| *s == TokenSource::Offline),
        "{sources:?}"
    );
    verified
}

/// Runs on every token a [`Recorder`] sees (a test's way to act mid-generation).
pub type TokenHook = Box<dyn Fn(&TokenEvent) + Send + Sync>;

/// Records every event; optionally runs a hook on each token.
#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<TokenEvent>>,
    pub links: Mutex<Vec<(bool, String)>>,
    pub hook: Option<TokenHook>,
}

impl Recorder {
    pub fn with_hook(hook: impl Fn(&TokenEvent) + Send + Sync + 'static) -> Self {
        Self {
            hook: Some(Box::new(hook)),
            ..Self::default()
        }
    }

    pub fn token_ids(&self) -> Vec<u32> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.token_id)
            .collect()
    }

    pub fn sources(&self) -> Vec<TokenSource> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.source)
            .collect()
    }
}

impl TokenListener for Recorder {
    fn on_token(&self, event: TokenEvent) {
        if let Some(h) = &self.hook {
            h(&event);
        }
        self.events.lock().unwrap().push(event);
    }

    fn on_link_change(&self, online: bool, detail: String) {
        self.links.lock().unwrap().push((online, detail));
    }
}

fn cached_file(file: &str) -> String {
    let dir = uhlm_model::fetch::models_dir().expect("the model cache directory");
    dir.join(file).to_string_lossy().into_owned()
}

/// A generation's outcome: its tokens, and whether it ended with end-of-sequence.
pub type Outcome = (Vec<u32>, bool);

/// The chi-square test's p-value of `observed` counts against the `exact` probabilities (cells
/// expected below 5 pooled); an outcome `exact` deems impossible fails the test outright.
pub fn chi_square_p_value(observed: &HashMap<Outcome, u64>, exact: &HashMap<Outcome, f64>) -> f64 {
    let n = observed.values().sum::<u64>() as f64;
    for o in observed.keys() {
        assert!(exact.contains_key(o), "{o:?} is impossible for the LLM");
    }
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
    for (o, &p) in exact {
        let (c, e) = (observed.get(o).copied().unwrap_or(0) as f64, p * n);
        if e < 5.0 {
            pooled_obs += c;
            pooled_exp += e;
            continue;
        }
        stat += (c - e).powi(2) / e;
        cells += 1;
    }
    if pooled_exp >= 5.0 {
        stat += (pooled_obs - pooled_exp).powi(2) / pooled_exp;
        cells += 1;
    }
    1.0 - ChiSquared::new((cells - 1) as f64).unwrap().cdf(stat)
}
