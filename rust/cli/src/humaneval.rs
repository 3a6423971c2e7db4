//! `uhlm bench humaneval`: SLM only, LLM only, HLM, U-HLM, CU-HLM and uhlm write HumanEval
//! completions as real software (SDK here, `uhlm serve` child process, QUIC on loopback), and
//! every completion is executed against its tests. Resumes from its output directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use uhlm_eval::calibrate::CalibrationRun;
use uhlm_eval::engine_process::EngineProcess;
use uhlm_eval::humaneval::bench::{
    FoldThresholds, HumanEvalOptions, HumanEvalReport, Progress, calibrate_fold, fold_systems,
    folds, generate_fold, pending_count, score, signal_scores,
};
use uhlm_eval::humaneval::{Executor, PromptFormat, fetch_problems, load_problems};
use uhlm_eval::measured::ServerProcess;
use uhlm_eval::pair::Pair;
use uhlm_eval::plot;
use uhlm_model::LoadOptions;

use crate::pair_args::ModelPairArgs;

#[derive(Debug, Args)]
pub struct HumanEvalArgs {
    #[command(flatten)]
    models: ModelPairArgs,
    /// Evaluate the first N problems [default: all 164].
    #[arg(long)]
    limit: Option<usize>,
    /// `chat` (the models' chat template, a request for one code block) or `completion`
    /// (the prompt continued raw, Codex's stop strings).
    #[arg(long, default_value = "chat")]
    format: PromptFormat,
    /// Tokens per completion at most.
    #[arg(long, default_value_t = 384)]
    max_tokens: u32,
    /// Samples per problem at --temperature for pass@1 by the unbiased estimator (0: greedy only).
    #[arg(long, default_value_t = 0)]
    samples: u32,
    #[arg(long, default_value_t = 0.2)]
    temperature: f32,
    /// Problems each fold's thresholds are calibrated on (never the fold's own).
    #[arg(long, default_value_t = 32)]
    calibration_problems: usize,
    /// Tokens labelled per calibration problem at most (each stops where its generation would:
    /// EOS or the format's stop string).
    #[arg(long, default_value_t = 384)]
    calibration_tokens: u32,
    /// uhlm's quality target: the share of completions that may differ from the LLM-only one
    /// (certified per output on the calibration problems, with --confidence).
    #[arg(long, default_value_t = 0.1)]
    max_risk: f32,
    /// Confidence that the calibrated threshold meets --max-risk.
    #[arg(long, default_value_t = 0.9)]
    confidence: f32,
    /// Extra uhlm runs at fixed closed-form thresholds (the pass@1 / skip-rate curve).
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<f32>,
    /// Systems to run [default: slm,llm,hlm,u-hlm,cu-hlm,uhlm].
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Put a `uhlm-linkemu` link (good, cell-edge, poor) between device and server.
    #[arg(long)]
    link: Option<String>,
    /// Seconds a completion's tests may run.
    #[arg(long, default_value_t = 10)]
    exec_timeout: u64,
    /// CPU threads for the models' kernels, the device's and the server's each. One by default:
    /// device and server share this machine, and two thread pools spinning on the same cores
    /// slow both down several times over.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// What runs the server's LLM: `embedded` (`uhlm serve`'s own runtime) or `llama-server`
    /// (llama.cpp's server, started here on the LLM with `--threads` threads, from
    /// `UHLM_LLAMA_SERVER` or `PATH`; `uhlm serve --engine llama-server` in front of it).
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "llama-server"])]
    engine: String,
    /// Output directory: samples, calibrations, report; a run resumes from it.
    #[arg(long, default_value = "bench-humaneval")]
    out: PathBuf,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl HumanEvalArgs {
    fn options(&self) -> HumanEvalOptions {
        HumanEvalOptions {
            limit: self.limit,
            format: self.format,
            max_tokens: self.max_tokens,
            samples: self.samples,
            temperature: self.temperature,
            calibration_problems: self.calibration_problems,
            calibration_tokens: self.calibration_tokens,
            max_risk: self.max_risk,
            confidence: self.confidence,
            sweep: self.sweep.clone(),
            systems: self.systems.clone(),
            link: self.link.clone(),
            seed: self.seed,
            threads: Some(self.threads),
            engine: (self.engine != "embedded").then(|| self.engine.clone()),
            ..HumanEvalOptions::default()
        }
    }
}

