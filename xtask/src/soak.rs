//! `cargo xtask soak`: the fault and load campaign. A real `uhlm serve` process behind the
//! userspace link emulator (loss on every packet), `uhlm loadgen` devices generating through
//! it, the server killed (SIGKILL) and restarted during the run, its resident memory sampled
//! every second. Passes only if every generation completed with no token lost or repeated,
//! every text is what its token ids decode to, the server stayed within its memory bound and a
//! long prompt's prefill kept short-prompt verdicts under a second (p95).
//!
//! The loadgen process runs at a lower CPU priority (`nice 10`): on one machine its devices
//! share the cores the server has to itself in a deployment (phones have their own CPUs).

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::command::root;

/// What the campaign runs; `--short` is the form CI runs.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// The CI form: 4 devices (one with long prompts) for 75 s, one kill.
    #[arg(long)]
    short: bool,
    /// Use the dev build's binaries (dependencies optimised as in release) instead of
    /// building release ones.
    #[arg(long)]
    dev_build: bool,
    #[arg(long, default_value_t = 64)]
    devices: usize,
    /// How long devices keep starting generations.
    #[arg(long, default_value = "10m")]
    duration: String,
    /// Server kills (SIGKILL, then a restart), evenly spread over the run.
    #[arg(long, default_value_t = 2)]
    kills: u32,
    /// Packet loss of the emulated link, each direction.
    #[arg(long, default_value = "3%")]
    loss: String,
    /// Every this many devices, one sends long prompts.
    #[arg(long, default_value_t = 16)]
    long_every: usize,
    #[arg(long, default_value_t = 4096)]
    long_prompt_tokens: usize,
    /// The server's KV-cache budget, bytes. The full campaign's working set (four 4,096-token
    /// contexts and sixty short ones, ~34,000 tokens at SmolLM2's 46,080 bytes a token) takes
    /// about 1.5 GiB: with less the server evicts and re-prefills all the time (RELIABILITY
    /// run 6), which the tests of eviction cover on their own.
    #[arg(long, default_value_t = 2 << 30)]
    kv_budget: u64,
    /// Allowed server memory above its resident size after start plus the KV budget, bytes.
    #[arg(long, default_value_t = 256 << 20)]
    margin: u64,
    /// Where the logs and `soak.json` go.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// The server's matmul threads (`uhlm serve --kernel-threads`; default: candle's).
    #[arg(long)]
    kernel_threads: Option<usize>,
    /// How long a forward pass that carries catch-up chunks may take (`uhlm serve
    /// --pass-target`; `0s`: passes sized by tokens only; `auto`: the server's default). The
    /// full campaign keeps 150 ms: with the server's default its latency bound failed (2.6 s
    /// and, with `Extend`, 1.9 s against 1 s, docs/RELIABILITY.md runs 12 and 13). The short
    /// form runs the server's default.
    #[arg(long, default_value = "150ms")]
    pass_target: Option<String>,
    /// Devices replay the logits their draft model computed once for each context they reach,
    /// one token every this many milliseconds (`uhlm loadgen --replay-token-ms`); 0: every
    /// device runs its draft model for every token. The campaign measures the server, and 64
    /// drafting models took 1.2 of this machine's 2 cores, more than the server got
    /// (RELIABILITY.md, run 9).
    #[arg(long, default_value_t = 20.0)]
    device_token_ms: f64,
    /// Devices generate this long before `--duration` (`uhlm loadgen --warm-up`; kills are
    /// spread over `--duration` only): replaying devices compute each context's rows the
    /// first time, and those generations competed with the server for the cores.
    #[arg(long, default_value = "3m")]
    warm_up: String,
    /// The devices' `uhlm loadgen --max-lookahead` [default: the SDK's].
    #[arg(long)]
    max_lookahead: Option<usize>,
}

impl SoakArgs {
    /// The CI form, on the dev build `cargo xtask test` has just made.
    pub fn short() -> Self {
        Self {
            short: true,
            dev_build: true,
            devices: 4,
            duration: "75s".into(),
            kills: 1,
            loss: "3%".into(),
            long_every: 4,
            long_prompt_tokens: 1024,
            kv_budget: 512 << 20,
            margin: 256 << 20,
            out: PathBuf::from("target/soak-short"),
            kernel_threads: None,
            pass_target: None,
            // Four devices leave the server its cores: the short form runs the real models.
            device_token_ms: 0.0,
            warm_up: "0s".into(),
            max_lookahead: None,
        }
    }
}

