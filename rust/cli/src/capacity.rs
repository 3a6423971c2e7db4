//! `uhlm bench capacity`: how many devices one server holds, uhlm against LLM-only.
//!
//! 1. **Traces.** The pair's device model generates replies to HumanEval prompts through the
//!    real SDK (uhlm mode, the pair's calibration) against a `uhlm serve` process; every
//!    `Verify` it sends is recorded with the prompt and the tokens it committed
//!    (`traces.jsonl` in `--out`, reused when present).
//! 2. **Replay.** For each device count N and each system, a fresh `uhlm serve` and N simulated
//!    devices on their own QUIC connections, none running a model, so that the server is
//!    measured without N device models competing for the same CPU. A uhlm device replays a
//!    trace at `--token-ms` per drafted token, sending the recorded `Verify`s (skipped tokens
//!    and uplink distribution as recorded); an LLM-only device sends the prompt and one
//!    `Generate` for as many tokens, which the server streams (its best configuration: one
//!    request, the same continuous batching). Devices loop over the traces until `--duration`.
//!
//! Per point: generated tokens/s over all devices, tokens the server decided per second, the
//! device's wait per server-decided token (uhlm: the `Verify` round trip; LLM-only: the gap
//! between streamed tokens) at p50/p95/p99, sessions per forward pass, forward passes and
//! server CPU seconds per generated token, and the server's peak RSS.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};
use uhlm_core::protocol::{Close, Extend, Generate, Message, Prompt as WirePrompt, Start, Verify};
use uhlm_eval::engine_process::EngineProcess;
use uhlm_eval::humaneval::{PromptFormat, fetch_problems, load_problems};
use uhlm_eval::measured::ServerProcess;
use uhlm_eval::plot::{Chart, Series, draw};
use uhlm_sdk::raw::RawClient;
use uhlm_sdk::{
    CancelToken, ChatMessage, EngineConfig, GenerationOptions, HybridEngine, Mode, Prompt,
    SamplingOptions, StopReason, TokenEvent, TokenListener,
};

use crate::loadgen::Percentiles;
use crate::pair_args::ModelPairArgs;

#[derive(Debug, Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    models: ModelPairArgs,
    /// HumanEval prompts to record device traces on.
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// Tokens per recorded reply at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Device counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    devices: Vec<usize>,
    /// Systems to measure: `uhlm`, `llm` (LLM-only streaming).
    #[arg(long, value_delimiter = ',', default_value = "uhlm,llm")]
    systems: Vec<String>,
    /// How long each point runs (devices then finish the generation they are in).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A uhlm device's time to draft one token (its SLM's forward pass on the phone).
    #[arg(long, default_value_t = 25.0)]
    token_ms: f64,
    /// Kernel threads of the server (its process has the machine to itself but for the
    /// replaying devices, which do no model work).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the server's model runs: cpu, cuda or cuda:N (GPU builds: `cargo xtask cuda`).
    #[arg(long, default_value = "cpu")]
    device: uhlm_model::Device,
    /// What runs the server's LLM at each point: `embedded` (`uhlm serve`'s own runtime) or
    /// `llama-server` (llama.cpp's server started for the point with a slot per device and
    /// `--threads` threads, from `UHLM_LLAMA_SERVER` or `PATH`, the gateway in front of it).
    /// The device traces are recorded on the embedded engine either way.
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "llama-server"])]
    engine: String,
    /// The server's `--pass-target` (unset: its default, `auto`); `0s` sizes passes by tokens
    /// only, the scheduling before issue 39.
    #[arg(long)]
    pass_target: Option<String>,
    /// A uhlm device sends its local tokens ahead of its next `Verify` once this many wait
    /// (`Extend`; `EngineConfig::extend_after`, 0: never) [default: the SDK's].
    #[arg(long)]
    extend_after: Option<usize>,
    #[arg(long, default_value = "bench-capacity")]
    out: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// One recorded generation: what a device sent, and what it committed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trace {
    pub prompt: Vec<u32>,
    pub sampling: SamplingOptions,
    /// The generated token ids, the final end-of-sequence token included: every position the
    /// device decided.
    pub tokens: Vec<u32>,
    /// Every `Verify` sent, in order.
    pub verifies: Vec<Verify>,
}