/// Progress bar over every pending generation, with a running pass count.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn generated(&self, system: &str, task_id: &str, passed: bool) {
        self.0.set_message(format!(
            "{system} {task_id} {}",
            if passed { "passed" } else { "failed" }
        ));
        self.0.inc(1);
    }
}

/// A progress bar over `len` units of `what`, with elapsed time and an estimate of the rest.
fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what}, eta {{eta}} {{msg}}"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

pub fn run(args: HumanEvalArgs) -> Result<()> {
    let options = args.options();
    if let Some(link) = &options.link {
        uhlm_linkemu::LinkProfile::preset(link)
            .ok_or_else(|| uhlm_eval::EvalError::UnknownLinkProfile(link.clone()))?;
    }
    let problems = load_problems(&fetch_problems(true)?)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let run_file = args.out.join("run.json");
    if run_file.is_file() {
        let previous: HumanEvalOptions = serde_json::from_str(
            &std::fs::read_to_string(&run_file)
                .with_context(|| format!("reading {}", run_file.display()))?,
        )
        .with_context(|| format!("parsing {}", run_file.display()))?;
        options.check_resumable(&previous)?;
        eprintln!("resuming the run in {}", args.out.display());
    }
    // The latest options (a resumed run may have added samples, sweep points or systems).
    std::fs::write(&run_file, serde_json::to_string_pretty(&options)?)
        .with_context(|| format!("writing {}", run_file.display()))?;
    let (slm, llm) = args.models.paths()?;
    let folds = folds(problems.len(), &options);
    let load = LoadOptions {
        threads: Some(args.threads),
        ..LoadOptions::default()
    };
    let mut pair: Option<Pair> = None;
    let mut plan = Vec::new();
    let mut thresholds = Vec::new();
    let mut calibrations = Vec::new();
    for (i, fold) in folds.iter().enumerate() {
        let path = args.out.join(format!("calibration-fold{i}.json"));
        let run: CalibrationRun = if path.is_file() {
            serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("parsing {}", path.display()))?
        } else {
            if pair.is_none() {
                pair = Some(Pair::load(&slm, &llm, &load)?);
            }
            eprintln!(
                "fold {i}: calibrating on {} problems (at most {} tokens each)",
                fold.calibration.len(),
                options.calibration_tokens
            );
            let bar = progress_bar(fold.calibration.len() as u64, "problems calibrated");
            let run = calibrate_fold(
                pair.as_ref().expect("loaded"),
                &problems,
                fold,
                &options,
                &mut |_| bar.inc(1),
            )?;
            bar.finish_and_clear();
            std::fs::write(&path, serde_json::to_string(&run)?)
                .with_context(|| format!("writing {}", path.display()))?;
            run
        };
        let t = FoldThresholds::from_calibration(&run, &options)?;
        eprintln!(
            "fold {i}: {} problems; uhlm u_th {:.4} (skips {:.1}% of {} calibration tokens at risk {:.4}); U-HLM -b/a {:.4}",
            fold.evaluated.len(),
            t.uhlm,
            t.uhlm_calibration_skip * 100.0,
            t.calibration_tokens,
            t.uhlm_calibration_risk,
            t.paper
        );
        let vocab = uhlm_model::tokenizer::Tokenizer::from_gguf_path(&llm)?.vocab_size();
        plan.push((fold.clone(), fold_systems(&t, vocab, &options)));
        thresholds.push(t);
        calibrations.push(run);
    }
    drop(pair);

    let todo = pending_count(&problems, &plan, &args.out, &options)?;
    if todo > 0 {
        let exe = std::env::current_exe().context("locating the uhlm executable")?;
        let mut serve = std::process::Command::new(exe);
        serve.arg("serve");
        serve.arg("--kernel-threads").arg(args.threads.to_string());
        // Kept until the run ends: the gateway delegates every pass to it.
        let _engine = match options.engine.as_deref() {
            Some("llama-server") => {
                let engine = EngineProcess::start(&llm, 1, 8192, args.threads)?;
                serve.args(engine.serve_args());
                Some(engine)
            }
            _ => None,
        };
        let server = ServerProcess::spawn(serve, &llm)?;
        let mut executor = Executor::new()?;
        executor.timeout = std::time::Duration::from_secs(args.exec_timeout);
        let progress = Bar(progress_bar(todo, "generations"));
        for (fold, systems) in &plan {
            generate_fold(
                &slm, &server, &problems, fold, systems, &executor, &args.out, &options, &progress,
            )?;
        }
        progress.0.finish_and_clear();
    }
    let systems = &plan.first().map(|p| p.1.clone()).unwrap_or_default();
    let report = HumanEvalReport {
        slm: slm.display().to_string(),
        llm: llm.display().to_string(),
        problems: folds.iter().map(|f| f.evaluated.len()).sum(),
        systems: score(&args.out, &problems, &folds, systems, &options)?,
        signals: signal_scores(&calibrations, &[0.05, 0.1, 0.2], options.confidence as f64)?,
        folds,
        thresholds,
        options,
    };
    write_files(&report, &args.out)?;
    crate::report_output::print_report(&report, args.json, &args.out, print_table)?;
    Ok(())
}

