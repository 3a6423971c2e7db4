//! `uhlm calibrate`: fit beta ≈ a·u + b for every estimator on an SLM/LLM pair and write the
//! calibration file the SDK loads; or build that file from labelled runs kept before (`--from`),
//! e.g. the calibrations of a `uhlm bench humaneval` run, without running the models again.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use uhlm_core::sampling::SamplingOptions;
use uhlm_core::threshold::{Calibration, DEFAULT_CONFIDENCE, DEFAULT_MAX_OUTPUT_RISK};
use uhlm_core::uncertainty::UncertaintyKind;
use uhlm_eval::calibrate::{
    CalibrationOptions, CalibrationRun, calibrate, combined_calibration, pooled_calibration,
};
use uhlm_eval::plot;
use uhlm_eval::prompts::PromptSet;

use crate::pair_args::PairArgs;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pair: PairArgs,
    /// How many prompts of the set to use [default: all].
    #[arg(long)]
    count: Option<usize>,
    /// Tokens drafted per prompt.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Mean rejection probability the target-risk threshold allows among skipped tokens.
    #[arg(long, default_value_t = 0.1)]
    epsilon: f32,
    /// Share of outputs that may differ from the LLM's (the SDK's `output_quality` target);
    /// each prompt's labelled run is one output.
    #[arg(long, default_value_t = DEFAULT_MAX_OUTPUT_RISK)]
    max_risk: f32,
    /// Confidence of the per-output bound.
    #[arg(long, default_value_t = DEFAULT_CONFIDENCE)]
    confidence: f32,
    /// Write the calibration of a combined predictor (a logistic combination of the
    /// deterministic signals, refitted online by the SDK) instead of the default estimator's.
    #[arg(long)]
    combined: bool,
    /// Build the file from labelled runs written before (`--samples` files, or a HumanEval
    /// run's `calibration-fold*.json`), pooled, instead of running the pair.
    #[arg(long, num_args = 1.., value_name = "RUN.json", conflicts_with_all = ["count", "samples", "plot"])]
    from: Vec<PathBuf>,
    /// The calibration file for the SDK (default estimator).
    #[arg(long, default_value = "calib.json")]
    out: PathBuf,
    /// Also write every labelled sample and every estimator's fit as JSON.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Scatter of beta against u with the fitted line (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    if let Some(path) = &args.plot {
        anyhow::ensure!(
            path.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("svg")),
            "plots are written as SVG: give --plot a .svg path, not {}",
            path.display()
        );
    }
    if !args.from.is_empty() {
        let runs = args
            .from
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
            })
            .collect::<Result<Vec<CalibrationRun>>>()?;
        for run in &runs {
            print_table(run);
        }
        return write(&args, &runs);
    }
    let seed = args.pair.seed;
    let prompts = PromptSet::load(&args.pair.prompts, args.count, seed)?;
    let (_, _, pair) = args.pair.load()?;
    let options = CalibrationOptions {
        sampling: SamplingOptions {
            temperature: args.temperature,
            max_tokens: args.max_tokens,
            seed: Some(seed),
            ..SamplingOptions::default()
        },
        target_risk_epsilon: args.epsilon,
        seed,
        ..CalibrationOptions::default()
    };
    eprintln!("calibrating on {}", prompts.source);
    let run = calibrate(&pair, &prompts, &options)?;
    print_table(&run);
    write(&args, std::slice::from_ref(&run))?;
    if let Some(path) = &args.samples {
        std::fs::write(path, serde_json::to_string(&run)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot::calibration(&run, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes the SDK's calibration file from `runs` pooled and says what it allows.
fn write(args: &CalibrateArgs, runs: &[CalibrationRun]) -> Result<()> {
    let calibration: Calibration = if args.combined {
        combined_calibration(runs, args.max_risk, args.confidence)?
    } else {
        pooled_calibration(
            runs,
            &UncertaintyKind::default(),
            args.max_risk,
            args.confidence,
        )
        .context("the default estimator could not be calibrated on these samples")?
    };
    std::fs::write(&args.out, calibration.to_json())
        .with_context(|| format!("writing {}", args.out.display()))?;
    if let Some(q) = &calibration.output_quality {
        eprintln!(
            "output quality: at most {:.0}% of outputs differ from the LLM's (confidence {:.0}%): \
             u_th {:.4}, skips {:.1}% of {} calibration tokens",
            q.max_risk * 100.0,
            q.confidence * 100.0,
            q.controlled.u_th,
            q.controlled.skip_rate * 100.0,
            calibration.samples
        );
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn print_table(run: &CalibrationRun) {
    println!(
        "{} samples, mean acceptance (sum min(p,q)) {:.3}",
        run.samples.len(),
        run.mean_acceptance
    );
    println!(
        "{:<24} {:>7} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7}",
        "estimator", "a", "b", "R2", "r", "-b/a", "(D-b)/a", "target", "skip@tr"
    );
    for (i, f) in run.fits.iter().enumerate() {
        match &f.calibration {
            Some(c) => {
                let samples = run.samples_of(i);
                let skip = samples.iter().filter(|s| s.u < c.target_risk).count() as f64
                    / samples.len().max(1) as f64;
                println!(
                    "{:<24} {:>7.3} {:>7.3} {:>6.3} {:>6.3} {:>8.3} {:>8.3} {:>8.3} {:>6.1}%",
                    f.name,
                    c.fit.a,
                    c.fit.b,
                    c.fit.r2,
                    c.fit.pearson_r,
                    c.risk_averse,
                    c.risk_prone,
                    c.target_risk,
                    skip * 100.0
                );
            }
            None => println!(
                "{:<24} no fit: {}",
                f.name,
                f.error.as_deref().unwrap_or("?")
            ),
        }
    }
}
