//! `uhlm calibrate`: fit beta ≈ a·u + b for every estimator on an SLM/LLM pair and write the
//! calibration file the SDK loads.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use uhlm_core::sampling::SamplingOptions;
use uhlm_eval::calibrate::{CalibrationOptions, CalibrationRun, calibrate};
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
    let default = run
        .default_calibration()
        .context("the default estimator could not be fitted on these samples")?;
    std::fs::write(&args.out, default.to_json())
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
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
