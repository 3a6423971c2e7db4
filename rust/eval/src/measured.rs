//! The compared systems measured for real: this process is the device (the SDK's engine with
//! the SLM), a server child process hosts the LLM, and the two talk QUIC/TLS 1.3 through
//! `uhlm-linkemu`'s shaped loopback link, one link profile at a time.
//!
//! Each [`SystemSpec`] becomes an engine configuration: SLM only → [`Mode::Slm`]; LLM only →
//! [`Mode::Llm`]; a hybrid that never skips (threshold 0) → [`Mode::Hlm`] with its codec; any
//! other hybrid → [`Mode::Uhlm`] with its estimator, threshold and codec, the threshold fixed
//! unless the system recalibrates online. Throughput is generated tokens over the wall time of
//! the generations, after one untimed one-token generation has opened the connection (a phone
//! keeps its connection across generations). The link's counters cover the whole run.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use uhlm_linkemu::{EmulatorStats, LinkEmulator, LinkProfile};
use uhlm_sdk::{
    CancelToken, EngineConfig, GenerationOptions, HybridEngine, Mode, NoopListener, PolicyConfig,
    Prompt, SamplingOptions,
};

use crate::EvalError;
use crate::paper::{SystemKind, SystemSpec};
use crate::prompts::EvalPrompt;

/// Parameters of the measured runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeasureOptions {
    /// `uhlm-linkemu` presets, in the order reported.
    pub profiles: Vec<String>,
    /// Prompts generated from per system and profile (the first evaluation prompts).
    pub prompts: usize,
    /// Tokens generated per prompt (dense f32 takes ~6 s a token on the poor link).
    pub max_tokens: u32,
    pub temperature: f32,
    /// How long the device waits for a verdict before deciding locally; generous, so a slow
    /// dense uplink is measured rather than timed out (timeouts would show as `offline`).
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub seed: u64,
    /// The hybrids' `EngineConfig::max_lookahead` (`None`: the SDK's default, pipelined; 0:
    /// one draft at a time, as the papers' systems run).
    #[serde(default)]
    pub max_lookahead: Option<usize>,
    /// CPU threads for the device's SLM (`None`: candle's default, every core).
    #[serde(default)]
    pub device_threads: Option<usize>,
    /// The calibration file the hybrid that recalibrates online (uhlm) starts from, as a device
    /// shipped with it does ([`EngineConfig::calibration`]): its threshold is kept as evidence
    /// until the device's own verdicts certify another, where a bare initial threshold would be
    /// replaced at the first refit.
    #[serde(default)]
    pub calibration: Option<PathBuf>,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            profiles: vec!["good".into(), "cell-edge".into(), "poor".into()],
            prompts: 2,
            max_tokens: 16,
            temperature: 1.0,
            request_timeout_ms: 120_000,
            connect_timeout_ms: 30_000,
            seed: 7,
            max_lookahead: None,
            device_threads: None,
            calibration: None,
        }
    }
}

impl MeasureOptions {
    /// The link profiles, checked by name (before anything slow runs).
    pub fn link_profiles(&self) -> Result<Vec<LinkProfile>, EvalError> {
        self.profiles
            .iter()
            .map(|name| {
                LinkProfile::preset(name).ok_or_else(|| EvalError::UnknownLinkProfile(name.clone()))
            })
            .collect()
    }

    /// Every profile, one prompt, a few tokens.
    pub fn quick() -> Self {
        Self {
            prompts: 1,
            max_tokens: 3,
            ..Self::default()
        }
    }
}

/// One system through one link profile.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeasuredRun {
    pub system: String,
    pub profile: String,
    /// The profile's uplink rate (bit/s); `None` when unlimited.
    pub uplink_bps: Option<u64>,
    pub generations: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Decisions made on the device without the server (final EOS decisions included).
    pub skip_rate: f64,
    pub uplink_bytes_per_token: f64,
    pub downlink_bytes_per_token: f64,
    pub rtt_mean_ms: f64,
    /// Decisions taken locally because the server could not be reached in time.
    pub offline: u64,
    pub reconnects: u64,
    /// What the emulated link did to the run's packets (warm-up included).
    pub link: EmulatorStats,
}

