//! `uhlm bench paper`: the papers' systems side by side on the same prompts, with plots.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use uhlm_eval::measured::{MeasureOptions, ServerProcess, measure};
use uhlm_eval::paper::{PaperOptions, PaperReport, bench_paper};
use uhlm_eval::plot;
use uhlm_eval::prompts::PromptSet;

use crate::pair_args::PairArgs;

#[derive(Debug, Args)]
pub struct PaperArgs {
    #[command(flatten)]
    pair: PairArgs,
    /// Prompts used to calibrate the thresholds (taken first, not evaluated).
    #[arg(long)]
    calibration_prompts: Option<usize>,
    /// Prompts evaluated after the calibration ones.
    #[arg(long)]
    eval_prompts: Option<usize>,
    /// Tokens of the LLM's reference continuation per evaluated prompt.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Link profiles to measure each system through for real (`uhlm-linkemu` presets; `none`
    /// skips the measured runs).
    #[arg(long, value_delimiter = ',', default_value = "good,cell-edge,poor")]
    links: Vec<String>,
    /// Prompts generated from per system and link profile.
    #[arg(long)]
    link_prompts: Option<usize>,
    /// Tokens per generation of the measured runs.
    #[arg(long)]
    link_tokens: Option<u32>,
    /// A tiny run that checks the harness end to end.
    #[arg(long)]
    quick: bool,
    /// Where the JSON, CSV and SVG files go.
    #[arg(long, default_value = "bench-paper")]
    out: PathBuf,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PaperArgs) -> Result<()> {
    let mut options = if args.quick {
        PaperOptions::quick()
    } else {
        PaperOptions::default()
    };
    options.seed = args.pair.seed;
    options.calibration.seed = args.pair.seed;
    if let Some(n) = args.calibration_prompts {
        options.calibration_prompts = n;
    }
    if let Some(n) = args.max_tokens {
        options.max_tokens = n;
    }
    let mut measure_options = if args.quick {
        MeasureOptions::quick()
    } else {
        MeasureOptions::default()
    };
    measure_options.profiles = args.links.into_iter().filter(|p| p != "none").collect();
    measure_options.seed = args.pair.seed;
    if let Some(n) = args.link_prompts {
        measure_options.prompts = n;
    }
    if let Some(n) = args.link_tokens {
        measure_options.max_tokens = n;
    }
    measure_options.link_profiles()?;
    let eval = args.eval_prompts.unwrap_or(if args.quick { 2 } else { 24 });
    let prompts = PromptSet::load(
        &args.pair.prompts,
        Some(options.calibration_prompts + eval),
        args.pair.seed,
    )?;
    let (slm, llm, pair) = args.pair.load()?;
    eprintln!("prompts: {}", prompts.source);
    let mut report = bench_paper(&pair, &prompts, &options)?;
    drop(pair);
    if !measure_options.profiles.is_empty() {
        eprintln!(
            "measuring every system through the {} link(s)",
            measure_options.profiles.join(", ")
        );
        let exe = std::env::current_exe().context("locating the uhlm executable")?;
        let mut serve = std::process::Command::new(exe);
        serve.arg("serve");
        let server = ServerProcess::spawn(serve, &llm)?;
        // uhlm starts from the run's own calibration, as a device shipped with it does.
        if let Some(calibration) = report.uhlm_calibration() {
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            let path = args.out.join("calibration.json");
            std::fs::write(&path, calibration.to_json())
                .with_context(|| format!("writing {}", path.display()))?;
            measure_options.calibration = Some(path);
        }
        let specs: Vec<_> = report.systems.iter().map(|s| s.spec()).collect();
        let eval = &prompts.prompts[prompts.prompts.len() - report.eval_prompts..];
        let runs = measure(&slm, &server, &specs, eval, &measure_options)?;
        // Recorded by its name beside the report, not by this machine's path.
        measure_options.calibration = measure_options
            .calibration
            .and_then(|p| p.file_name().map(PathBuf::from));
        report.add_measured(measure_options, runs);
    }
    write_files(&report, &args.out)?;
    crate::report_output::print_report(&report, args.json, &args.out, print_table)?;
    Ok(())
}

fn write_files(report: &PaperReport, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("paper.json", serde_json::to_string_pretty(report)?)?;
    let keys = report.throughput_keys();
    let mut csv = format!(
        "name,skip_rate,uplink_bytes_per_token,agreement,fidelity,llm_loglik,{}\n",
        keys.iter()
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
            keys.iter()
                .map(|k| format!(
                    "{:.4}",
                    s.throughput_tokens_per_s
                        .get(k)
                        .copied()
                        .unwrap_or(f64::NAN)
                ))
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
    if !report.measured.is_empty() {
        let mut csv =
            "system,profile,tokens,seconds,tokens_per_s,skip_rate,uplink_bytes_per_token,\
                       downlink_bytes_per_token,rtt_mean_ms,offline,reconnects,uplink_packets,\
                       uplink_lost,uplink_queue_drops\n"
                .to_string();
        for r in &report.measured {
            let up = &r.link.uplink;
            csv += &format!(
                "{},{},{},{:.3},{:.4},{:.6},{:.1},{:.1},{:.2},{},{},{},{},{}\n",
                r.system,
                r.profile,
                r.tokens,
                r.seconds,
                r.tokens_per_s,
                r.skip_rate,
                r.uplink_bytes_per_token,
                r.downlink_bytes_per_token,
                r.rtt_mean_ms,
                r.offline,
                r.reconnects,
                up.offered.packets,
                up.dropped.loss.packets,
                up.dropped.queue_full.packets
            );
        }
        write("measured.csv", csv)?;
        plot::measured_links(report, &dir.join("measured_links.svg"))?;
    }
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
    write!(
        out,
        "{:<8} {:>7} {:>11} {:>9} {:>8} {:>8}",
        "system", "skip %", "B/token up", "agree %", "fidelity", "loglik"
    )?;
    let keys = report.throughput_keys();
    for k in &keys {
        write!(out, " {:>14}", format!("x HLM {}", k.replace('_', " ")))?;
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
        for k in &keys {
            let x = s.speedup_over_hlm.get(k).copied().unwrap_or(f64::NAN);
            write!(out, " {x:>14.2}")?;
        }
        writeln!(out)?;
    }
    if let Some(o) = &report.measure_options {
        writeln!(
            out,
            "\nmeasured (QUIC through uhlm-linkemu, {} prompt(s) x {} tokens): tokens/s, skip %",
            o.prompts, o.max_tokens
        )?;
        write!(out, "{:<8}", "system")?;
        for p in &o.profiles {
            write!(out, " {p:>18}")?;
        }
        writeln!(out)?;
        for s in &report.systems {
            write!(out, "{:<8}", s.name)?;
            for p in &o.profiles {
                let run = report
                    .measured
                    .iter()
                    .find(|r| r.system == s.name && &r.profile == p);
                match run {
                    Some(r) => write!(
                        out,
                        " {:>18}",
                        format!("{:.2} ({:.0}%)", r.tokens_per_s, r.skip_rate * 100.0)
                    )?,
                    None => write!(out, " {:>18}", "-")?,
                }
            }
            writeln!(out)?;
        }
    }
    Ok(())
}
