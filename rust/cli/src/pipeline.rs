//! `uhlm bench pipeline`: what pipelined drafting buys on real links. The device (this
//! process, the SDK with the SLM) and a `uhlm serve` child process (the LLM) talk QUIC through
//! `uhlm-linkemu`, and four systems run on the same prompts one after the other: the SLM
//! alone, the LLM alone (streamed), uhlm drafting one token at a time (every uncertain token
//! waits for its verdict) and uhlm pipelined (the SDK's default).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use uhlm_eval::measured::{MeasureOptions, MeasuredRun, ServerProcess, measure};
use uhlm_eval::paper::{SystemKind, SystemSpec};
use uhlm_eval::prompts::PromptSet;
use uhlm_sdk::{Codec, UncertaintyKind};

use crate::pair_args::ModelPairArgs;

#[derive(Debug, Args)]
pub struct PipelineArgs {
    #[command(flatten)]
    models: ModelPairArgs,
    /// A packaged prompt set (fortunes, riddles, mixed, humaneval) or a JSONL file.
    #[arg(long, default_value = "humaneval")]
    prompts: String,
    /// Link profiles (`uhlm-linkemu` presets).
    #[arg(long, value_delimiter = ',', default_value = "good,cell-edge")]
    links: Vec<String>,
    /// Prompts generated from per system and link.
    #[arg(long, default_value_t = 2)]
    link_prompts: usize,
    /// Tokens per generation.
    #[arg(long, default_value_t = 32)]
    link_tokens: u32,
    /// uhlm's uncertainty threshold (fixed for the run). The default is about what the
    /// HumanEval harness calibrates on the Qwen2.5-Coder pair (docs/RESULTS.md).
    #[arg(long, default_value_t = 0.1)]
    threshold: f32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// CPU threads of the device's SLM and of the server's kernels: one each by default, so
    /// that on one machine the phone and the server compute side by side as on two (the
    /// pipelined device drafts while the server verifies).
    #[arg(long, default_value_t = 1)]
    device_threads: usize,
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// Where `pipeline.json` goes.
    #[arg(long, default_value = "bench-pipeline")]
    out: PathBuf,
}

#[derive(Serialize)]
struct PipelineReport {
    slm: String,
    llm: String,
    threshold: f32,
    options: MeasureOptions,
    runs: Vec<MeasuredRun>,
}

/// uhlm with our defaults and a fixed threshold.
fn uhlm(name: &str, description: &str, threshold: f32) -> SystemSpec {
    SystemSpec {
        name: name.into(),
        description: description.into(),
        kind: SystemKind::Hybrid {
            estimator: UncertaintyKind::default(),
            threshold,
            codec: Codec::default(),
            recalibrate: false,
        },
    }
}

pub fn run(args: PipelineArgs) -> Result<()> {
    let (slm, llm) = args.models.paths()?;
    let prompts = PromptSet::load(&args.prompts, Some(args.link_prompts), args.seed)?;
    let mut options = MeasureOptions {
        profiles: args.links.clone(),
        prompts: args.link_prompts,
        max_tokens: args.link_tokens,
        seed: args.seed,
        device_threads: Some(args.device_threads),
        ..MeasureOptions::default()
    };
    options.link_profiles()?;
    let exe = std::env::current_exe().context("locating the uhlm executable")?;
    let mut serve = std::process::Command::new(exe);
    serve.args([
        "serve",
        "--kernel-threads",
        &args.server_threads.to_string(),
    ]);
    eprintln!("starting the server on {}", llm.display());
    let server = ServerProcess::spawn(serve, &llm)?;
    let sequential = [
        SystemSpec {
            name: "SLM only".into(),
            description: "the device alone".into(),
            kind: SystemKind::SlmOnly,
        },
        SystemSpec {
            name: "LLM only".into(),
            description: "the server generates and streams every token".into(),
            kind: SystemKind::LlmOnly,
        },
        uhlm(
            "uhlm, one draft at a time",
            "every uncertain token waits for its verdict (max_lookahead 0)",
            args.threshold,
        ),
    ];
    eprintln!(
        "measuring through the {} link(s), {} prompt(s) of {} tokens per system",
        options.profiles.join(", "),
        options.prompts,
        options.max_tokens
    );
    options.max_lookahead = Some(0);
    let mut runs = measure(&slm, &server, &sequential, &prompts.prompts, &options)?;
    options.max_lookahead = None;
    let pipelined = [uhlm(
        "uhlm, pipelined",
        "drafts ahead while chains are verified (the SDK's default)",
        args.threshold,
    )];
    runs.extend(measure(
        &slm,
        &server,
        &pipelined,
        &prompts.prompts,
        &options,
    )?);
    runs.sort_by(|a, b| a.profile.cmp(&b.profile));
    print_table(&runs);
    let report = PipelineReport {
        slm: slm.display().to_string(),
        llm: llm.display().to_string(),
        threshold: args.threshold,
        options,
        runs,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("pipeline.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn print_table(runs: &[MeasuredRun]) {
    println!(
        "{:<12} {:<28} {:>8} {:>8} {:>10} {:>9}",
        "link", "system", "tok/s", "skipped", "B up/tok", "RTT ms"
    );
    for r in runs {
        println!(
            "{:<12} {:<28} {:>8.2} {:>7.1}% {:>10.0} {:>9.0}",
            r.profile,
            r.system,
            r.tokens_per_s,
            r.skip_rate * 100.0,
            r.uplink_bytes_per_token,
            r.rtt_mean_ms
        );
    }
    let find = |profile: &str, system: &str| {
        runs.iter()
            .find(|r| r.profile == profile && r.system == system)
            .map(|r| r.tokens_per_s)
    };
    let mut profiles: Vec<&str> = runs.iter().map(|r| r.profile.as_str()).collect();
    profiles.dedup();
    for p in profiles {
        if let (Some(piped), Some(seq), Some(slm)) = (
            find(p, "uhlm, pipelined"),
            find(p, "uhlm, one draft at a time"),
            find(p, "SLM only"),
        ) {
            println!(
                "{p}: pipelined {:.2}x one-at-a-time, {:.2}x SLM only",
                piped / seq.max(f64::MIN_POSITIVE),
                piped / slm.max(f64::MIN_POSITIVE)
            );
        }
    }
}