/// A free local port (UDP or TCP), released for the child to take.
pub(crate) fn free_port(udp: bool) -> Result<u16> {
    Ok(if udp {
        UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()
    } else {
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    })
}

/// The server process and how to start it again on the same port and certificate.
pub(crate) struct ServerProcess {
    command: Vec<String>,
    log: PathBuf,
    child: Child,
}

impl ServerProcess {
    /// Starts the server; returns once it listens, with its certificate fingerprint.
    pub(crate) fn start(command: Vec<String>, log: PathBuf) -> Result<(Self, String)> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", command[0]))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let fingerprint = loop {
            let line = lines
                .next()
                .context("the server exited before listening (see its log)")??;
            if let Some(fp) = line.split("fingerprint ").nth(1) {
                break fp.trim().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok((
            Self {
                command,
                log,
                child,
            },
            fingerprint,
        ))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn kill_and_restart(&mut self) -> Result<String> {
        self.child.kill()?;
        self.child.wait()?;
        std::thread::sleep(Duration::from_secs(2));
        let (next, fingerprint) = Self::start(self.command.clone(), self.log.clone())?;
        *self = next;
        Ok(fingerprint)
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        self.child.wait()?;
        Ok(())
    }
}

/// The server's metrics page, read from its endpoint.
pub(crate) fn metrics_text(metrics: &str) -> Option<String> {
    http_get(metrics, "/metrics")
}

/// `GET path` from the HTTP server at `addr` (`host:port`): the whole answer, status line
/// and headers included; `None` where it cannot be asked.
pub(crate) fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// The server's `uhlm_kv_cache_bytes` gauge.
fn kv_cache_bytes(metrics: &str) -> Option<u64> {
    let line = metrics
        .lines()
        .find(|l| l.starts_with("uhlm_kv_cache_bytes "))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

/// The server's own `Verify` latency (receipt to reply: its queue and forward passes, not the
/// network or the device) from its histogram: the count and the upper bounds, in ms, of the
/// buckets holding the median and the 95th percentile.
fn server_verify_latency(metrics: &str) -> serde_json::Value {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("uhlm_verify_latency_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|&&(_, n)| total > 0.0 && n >= q * total)
            .map(|&(le, _)| le * 1e3)
    };
    serde_json::json!({ "count": total, "p50_at_most": at(0.5), "p95_at_most": at(0.95) })
}

/// Resident set size of a process, bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn soak(mut args: SoakArgs) -> Result<()> {
    if args.short {
        args = SoakArgs {
            dev_build: args.dev_build,
            out: args.out,
            ..SoakArgs::short()
        };
    }
    let duration = humantime::parse_duration(&args.duration)
        .with_context(|| format!("--duration {:?}", args.duration))?;
    let warm_up = humantime::parse_duration(&args.warm_up)
        .with_context(|| format!("--warm-up {:?}", args.warm_up))?;
    let out = root().join(&args.out);
    std::fs::create_dir_all(&out)?;
    let uhlm = uhlm_binary(args.dev_build)?;
    let linkemu = crate::bindings::target_dir()
        .join(if args.dev_build { "debug" } else { "release" })
        .join("uhlm-linkemu")
        .to_string_lossy()
        .into_owned();

    let key_file = out.join("api-key");
    std::fs::write(&key_file, "soak-key\n")?;
    let cert_dir = out.join("cert");
    std::fs::create_dir_all(&cert_dir)?;
    let server_addr = format!("127.0.0.1:{}", free_port(true)?);
    let link_addr = format!("127.0.0.1:{}", free_port(true)?);
    let metrics_addr = format!("127.0.0.1:{}", free_port(false)?);
    let server_log = out.join("server.log");
    let _ = std::fs::remove_file(&server_log);
    let threads = args.kernel_threads.map(|n| n.to_string());
    let command: Vec<String> = [
        uhlm.as_str(),
        "serve",
        "--model",
        "smollm2",
        "--self-signed",
        "--cert-dir",
        &cert_dir.to_string_lossy(),
        "--listen",
        &server_addr,
        "--api-keys",
        &key_file.to_string_lossy(),
        "--metrics",
        &metrics_addr,
        "--kv-memory-budget-bytes",
        &args.kv_budget.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        args.pass_target
            .iter()
            .flat_map(|t| ["--pass-target".to_string(), t.clone()]),
    )
    .chain(
        threads
            .iter()
            .flat_map(|n| ["--kernel-threads".to_string(), n.clone()]),
    )
    .collect();
    println!("\n==> {}", command.join(" "));
    let (mut server, pin) = ServerProcess::start(command, server_log.clone())?;
    // What the process holds once the model is loaded and nothing is cached yet.
    std::thread::sleep(Duration::from_secs(1));
    let base_rss = rss_bytes(server.pid()).context("reading the server's memory")?;
    let profile = format!("good,loss={}", args.loss);
    let mut link = Command::new(&linkemu)
        .args([
            "--listen",
            &link_addr,
            "--upstream",
            &server_addr,
            "--profile",
            &profile,
            "--seed",
            "1",
            "--stats-interval",
            "60s",
        ])
        .stdout(std::fs::File::create(out.join("linkemu.log"))?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting uhlm-linkemu")?;
    let report_path = out.join("loadgen.json");
    let _ = std::fs::remove_file(&report_path);
    let mut loadgen_args: Vec<String> = [
        "-n",
        "10",
        uhlm.as_str(),
        "loadgen",
        "--server",
        &link_addr,
        "--pin",
        &pin,
        "--api-key-file",
        &key_file.to_string_lossy(),
        "--devices",
        &args.devices.to_string(),
        "--duration",
        &args.duration,
        "--warm-up",
        &args.warm_up,
        "--long-every",
        &args.long_every.to_string(),
        "--long-prompt-tokens",
        &args.long_prompt_tokens.to_string(),
        "--out",
        &report_path.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if args.device_token_ms > 0.0 {
        loadgen_args.extend(["--replay-token-ms".into(), args.device_token_ms.to_string()]);
    }
    if let Some(n) = args.max_lookahead {
        loadgen_args.extend(["--max-lookahead".into(), n.to_string()]);
    }
    println!("\n==> nice {}", loadgen_args.join(" "));
    let mut loadgen = Command::new("nice")
        .args(loadgen_args)
        .stdout(std::fs::File::create(out.join("loadgen.out"))?)
        .stderr(std::fs::File::create(out.join("loadgen.log"))?)
        .spawn()
        .context("starting uhlm loadgen")?;

    let t0 = Instant::now();
    let mut kills_done = 0u32;
    let mut max_rss = base_rss;
    let mut max_kv = 0u64;
    // The last server process's metrics, for its own view of the verify latency.
    let mut last_metrics = String::new();
    let mut fingerprints_kept = true;
    let status = loop {
        if let Some(status) = loadgen.try_wait()? {
            break status;
        }
        let next_kill =
            warm_up + duration.mul_f64(f64::from(kills_done + 1) / f64::from(args.kills + 1));
        if kills_done < args.kills && t0.elapsed() >= next_kill {
            println!(
                "[{:>4.0}s] killing the server (SIGKILL)",
                t0.elapsed().as_secs_f64()
            );
            let fp = server.kill_and_restart()?;
            fingerprints_kept &= fp == pin;
            kills_done += 1;
            println!("[{:>4.0}s] server restarted", t0.elapsed().as_secs_f64());
        }
        if let Some(rss) = rss_bytes(server.pid()) {
            max_rss = max_rss.max(rss);
        }
        if let Some(text) = metrics_text(&metrics_addr) {
            if let Some(kv) = kv_cache_bytes(&text) {
                max_kv = max_kv.max(kv);
            }
            last_metrics = text;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let _ = link.kill();
    let _ = link.wait();
    server.stop()?;
    // Every counter of the last server process, for whoever reads why a check failed.
    std::fs::write(out.join("server-metrics.txt"), &last_metrics)?;
    if !status.success() {
        bail!(
            "uhlm loadgen failed ({status}); see {}",
            out.join("loadgen.log").display()
        );
    }
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report_path).context("reading the loadgen report")?,
    )?;
    let n = |k: &str| report[k].as_u64().unwrap_or(u64::MAX);
    let rss_bound = base_rss + args.kv_budget + args.margin;
    // A leak the budget's headroom would hide: memory beyond the KV cache actually held.
    let rss_used_bound = base_rss + max_kv + args.margin;
    let during = &report["verify_during_long_prefill_ms"];
    let mut checks = generation_checks(&report);
    checks.extend([
        (
            "server RSS within start + KV budget + margin",
            max_rss <= rss_bound,
        ),
        (
            "server RSS within start + the most KV cache it held + margin",
            max_rss <= rss_used_bound,
        ),
        (
            "the restarted server kept its certificate",
            fingerprints_kept,
        ),
        ("the server was killed as planned", kills_done == args.kills),
    ]);
    // A latency bound is a measurement, not a test: the full campaign checks it; the short
    // form (what `cargo xtask test` runs, on any machine, on a dev build) only reports it.
    if args.long_every > 0 && !args.short {
        checks.push((
            "short-prompt verdict p95 under 1 s during long prefills",
            during["count"].as_u64().unwrap_or(0) > 0
                && during["p95"].as_f64().unwrap_or(f64::MAX) < 1000.0,
        ));
    }
    let server_side = server_verify_latency(&last_metrics);
    let summary = serde_json::json!({
        "devices": args.devices,
        "kernel_threads": args.kernel_threads,
        "pass_target": args.pass_target.as_deref().unwrap_or("default"),
        "device_token_ms": args.device_token_ms,
        "duration": args.duration,
        "warm_up": args.warm_up,
        "max_lookahead": args.max_lookahead,
        "loss": args.loss,
        "kills": kills_done,
        "long_prompt_tokens": args.long_prompt_tokens,
        "kv_budget_bytes": args.kv_budget,
        "server_rss_after_start_bytes": base_rss,
        "server_rss_max_bytes": max_rss,
        "server_rss_bound_bytes": rss_bound,
        "server_rss_used_bound_bytes": rss_used_bound,
        "server_kv_cache_max_bytes": max_kv,
        "server_verify_latency_ms_last_process": server_side,
        "checks": checks.iter().map(|(what, ok)| serde_json::json!({"check": what, "passed": ok})).collect::<Vec<_>>(),
        "loadgen": report,
    });
    let soak_json = out.join("soak.json");
    std::fs::write(&soak_json, serde_json::to_string_pretty(&summary)?)?;
    println!("\n{}", serde_json::to_string_pretty(&summary["checks"])?);
    println!(
        "generations {} tokens {} (offline {}, verified {}, local {}), reconnects {}, \
         server RSS {:.0} -> {:.0} MiB (bound {:.0}), KV cache max {:.0} MiB; verdict p95 \
         during long prefills {} ms (the server's own, last process: p95 <= {} ms)",
        n("generations"),
        n("tokens"),
        n("offline_tokens"),
        n("verified_tokens"),
        n("local_tokens"),
        n("reconnects"),
        mib(base_rss),
        mib(max_rss),
        mib(rss_bound),
        mib(max_kv),
        during["p95"],
        server_side["p95_at_most"],
    );
    println!("report: {}", soak_json.display());
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| *what)
        .collect();
    if !failed.is_empty() {
        bail!("soak failed: {failed:?}; see {}", out.display());
    }
    Ok(())
}

/// The `uhlm` binary of the dev build (`dev_build`, what `cargo xtask test` has just built) or
/// a release build (with `uhlm-linkemu`), built here, with SmolLM2 and its draft in the model
/// cache.
pub(crate) fn uhlm_binary(dev_build: bool) -> Result<String> {
    let profile = if dev_build { "debug" } else { "release" };
    // The dev build is the whole workspace's (what `cargo xtask test` has just built, with the
    // same features, so nothing is rebuilt); `--bin` applies to every package named: both
    // binaries are named.
    let build: &[&str] = if dev_build {
        &["build", "--workspace", "--all-targets"]
    } else {
        &[
            "build",
            "--release",
            "-p",
            "uhlm-cli",
            "-p",
            "uhlm-linkemu",
            "--bin",
            "uhlm",
            "--bin",
            "uhlm-linkemu",
        ]
    };
    crate::command::run("cargo", build)?;
    let bin = crate::bindings::target_dir().join(profile);
    let uhlm = bin.join("uhlm").to_string_lossy().into_owned();
    crate::command::run(&uhlm, &["models", "fetch", "smollm2"])?;
    let draft_ok = Command::new(&uhlm)
        .args(["models", "list"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                l.starts_with("smollm2-draft") && l.split_whitespace().nth(1) == Some("yes")
            })
        });
    if !draft_ok {
        crate::command::run(&uhlm, &["models", "derive-draft"])?;
    }
    Ok(uhlm)
}

/// What every campaign checks of every generation in a `uhlm loadgen` report.
pub(crate) fn generation_checks(report: &serde_json::Value) -> Vec<(&'static str, bool)> {
    let n = |k: &str| report[k].as_u64().unwrap_or(u64::MAX);
    vec![
        (
            "every generation completed",
            n("failed") == 0 && n("completed") == n("generations") && n("generations") > 0,
        ),
        (
            "0 tokens lost or duplicated",
            n("lost_or_duplicated_tokens") == 0,
        ),
        (
            "every text is its token ids decoded",
            n("text_mismatches") == 0,
        ),
        ("no generation cut short", n("short_generations") == 0),
    ]
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}