/// A server child process, killed on drop. It must print `uhlm-server listening on ADDR
/// fingerprint HEX` on stdout once it listens (as `uhlm-server` and `uhlm serve` do).
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    pin: String,
    api_key: String,
    /// Where `/metrics` is served, when the command asked for it (`--metrics`).
    metrics: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `command` (e.g. `uhlm serve`) hosting `llm` on a free loopback port, with a fresh
    /// self-signed certificate and API key in a temporary directory.
    pub fn spawn(mut command: Command, llm: &Path) -> Result<Self, EvalError> {
        let fail = |reason: String| EvalError::Server(reason);
        let dir = tempfile::tempdir().map_err(|e| fail(format!("temporary directory: {e}")))?;
        let api_key = format!("{:032x}", rand::random::<u128>());
        let keys = dir.path().join("api-keys.txt");
        std::fs::write(&keys, format!("{api_key}\n"))
            .map_err(|e| fail(format!("writing {}: {e}", keys.display())))?;
        command
            .arg("--model")
            .arg(llm)
            .args(["--listen", "127.0.0.1:0", "--self-signed", "--cert-dir"])
            .arg(dir.path())
            .arg("--api-keys")
            .arg(&keys)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .spawn()
            .map_err(|e| fail(format!("cannot start {program}: {e}")))?;
        let wants_metrics = command.get_args().any(|a| a == "--metrics");
        let mut lines = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).lines().map_while(Result::ok));
        let listening = lines.as_mut().and_then(|l| l.find_map(parse_listening));
        let Some((addr, pin)) = listening else {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(fail(format!(
                "{program} exited ({status}) before saying where it listens"
            )));
        };
        // `uhlm-server metrics on ADDR` follows when asked for.
        let metrics = if wants_metrics {
            lines.as_mut().and_then(|l| l.next()).and_then(|l| {
                l.strip_prefix("uhlm-server metrics on ")?
                    .trim()
                    .parse()
                    .ok()
            })
        } else {
            None
        };
        Ok(Self {
            child,
            addr,
            pin,
            api_key,
            metrics,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SHA-256 of its certificate, for the device's pin.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `uhlm-server listening on ADDR fingerprint HEX` → (ADDR, HEX).
fn parse_listening(line: String) -> Option<(SocketAddr, String)> {
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["uhlm-server", "listening", "on", addr, "fingerprint", pin] => {
            Some((addr.parse().ok()?, pin.to_string()))
        }
        _ => None,
    }
}

/// Runs every system through every profile of `options`, generating from `prompts`.
pub fn measure(
    slm: &Path,
    server: &ServerProcess,
    systems: &[SystemSpec],
    prompts: &[EvalPrompt],
    options: &MeasureOptions,
) -> Result<Vec<MeasuredRun>, EvalError> {
    let prompts = &prompts[..options.prompts.min(prompts.len())];
    let (Some(first), false) = (prompts.first(), options.max_tokens == 0) else {
        return Ok(Vec::new());
    };
    let runtime = link_runtime()?;
    let mut runs = Vec::new();
    for name in &options.profiles {
        let profile =
            LinkProfile::preset(name).ok_or_else(|| EvalError::UnknownLinkProfile(name.clone()))?;
        for (i, system) in systems.iter().enumerate() {
            let seed = options.seed.wrapping_add(i as u64);
            let link = runtime.block_on(LinkEmulator::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                server.addr,
                profile.clone(),
                seed,
            ))?;
            let engine = HybridEngine::new(engine_config(
                slm,
                server,
                link.local_addr(),
                system,
                options,
            ))?;
            let generate = |prompt: &EvalPrompt, max_tokens: u32, seed: u64| {
                engine.generate_blocking(
                    Prompt::Text(prompt.prompt.clone()),
                    GenerationOptions {
                        sampling: SamplingOptions {
                            temperature: options.temperature,
                            max_tokens,
                            seed: Some(seed),
                            ..SamplingOptions::default()
                        },
                        chat_template: prompt.chat,
                    },
                    Arc::new(NoopListener),
                    CancelToken::new(),
                )
            };
            generate(first, 1, options.seed)?;
            let mut stats = uhlm_sdk::Stats::default();
            let (mut tokens, mut seconds, mut rtt_weighted) = (0u64, 0.0, 0.0);
            for (j, prompt) in prompts.iter().enumerate() {
                let start = Instant::now();
                let summary = generate(prompt, options.max_tokens, options.seed + j as u64)?;
                seconds += start.elapsed().as_secs_f64();
                tokens += summary.token_ids.len() as u64;
                let s = summary.stats;
                rtt_weighted += s.rtt_mean_ms * s.round_trips as f64;
                stats.decisions += s.decisions;
                stats.skipped += s.skipped;
                stats.offline += s.offline;
                stats.reconnects += s.reconnects;
                stats.round_trips += s.round_trips;
                stats.uplink_bytes += s.uplink_bytes;
                stats.downlink_bytes += s.downlink_bytes;
            }
            drop(engine);
            let link = runtime.block_on(link.shutdown());
            let per_token = |x: u64| x as f64 / tokens.max(1) as f64;
            runs.push(MeasuredRun {
                system: system.name.clone(),
                profile: profile.name.clone(),
                uplink_bps: profile.uplink.rate_bps,
                generations: prompts.len(),
                tokens,
                seconds,
                tokens_per_s: if seconds > 0.0 {
                    tokens as f64 / seconds
                } else {
                    0.0
                },
                skip_rate: stats.skipped as f64 / stats.decisions.max(1) as f64,
                uplink_bytes_per_token: per_token(stats.uplink_bytes),
                downlink_bytes_per_token: per_token(stats.downlink_bytes),
                rtt_mean_ms: rtt_weighted / stats.round_trips.max(1) as f64,
                offline: stats.offline,
                reconnects: stats.reconnects,
                link,
            });
        }
    }
    Ok(runs)
}

