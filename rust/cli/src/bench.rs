//! `uhlm bench model`: load, prefill and decode speed of one model.
//!
//! candle sizes its kernel thread pool once per process, so each thread count runs in a fresh
//! child process (this binary with a single `--threads` value and `--json`).

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::time::Duration;

use uhlm_eval::token_cost::token_cost;
use uhlm_model::{BenchReport, Device, LoadOptions, Model, bench_model, check_device, fetch};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Load / prefill / decode throughput of one model.
    Model(BenchModelArgs),
    /// The U-HLM / CU-HLM comparison: SLM, LLM, HLM, U-HLM, CU-HLM and uhlm on the same prompts.
    Paper(crate::paper::PaperArgs),
    /// HumanEval, scored by running the completions: every system as real software over QUIC,
    /// pass@1, tokens decided on the device, uplink bytes, LLM passes and tokens/s.
    Humaneval(crate::humaneval::HumanEvalArgs),
    /// How many devices one server holds: recorded device traces replayed by N simulated
    /// devices against a real server, uhlm against LLM-only streaming, N swept.
    Capacity(crate::capacity::CapacityArgs),
    /// What pipelined drafting buys on real links: SLM only, LLM only, uhlm one draft at a
    /// time and uhlm pipelined, over QUIC through `uhlm-linkemu`.
    Pipeline(crate::pipeline::PipelineArgs),
    /// What one drafted token costs the device beyond the SLM's forward pass (softmax, uplink
    /// encoding, uncertainty, policy, frame), timed on the SLM's own logits.
    Token(BenchTokenArgs),
}

#[derive(Debug, Args)]
pub struct BenchTokenArgs {
    /// Model: path to a GGUF or a registry name [default: the default pair's device model].
    #[arg(long, short)]
    model: Option<String>,
    /// Kernel threads of the forward pass.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Positions decoded (greedy) whose logits the stages are timed on.
    #[arg(long, default_value_t = 64)]
    positions: usize,
    /// Sampling temperature of the softmax stage (0: greedy, one-hot).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct BenchModelArgs {
    /// Model: path to a GGUF or a registry name.
    #[arg(long, short)]
    model: String,
    /// Thread counts to measure, comma-separated [default: candle's default].
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Sessions decoding in lock step, one batched forward pass per step (what a server
    /// verifying many devices at once runs); the decode rate counts all their tokens.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Where the forward passes run: cpu, cuda or cuda:N (GPU builds: `cargo xtask cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Before timing, compare the model's logits on --device with the CPU's, and batched
    /// with alone there; fails on a non-finite logit.
    #[arg(long)]
    check_device: bool,
    /// Print the reports as JSON lines.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Model(args) => bench(args),
        BenchCommand::Paper(args) => crate::paper::run(args),
        BenchCommand::Humaneval(args) => crate::humaneval::run(args),
        BenchCommand::Capacity(args) => crate::capacity::run(args),
        BenchCommand::Pipeline(args) => crate::pipeline::run(args),
        BenchCommand::Token(args) => token(args),
    }
}