/// One measured (system, device count).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub system: String,
    pub devices: usize,
    pub seconds: f64,
    pub generations: u64,
    pub generated_tokens: u64,
    /// Tokens the server decided (uhlm: verified; LLM-only: every one).
    pub server_tokens: u64,
    pub generated_per_s: f64,
    pub server_decided_per_s: f64,
    /// A device's wait per server-decided token, ms.
    pub wait_ms: Percentiles,
    /// From a generation's `Start` to its first token, ms (uhlm: committed on the device or
    /// by a verdict; LLM-only: streamed).
    pub ttft_ms: Percentiles,
    pub sessions_per_pass: f64,
    pub passes_per_token: f64,
    /// CPU and peak memory of the server's processes: the gateway, and its engine where one
    /// runs beside it (the sum of both processes' peaks).
    pub server_cpu_s_per_token: f64,
    pub server_peak_rss_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct CapacityReport {
    pub slm: String,
    pub llm: String,
    pub traces: usize,
    pub trace_tokens: usize,
    pub trace_verifies: usize,
    pub token_ms: f64,
    /// A uhlm device's `extend_after` (0: its local tokens ride in the next `Verify`).
    pub extend_after: usize,
    /// Where the server's model ran.
    pub device: String,
    /// What ran it: `embedded` or `llama-server`.
    #[serde(default)]
    pub engine: String,
    pub points: Vec<Point>,
}