/// The runtime the link emulators of a measured run live on (one thread: they only relay).
pub(crate) fn link_runtime() -> Result<tokio::runtime::Runtime, EvalError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("uhlm-linkemu")
        .enable_all()
        .build()
        .map_err(|e| EvalError::Server(format!("cannot start the link's runtime: {e}")))
}

/// The SDK configuration that runs `system` against the server behind `addr`.
fn engine_config(
    slm: &Path,
    server: &ServerProcess,
    addr: SocketAddr,
    system: &SystemSpec,
    options: &MeasureOptions,
) -> EngineConfig {
    let base = engine_config_for(slm, server, addr, system, options.request_timeout_ms);
    let recalibrates = matches!(
        system.kind,
        SystemKind::Hybrid {
            recalibrate: true,
            ..
        }
    );
    EngineConfig {
        calibration: options.calibration.clone().filter(|_| recalibrates),
        connect_timeout_ms: options.connect_timeout_ms,
        max_lookahead: options.max_lookahead.unwrap_or(base.max_lookahead),
        threads: options.device_threads.or(base.threads),
        ..base
    }
}

/// The SDK configuration that runs `system` against `server`, reached at `addr` (the server
/// itself or a link emulator in front of it): SLM only → [`Mode::Slm`], LLM only →
/// [`Mode::Llm`], a hybrid that never skips → [`Mode::Hlm`], any other hybrid →
/// [`Mode::Uhlm`] with its estimator, threshold and codec.
pub fn engine_config_for(
    slm: &Path,
    server: &ServerProcess,
    addr: SocketAddr,
    system: &SystemSpec,
    request_timeout_ms: u64,
) -> EngineConfig {
    let base = EngineConfig {
        slm_path: slm.to_path_buf(),
        server: Some(addr.to_string()),
        pin: Some(server.pin.clone()),
        api_key: server.api_key.clone(),
        request_timeout_ms,
        connect_timeout_ms: 30_000,
        idle_timeout_ms: request_timeout_ms.max(15_000),
        client_name: format!("uhlm-bench/{}", system.name),
        ..EngineConfig::default()
    };
    match &system.kind {
        SystemKind::SlmOnly => EngineConfig {
            mode: Mode::Slm,
            ..base
        },
        SystemKind::LlmOnly => EngineConfig {
            mode: Mode::Llm,
            ..base
        },
        SystemKind::Hybrid {
            estimator,
            threshold,
            codec,
            recalibrate,
        } => EngineConfig {
            mode: if *threshold <= 0.0 {
                Mode::Hlm
            } else {
                Mode::Uhlm
            },
            uncertainty: estimator.clone(),
            codec: codec.clone(),
            policy: if *recalibrate {
                PolicyConfig {
                    initial_threshold: *threshold,
                    ..PolicyConfig::default()
                }
            } else {
                PolicyConfig {
                    initial_threshold: *threshold,
                    online: false,
                    probe_rate: 0.0,
                    ..PolicyConfig::default()
                }
            },
            ..base
        },
    }
}

/// `link_cell_edge`-style keys of the throughput maps.
pub fn link_key(profile: &str) -> String {
    format!("link_{}", profile.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_servers_listening_line() {
        assert_eq!(
            parse_listening("uhlm-server listening on 127.0.0.1:4433 fingerprint ab12".into()),
            Some(("127.0.0.1:4433".parse().unwrap(), "ab12".into()))
        );
        assert_eq!(
            parse_listening("uhlm-server metrics on 127.0.0.1:9464".into()),
            None
        );
        assert_eq!(link_key("cell-edge"), "link_cell_edge");
    }

    #[test]
    fn a_server_that_exits_early_is_a_clear_error() {
        let err = ServerProcess::spawn(Command::new("false"), Path::new("x.gguf"))
            .err()
            .expect("`false` never listens");
        assert!(
            err.to_string().contains("before saying where it listens"),
            "{err}"
        );
    }
}