fn bench(args: BenchModelArgs) -> Result<()> {
    let path = fetch::resolve_model(&args.model)?;
    if args.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.check_device {
        let check = check_device(&path, args.device, args.prompt_tokens)
            .with_context(|| format!("checking {} on {}", path.display(), args.device))?;
        eprintln!(
            "{}: logits within {:.4} of the CPU's over {} rows ({} most likely tokens differ); \
             batched within {:.4} of alone",
            check.device,
            check.max_abs_diff_vs_cpu,
            check.rows,
            check.argmax_mismatches,
            check.max_abs_diff_batched_vs_alone
        );
        if args.json {
            println!("{}", serde_json::to_string(&check)?);
        }
        if !(check.max_abs_diff_vs_cpu.is_finite()
            && check.max_abs_diff_batched_vs_alone.is_finite())
        {
            bail!("non-finite logits on {}", args.device);
        }
    }
    let reports = if args.threads.len() <= 1 {
        let threads = args.threads.first().copied();
        vec![
            bench_model(
                &path,
                threads,
                args.device,
                args.prompt_tokens,
                args.decode_tokens,
                args.batch,
            )
            .with_context(|| format!("benchmarking {}", path.display()))?,
        ]
    } else {
        args.threads
            .iter()
            .map(|&t| run_child(&path, t, &args))
            .collect::<Result<Vec<_>>>()?
    };
    if args.json {
        for r in &reports {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "{:<32} {:>7} {:>8} {:>13} {:>12} {:>8} {:>8} {:>9} {:>9}",
        "model",
        "threads",
        "load ms",
        "prefill tok/s",
        "decode tok/s",
        "file MiB",
        "KV MiB",
        "peak MiB",
        "model MiB"
    );
    let mib = |b: Option<u64>| {
        b.map(|b| format!("{:.0}", b as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "-".into())
    };
    for r in &reports {
        println!(
            "{:<32} {:>7} {:>8.0} {:>13.1} {:>12.1} {:>8} {:>8} {:>9} {:>9}",
            r.model,
            r.threads,
            r.load_ms,
            r.prefill_tok_s,
            r.decode_tok_s,
            mib(Some(r.file_bytes)),
            mib(Some(r.kv_cache_bytes)),
            mib(r.peak_rss_bytes),
            mib(r.model_rss_bytes()),
        );
    }
    println!("(model MiB: peak resident memory minus the program's before the model loaded)");
    Ok(())
}

/// A short code prompt: the positions after it are the kind a coding demo drafts.
const TOKEN_PROMPT: &str =
    "def fibonacci(n: int) -> list[int]:\n    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n";

fn token(args: BenchTokenArgs) -> Result<()> {
    let name = match &args.model {
        Some(m) => m.clone(),
        None => fetch::find_pair(fetch::DEFAULT_PAIR)?.slm.to_string(),
    };
    let path = fetch::resolve_model(&name)?;
    let model = Model::load(
        &path,
        &LoadOptions {
            threads: Some(args.threads),
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading {}", path.display()))?;
    let prompt = model.tokenizer().encode(TOKEN_PROMPT, true)?;
    let report = token_cost(
        &model,
        &prompt,
        args.positions,
        args.temperature,
        Duration::from_millis(500),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} (vocabulary {}, {} positions, temperature {}, {} thread(s))",
        report.model, report.vocab, report.positions, report.temperature, args.threads
    );
    println!("{:<44} {:>12} {:>12}", "stage", "µs/token", "of forward");
    println!(
        "{:<44} {:>12.1} {:>11.1}%",
        "SLM forward (decode step)", report.forward_us, 100.0
    );
    for s in &report.stages {
        println!(
            "{:<44} {:>12.1} {:>11.2}%",
            s.stage,
            s.us_per_token,
            100.0 * s.of_forward
        );
    }
    println!(
        "{:<44} {:>12.1} {:>11.2}%",
        "uhlm defaults, all stages",
        report.uhlm_default_us,
        100.0 * report.uhlm_default_of_forward
    );
    Ok(())
}

fn run_child(path: &std::path::Path, threads: usize, args: &BenchModelArgs) -> Result<BenchReport> {
    let exe = std::env::current_exe().context("locating the uhlm binary")?;
    let output = Command::new(exe)
        .args(["bench", "model", "--json", "--model"])
        .arg(path)
        .args([
            "--threads".to_string(),
            threads.to_string(),
            "--prompt-tokens".to_string(),
            args.prompt_tokens.to_string(),
            "--decode-tokens".to_string(),
            args.decode_tokens.to_string(),
            "--batch".to_string(),
            args.batch.to_string(),
            "--device".to_string(),
            args.device.to_string(),
        ])
        .output()
        .context("running the benchmark child process")?;
    if !output.status.success() {
        bail!(
            "benchmark with {threads} threads failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().next().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("parsing the child's report {line:?}"))
}