pub fn run(args: CapacityArgs) -> Result<()> {
    for s in &args.systems {
        ensure!(
            s == "uhlm" || s == "llm",
            "unknown system {s:?} (uhlm or llm)"
        );
    }
    let (slm, llm) = args.models.paths()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let traces_path = args.out.join("traces.jsonl");
    let traces = if traces_path.is_file() {
        read_traces(&traces_path)?
    } else {
        let traces = record(&args, &slm, &llm)?;
        write_traces(&traces_path, &traces)?;
        traces
    };
    ensure!(!traces.is_empty(), "no traces in {}", traces_path.display());
    ensure!(
        traces
            .iter()
            .all(|t| t.verifies.iter().all(|v| v.chain.is_empty())),
        "{} holds chained Verifys (a pipelining device's), which a replayed device cannot \
         follow: remove it to record the traces again",
        traces_path.display()
    );
    let fingerprint = uhlm_model::tokenizer::Tokenizer::from_gguf_path(&slm)?.fingerprint();
    let traces = Arc::new(traces);
    let mut points = Vec::new();
    for &n in &args.devices {
        for system in &args.systems {
            eprintln!("{system}: {n} device(s) for {:?}", args.duration);
            let point = measure_point(&args, &llm, fingerprint, &traces, system, n)?;
            eprintln!(
                "  {:.1} tokens/s, server {:.1}/s, wait p95 {:.0} ms, {:.2} sessions/pass",
                point.generated_per_s,
                point.server_decided_per_s,
                point.wait_ms.p95,
                point.sessions_per_pass
            );
            points.push(point);
        }
    }
    let report = CapacityReport {
        slm: slm.display().to_string(),
        llm: llm.display().to_string(),
        traces: traces.len(),
        trace_tokens: traces.iter().map(|t| t.tokens.len()).sum(),
        trace_verifies: traces.iter().map(|t| t.verifies.len()).sum(),
        token_ms: args.token_ms,
        extend_after: extend_after(&args),
        engine: args.engine.clone(),
        device: args.device.to_string(),
        points,
    };
    std::fs::write(
        args.out.join("capacity.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    plot(&report, &args.out)?;
    crate::report_output::print_report(&report, args.json, &args.out, print_table)
}

fn serve_command(
    args: &CapacityArgs,
    metrics: bool,
    engine: Option<&EngineProcess>,
) -> Result<std::process::Command> {
    let exe = std::env::current_exe().context("locating the uhlm executable")?;
    let mut serve = std::process::Command::new(exe);
    serve
        .arg("serve")
        .args(["--device", &args.device.to_string()]);
    if let Some(t) = args.threads {
        serve.arg("--kernel-threads").arg(t.to_string());
    }
    if let Some(t) = &args.pass_target {
        serve.args(["--pass-target", t]);
    }
    if metrics {
        serve.args(["--metrics", "127.0.0.1:0"]);
    }
    // Room for every device of the largest sweep point.
    serve.args(["--max-sessions", "1024"]);
    if let Some(engine) = engine {
        serve.args(engine.serve_args());
    }
    Ok(serve)
}

/// Records what the device model sends for the first `--prompts` HumanEval prompts.
fn record(args: &CapacityArgs, slm: &Path, llm: &Path) -> Result<Vec<Trace>> {
    let server = ServerProcess::spawn(serve_command(args, false, None)?, llm)?;
    let problems = load_problems(&fetch_problems(true)?)?;
    let engine = HybridEngine::new(EngineConfig {
        slm_path: slm.to_path_buf(),
        server: Some(server.addr().to_string()),
        pin: Some(server.pin().to_string()),
        api_key: server.api_key().to_string(),
        mode: Mode::Uhlm,
        calibration: args.models.calibration()?,
        threads: args.threads,
        client_name: "uhlm-bench-capacity/record".into(),
        // One draft at a time: a replayed device waits for each verdict before it drafts on,
        // so the trace must be of a device that does (a pipelined one's chains carry drafts
        // that a rejection throws away, and it does not wait; its load on a server is what
        // `cargo xtask soak` measures, with drafting devices).
        max_lookahead: 0,
        // Every local token in the next `Verify`: the trace holds what the device committed
        // between uplinks, and the replay sends it ahead (`--extend-after`) as configured.
        extend_after: 0,
        ..EngineConfig::default()
    })?;
    let eos = uhlm_model::tokenizer::Tokenizer::from_gguf_path(slm)?
        .eos_ids()
        .to_vec();
    let mut traces = Vec::new();
    for (i, problem) in problems.iter().take(args.prompts).enumerate() {
        eprintln!("recording {}/{}: {}", i + 1, args.prompts, problem.task_id);
        let prompt = Prompt::Chat(vec![ChatMessage::user(PromptFormat::Chat.request(problem))]);
        let ids = engine.tokenize_prompt(&prompt, false)?;
        let sampling = SamplingOptions {
            max_tokens: args.max_tokens,
            seed: Some(i as u64),
            ..SamplingOptions::greedy(args.max_tokens)
        };
        let recorder = Arc::new(Recorder::default());
        let summary = engine.generate_blocking(
            prompt,
            GenerationOptions {
                sampling: sampling.clone(),
                chat_template: false,
            },
            recorder.clone(),
            CancelToken::new(),
        )?;
        ensure!(
            summary.stats.offline == 0,
            "recording {}: {} token(s) were decided offline; a trace must be the hybrid's",
            problem.task_id,
            summary.stats.offline
        );
        let verifies = std::mem::take(&mut *lock(&recorder.verifies));
        let mut tokens = summary.token_ids;
        if summary.stop == StopReason::Eos {
            tokens.extend(eos.first().copied());
        }
        traces.push(Trace {
            prompt: ids,
            sampling,
            tokens,
            verifies,
        });
    }
    Ok(traces)
}

#[derive(Default)]
struct Recorder {
    verifies: Mutex<Vec<Verify>>,
}

impl TokenListener for Recorder {
    fn on_token(&self, _: TokenEvent) {}
    fn on_verify(&self, verify: &Verify) {
        lock(&self.verifies).push(verify.clone());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_traces(path: &Path) -> Result<Vec<Trace>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::BufReader::new(file)
        .lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|l| Ok(serde_json::from_str(&l?)?))
        .collect::<Result<_>>()
        .with_context(|| format!("reading {}", path.display()))
}

fn write_traces(path: &Path, traces: &[Trace]) -> Result<()> {
    let mut text = String::new();
    for t in traces {
        text.push_str(&serde_json::to_string(t)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// What the devices of one point counted.
#[derive(Default)]
struct Counts {
    generations: u64,
    generated: u64,
    server_decided: u64,
    waits_ms: Vec<f64>,
    ttfts_ms: Vec<f64>,
}

fn measure_point(
    args: &CapacityArgs,
    llm: &Path,
    fingerprint: [u8; 32],
    traces: &Arc<Vec<Trace>>,
    system: &str,
    devices: usize,
) -> Result<Point> {
    // A fresh engine per point, as a fresh server: no point inherits another's caches.
    let engine = match args.engine.as_str() {
        "llama-server" => Some(EngineProcess::start(
            llm,
            devices.max(1),
            4096,
            args.threads.unwrap_or(1),
        )?),
        _ => None,
    };
    let server = ServerProcess::spawn(serve_command(args, true, engine.as_ref())?, llm)?;
    let metrics_addr = server
        .metrics_addr()
        .context("the server did not say where its metrics are")?;
    let config = EngineConfig {
        server: Some(server.addr().to_string()),
        pin: Some(server.pin().to_string()),
        api_key: server.api_key().to_string(),
        client_name: format!("uhlm-bench-capacity/{system}"),
        connect_timeout_ms: 30_000,
        ..EngineConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let counts = Arc::new(Mutex::new(Counts::default()));
    let pids: Vec<u32> = std::iter::once(server.pid())
        .chain(engine.as_ref().map(EngineProcess::pid))
        .collect();
    let cpu0: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let started = Instant::now();
    let deadline = started + args.duration;
    let pace = Duration::from_secs_f64(args.token_ms / 1000.0);
    let extend = extend_after(args);
    let llm_only = system == "llm";
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for d in 0..devices {
            let (config, traces, counts) = (config.clone(), traces.clone(), counts.clone());
            tasks.spawn(async move {
                let client = RawClient::connect(&config, fingerprint).await?;
                let mut next = d;
                let mut session_id = 0;
                while Instant::now() < deadline {
                    let trace = &traces[next % traces.len()];
                    next += 1;
                    session_id += 1;
                    if llm_only {
                        stream_one(&client, session_id, trace, &counts).await?;
                    } else {
                        replay_one(&client, session_id, trace, pace, extend, &counts).await?;
                    }
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.context("a device task failed")??;
        }
        anyhow::Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>() - cpu0;
    let peak_rss = pids.iter().filter_map(|&p| peak_rss_bytes(p)).sum();
    let metrics = http_metrics(metrics_addr)?;
    let counts = std::mem::take(&mut *lock(&counts));
    let passes = metric(&metrics, "uhlm_forward_passes_total");
    let batch_sum = metric(&metrics, "uhlm_batch_size_sum");
    let per_token = |x: f64| x / counts.generated.max(1) as f64;
    Ok(Point {
        system: system.to_string(),
        devices,
        seconds,
        generations: counts.generations,
        generated_tokens: counts.generated,
        server_tokens: counts.server_decided,
        generated_per_s: counts.generated as f64 / seconds,
        server_decided_per_s: counts.server_decided as f64 / seconds,
        wait_ms: Percentiles::of(counts.waits_ms),
        ttft_ms: Percentiles::of(counts.ttfts_ms),
        sessions_per_pass: batch_sum / passes.max(1.0),
        passes_per_token: per_token(passes),
        server_cpu_s_per_token: per_token(cpu),
        server_peak_rss_bytes: peak_rss,
    })
}

async fn open(
    client: &RawClient,
    session_id: u64,
    trace: &Trace,
) -> Result<uhlm_sdk::raw::RawSession> {
    let mut s = client.session().await?;
    s.send(&Message::Start(Start {
        session_id,
        prompt: WirePrompt::Tokens(trace.prompt.clone()),
        sampling: trace.sampling.clone(),
    }))
    .await?;
    match s.recv().await? {
        Message::Started(_) => Ok(s),
        other => bail!("expected Started, got {other:?}"),
    }
}

async fn close(mut s: uhlm_sdk::raw::RawSession) -> Result<()> {
    s.send(&Message::Close(Close {
        reason: "done".into(),
    }))
    .await?;
    s.finish();
    Ok(())
}

fn extend_after(args: &CapacityArgs) -> usize {
    args.extend_after
        .unwrap_or(EngineConfig::default().extend_after)
}

/// A uhlm device: drafts at `pace` and sends the recorded `Verify`s where it sent them, and
/// as the SDK does, its local tokens ahead of them once `extend_after` wait (`Extend`).
async fn replay_one(
    client: &RawClient,
    session_id: u64,
    trace: &Trace,
    pace: Duration,
    extend_after: usize,
    counts: &Mutex<Counts>,
) -> Result<()> {
    let opened = Instant::now();
    let mut s = open(client, session_id, trace).await?;
    let mut verifies = trace.verifies.iter().peekable();
    let (mut decided, mut waits) = (0u64, Vec::new());
    let mut ttft = None;
    // Local tokens since the last uplink: [from, from + waiting) not sent, before them
    // `ahead` sent in `Extend`s.
    let (mut from, mut ahead) = (0, 0);
    for k in 0..trace.tokens.len() {
        tokio::time::sleep(pace).await;
        let position = (trace.prompt.len() + k) as u32;
        if let Some(v) = verifies.next_if(|v| v.position == position) {
            ensure!(
                v.skipped.len() >= ahead && trace.tokens[k - v.skipped.len()..k] == v.skipped[..],
                "a recorded Verify's skipped tokens are not the trace's"
            );
            let sent = Instant::now();
            s.send(&Message::Verify(Verify {
                seq: decided as u32,
                skipped: v.skipped[ahead..].to_vec(),
                ..v.clone()
            }))
            .await?;
            match s.recv().await? {
                Message::Verdict(_) => {}
                other => bail!("expected a Verdict, got {other:?}"),
            }
            waits.push(sent.elapsed().as_secs_f64() * 1e3);
            decided += 1;
            (from, ahead) = (k + 1, 0);
        } else if extend_after > 0 && k + 1 - from >= extend_after {
            s.send(&Message::Extend(Extend {
                tokens: trace.tokens[from..=k].to_vec(),
            }))
            .await?;
            ahead += k + 1 - from;
            from = k + 1;
        }
        ttft.get_or_insert(opened.elapsed().as_secs_f64() * 1e3);
    }
    ensure!(
        verifies.next().is_none(),
        "a recorded Verify lies outside its trace"
    );
    close(s).await?;
    let mut c = lock(counts);
    c.generations += 1;
    c.generated += trace.tokens.len() as u64;
    c.server_decided += decided;
    c.waits_ms.extend(waits);
    c.ttfts_ms.extend(ttft);
    Ok(())
}

/// An LLM-only device: the prompt, one `Generate`, the streamed tokens.
async fn stream_one(
    client: &RawClient,
    session_id: u64,
    trace: &Trace,
    counts: &Mutex<Counts>,
) -> Result<()> {
    let opened = Instant::now();
    let mut s = open(client, session_id, trace).await?;
    s.send(&Message::Generate(Generate {
        seq: 0,
        max_tokens: trace.tokens.len().max(1) as u32,
    }))
    .await?;
    let (mut generated, mut waits) = (0u64, Vec::new());
    let mut last = Instant::now();
    let mut ttft = None;
    loop {
        match s.recv().await? {
            Message::Tokens(t) => {
                ttft.get_or_insert(opened.elapsed().as_secs_f64() * 1e3);
                let gap = last.elapsed().as_secs_f64() * 1e3 / t.tokens.len().max(1) as f64;
                waits.extend(std::iter::repeat_n(gap, t.tokens.len()));
                generated += t.tokens.len() as u64;
                last = Instant::now();
            }
            Message::Finished(_) => break,
            other => bail!("expected Tokens or Finished, got {other:?}"),
        }
    }
    close(s).await?;
    let mut c = lock(counts);
    c.generations += 1;
    c.generated += generated;
    c.server_decided += generated;
    c.waits_ms.extend(waits);
    c.ttfts_ms.extend(ttft);
    Ok(())
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// The largest resident size process `pid` has had.
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn http_metrics(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn plot(report: &CapacityReport, dir: &Path) -> Result<()> {
    let series = |system: &str, y: fn(&Point) -> f64| Series {
        name: if system == "llm" {
            "LLM-only (streaming)".into()
        } else {
            "uhlm".into()
        },
        points: report
            .points
            .iter()
            .filter(|p| p.system == system)
            .map(|p| (p.devices as f64, y(p)))
            .collect(),
    };
    let systems: Vec<&str> = ["uhlm", "llm"]
        .into_iter()
        .filter(|s| report.points.iter().any(|p| p.system == *s))
        .collect();
    draw(
        &dir.join("capacity-throughput.svg"),
        &Chart {
            title: "Generated tokens/s over all devices",
            x_label: "devices",
            y_label: "tokens/s",
        },
        &[],
        &systems
            .iter()
            .map(|s| series(s, |p| p.generated_per_s))
            .collect::<Vec<_>>(),
    )?;
    draw(
        &dir.join("capacity-latency.svg"),
        &Chart {
            title: "p95 wait per server-decided token",
            x_label: "devices",
            y_label: "ms",
        },
        &[],
        &systems
            .iter()
            .map(|s| series(s, |p| p.wait_ms.p95))
            .collect::<Vec<_>>(),
    )?;
    Ok(())
}

fn print_table(report: &CapacityReport, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "{} traces, {} tokens, {} verifies ({:.1} % of tokens sent); device pace {} ms/token; \
         local tokens sent ahead after {} (0: never)",
        report.traces,
        report.trace_tokens,
        report.trace_verifies,
        100.0 * report.trace_verifies as f64 / report.trace_tokens.max(1) as f64,
        report.token_ms,
        report.extend_after
    )?;
    writeln!(
        out,
        "| system | devices | tokens/s | server-decided/s | wait p50/p95/p99 ms | first token p50/p95 ms | sessions/pass | passes/token | server CPU s/token | peak RSS MiB |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|")?;
    for p in &report.points {
        writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {:.2} | {:.3} | {:.4} | {:.0} |",
            p.system,
            p.devices,
            p.generated_per_s,
            p.server_decided_per_s,
            p.wait_ms.p50,
            p.wait_ms.p95,
            p.wait_ms.p99,
            p.ttft_ms.p50,
            p.ttft_ms.p95,
            p.sessions_per_pass,
            p.passes_per_token,
            p.server_cpu_s_per_token,
            p.server_peak_rss_bytes as f64 / (1 << 20) as f64
        )?;
    }
    Ok(())
}
