//! `uhlm bench paper`: the papers' systems side by side on the same prompts, with plots.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use uhlm_eval::pair::Pair;
use uhlm_eval::paper::{PaperOptions, PaperReport, bench_paper, snr_key};
use uhlm_eval::plot;
use uhlm_eval::prompts::PromptSet;
use uhlm_model::{LoadOptions, fetch};

#[derive(Debug, Args)]
pub struct PaperArgs {
    /// Draft model (path or registry name).
    #[arg(long, default_value = fetch::DRAFT_NAME)]
    slm: String,
    /// Verifying model (path or registry name).
    #[arg(long, default_value = "smollm2")]
    llm: String,
    /// A packaged set (fortunes, riddles, mixed) or a JSONL file.
    #[arg(long, default_value = "mixed")]
    prompts: String,
    /// Prompts used to calibrate the thresholds (taken first, not evaluated).
    #[arg(long)]
    calibration_prompts: Option<usize>,
    /// Prompts evaluated after the calibration ones.
    #[arg(long)]
    eval_prompts: Option<usize>,
    /// Tokens of the LLM's reference continuation per evaluated prompt.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// A tiny run that checks the harness end to end.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where the JSON, CSV and SVG files go.
    #[arg(long, default_value = "bench-paper")]
    out: PathBuf,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: PaperArgs) -> Result<()> {
    let mut options = if args.quick {
        PaperOptions::quick()
    } else {
        PaperOptions::default()
    };
    options.seed = args.seed;
    options.calibration.seed = args.seed;
    if let Some(n) = args.calibration_prompts {
        options.calibration_prompts = n;
    }
    if let Some(n) = args.max_tokens {
        options.max_tokens = n;
    }
    let eval = args.eval_prompts.unwrap_or(if args.quick { 2 } else { 24 });
    let prompts = PromptSet::load(
        &args.prompts,
        Some(options.calibration_prompts + eval),
        args.seed,
    )?;
    let pair = Pair::load(
        &fetch::resolve_model(&args.slm)?,
        &fetch::resolve_model(&args.llm)?,
        &LoadOptions {
            threads: args.threads,
            ..LoadOptions::default()
        },
    )?;
    eprintln!("prompts: {}", prompts.source);
    let report = bench_paper(&pair, &prompts, &options)?;
    write_files(&report, &args.out)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        print_table(&report, &mut out)?;
        writeln!(out, "files in {}", args.out.display())?;
    }
    Ok(())
}

fn write_files(report: &PaperReport, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("paper.json", serde_json::to_string_pretty(report)?)?;
    let snrs: Vec<String> = report.options.snr_db.iter().map(|s| snr_key(*s)).collect();
    let mut csv = format!(
        "name,skip_rate,uplink_bytes_per_token,agreement,fidelity,llm_loglik,{}\n",
        snrs.iter()
            .map(|k| format!("throughput_{k}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for s in &report.systems {
        csv += &format!(
            "{},{:.6},{:.3},{:.6},{:.6},{:.6},{}\n",
            s.name,
            s.skip_rate,
            s.uplink_bytes_per_token,
            s.agreement,
            s.fidelity,
            s.llm_loglik,
            snrs.iter()
                .map(|k| format!("{:.4}", s.throughput_tokens_per_s[k]))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    write("systems.csv", csv)?;
    let mut sweep = "threshold,skip_rate,fidelity,agreement\n".to_string();
    for p in &report.sweep {
        sweep += &format!(
            "{},{:.6},{:.6},{:.6}\n",
            p.threshold, p.skip_rate, p.fidelity, p.agreement
        );
    }
    write("threshold_sweep.csv", sweep)?;
    plot::calibration(&report.calibration, &dir.join("calibration.svg"))?;
    plot::threshold_sweep(report, &dir.join("threshold_sweep.svg"))?;
    plot::throughput_vs_snr(report, &dir.join("throughput_snr.svg"))?;
    Ok(())
}

fn print_table(report: &PaperReport, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "{} evaluated prompts, {} positions; SLM step {:.1} ms, LLM step {:.1} ms",
        report.eval_prompts,
        report.positions,
        report.compute.slm_step_s * 1e3,
        report.compute.llm_step_s * 1e3
    )?;
    let snrs: Vec<f64> = report.options.snr_db.clone();
    write!(
        out,
        "{:<8} {:>7} {:>11} {:>9} {:>8} {:>8}",
        "system", "skip %", "B/token up", "agree %", "fidelity", "loglik"
    )?;
    for snr in &snrs {
        write!(out, " {:>10}", format!("x HLM@{snr}dB"))?;
    }
    writeln!(out)?;
    for s in &report.systems {
        write!(
            out,
            "{:<8} {:>7.1} {:>11.0} {:>9.1} {:>8.4} {:>8.3}",
            s.name,
            s.skip_rate * 100.0,
            s.uplink_bytes_per_token,
            s.agreement * 100.0,
            s.fidelity,
            s.llm_loglik
        )?;
        for snr in &snrs {
            write!(out, " {:>10.2}", s.speedup_over_hlm[&snr_key(*snr)])?;
        }
        writeln!(out)?;
    }
    Ok(())
}