fn write_files(report: &HumanEvalReport, dir: &Path) -> Result<()> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("humaneval.json", serde_json::to_string_pretty(report)?)?;
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
    let mut csv = "name,problems,pass_at_1_greedy,pass_at_1_sampled,of_llm,gap_recovered,\
                   device_share,uplink_bytes_per_token,llm_forwards_per_token,tokens_per_s,\
                   tokens,offline\n"
        .to_string();
    for s in &report.systems {
        csv += &format!(
            "{},{},{},{},{},{},{:.6},{:.2},{:.4},{:.3},{},{}\n",
            s.name,
            s.problems,
            opt(s.pass_at_1_greedy),
            opt(s.pass_at_1_sampled),
            opt(s.of_llm),
            opt(s.gap_recovered),
            s.device_share,
            s.uplink_bytes_per_token,
            s.llm_forwards_per_token,
            s.tokens_per_s,
            s.tokens,
            s.offline
        );
    }
    write("humaneval.csv", csv)?;
    plot::humaneval(report, &dir.join("humaneval.svg"))?;
    Ok(())
}

fn print_table(report: &HumanEvalReport, out: &mut impl Write) -> Result<()> {
    let o = &report.options;
    writeln!(
        out,
        "HumanEval, {} problems, {} format, greedy{}; {} fold(s)",
        report.problems,
        o.format,
        if o.samples > 0 {
            format!(" + {} samples at T={}", o.samples, o.temperature)
        } else {
            String::new()
        },
        report.folds.len()
    )?;
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}", v * 100.0));
    writeln!(
        out,
        "{:<10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10} {:>10} {:>9}",
        "system",
        "pass@1 %",
        "T pass@1",
        "of LLM",
        "gap rec",
        "device %",
        "B/token up",
        "LLM fwd/t",
        "tokens/s"
    )?;
    for s in &report.systems {
        writeln!(
            out,
            "{:<10} {:>9} {:>9} {:>8} {:>8} {:>9.1} {:>10.1} {:>10.3} {:>9.2}",
            s.name,
            pct(s.pass_at_1_greedy),
            pct(s.pass_at_1_sampled),
            pct(s.of_llm),
            pct(s.gap_recovered),
            s.device_share * 100.0,
            s.uplink_bytes_per_token,
            s.llm_forwards_per_token,
            s.tokens_per_s
        )?;
    }
    let tokens: usize = report.thresholds.iter().map(|t| t.calibration_tokens).sum();
    writeln!(
        out,
        "\nuncertainty signals on {tokens} calibration tokens: AUROC for a greedy mismatch; \
         tokens skipped when at most 5% / 10% / 20% of outputs may differ from the LLM's"
    )?;
    for s in &report.signals {
        let skips: Vec<String> = s
            .skip_at_risk
            .iter()
            .map(|r| format!("{:.1}%", r.skip_rate * 100.0))
            .collect();
        writeln!(
            out,
            "  {:<26} AUROC {:.3}   {}",
            s.estimator,
            s.auroc,
            skips.join(" / ")
        )?;
    }
    Ok(())
}
