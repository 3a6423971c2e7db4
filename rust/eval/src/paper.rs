//! `uhlm bench paper`: the U-HLM and CU-HLM comparisons, computed exactly on real models.
//!
//! Every system is evaluated teacher-forced on the LLM's own greedy continuation of each prompt:
//! at each position we have the SLM's logits `z_q` and the LLM's distribution `p`. From them,
//! without sampling, a system's
//! - decision under greedy decoding (agreement: does it equal the LLM's token),
//! - output distribution `P` under sampling at temperature 1, in closed form:
//!   `P(x) = q_d(x)·[x skipped] + q_d(x)·min(1, p(x)/q_s(x))·[x sent] + R·norm(max(0, p - q_s))(x)`
//!   where `q_d` is what the device samples from, `q_s` what the server sees, and `R` the
//!   probability that a sent draft is rejected (fidelity = `sum min(P, p)`, log-likelihood =
//!   `E_P[ln p]`),
//! - expected skip rate and uplink bytes per token,
//! - expected time per token on the simulated fading channel at each SNR, with the SLM and LLM step
//!   times measured on this machine.
//!
//! Skipping is decided by `u(x) < u_th`, each token by its own estimate. `u` is computed for the
//! top [`RANKED`] tokens of the SLM's ranking and the rest are sent: exact for the closed form
//! (its `u` rises down the ranking) whenever `u_th` is below the last ranked token's `u`; for the
//! Monte-Carlo estimator a token further down could draw a low `u` only with negligible
//! probability, since its chance of being sampled at every temperature is tiny.

mod closed_form;
mod frame_bytes;
mod report;
mod systems;

use std::collections::BTreeMap;
use std::time::Instant;

use uhlm_core::sampling::argmax;
use uhlm_core::threshold::{Calibration, PolicyConfig};
use uhlm_core::uncertainty::UncertaintyKind;

use crate::EvalError;
use crate::calibrate::calibrate;
use crate::channel::{Channel, ChannelConfig};
use crate::pair::Pair;
use crate::prompts::PromptSet;
use closed_form::Evaluation;

pub use closed_form::RANKED;
use report::fill_speedups;
pub use report::{ComputeTimes, PaperOptions, PaperReport, SweepPoint, SystemResult, snr_key};
pub use systems::{SystemKind, SystemSpec, systems};

/// Runs calibration, then every system over the evaluation prompts.
pub fn bench_paper(
    pair: &Pair,
    prompts: &PromptSet,
    options: &PaperOptions,
) -> Result<PaperReport, EvalError> {
    let split = options
        .calibration_prompts
        .min(prompts.prompts.len().saturating_sub(1));
    let calibration_set = PromptSet {
        source: format!("first {split} of: {}", prompts.source),
        prompts: prompts.prompts[..split].to_vec(),
    };
    let eval = &prompts.prompts[split..];
    let mut cal_options = options.calibration.clone();
    cal_options.estimators = vec![
        UncertaintyKind::default(),
        UncertaintyKind::paper(options.seed),
    ];
    let calibration = calibrate(pair, &calibration_set, &cal_options)?;
    let our_threshold = sdk_threshold(calibration.fits[0].calibration.as_ref());
    let paper = calibration.fits[1].calibration.as_ref();
    let paper_threshold = paper.map_or(0.0, |c| (c.risk_averse as f32).max(0.0));
    let vocab = pair.llm.info().vocab_size;
    let cuhlm_k = options
        .cuhlm_k
        .unwrap_or(((vocab as f64 * 0.026).round() as u32).max(1));
    let systems = systems(our_threshold, paper_threshold, cuhlm_k);

    let mut run = Evaluation::new(&systems, options)?;
    let mut compute = TimeAcc::default();
    let eos = pair.llm.tokenizer().eos_ids().to_vec();
    for prompt in eval {
        let ids = pair.prompt_ids(prompt)?;
        let (mut slm, mut llm) = (pair.slm.session(), pair.llm.session());
        let mut z_p = llm.score_last(&ids)?;
        let mut z_q = slm.score_last(&ids)?;
        for _ in 0..options.max_tokens {
            let reference = argmax(&z_p).ok_or(EvalError::NoUsableLogits(run.positions))?;
            run.position(&z_q, &z_p, reference)?;
            if eos.contains(&reference) || llm.len() + 1 >= llm.context_length() {
                break;
            }
            let t = Instant::now();
            z_p = llm.step(reference)?;
            compute.llm += t.elapsed().as_secs_f64();
            let t = Instant::now();
            z_q = slm.step(reference)?;
            compute.slm += t.elapsed().as_secs_f64();
            compute.steps += 1;
        }
    }
    let Evaluation {
        accs,
        sweep_accs,
        positions,
        ..
    } = run;
    let mean_rates = mean_uplink_rates(options);
    let compute_times = compute.mean();
    let n = positions.max(1) as f64;
    let mut results: Vec<SystemResult> = systems
        .iter()
        .zip(&accs)
        .map(|(s, a)| SystemResult {
            name: s.name.clone(),
            description: s.description.clone(),
            kind: s.kind.clone(),
            skip_rate: a.skip / n,
            uplink_bytes_per_token: a.bytes / n,
            uplink_bytes_per_generation: a.bytes / eval.len().max(1) as f64,
            agreement: a.agree / n,
            fidelity: a.fidelity / n,
            llm_loglik: a.loglik / n,
            throughput_tokens_per_s: options
                .snr_db
                .iter()
                .zip(&mean_rates)
                .map(|(snr, rate)| {
                    let t = a.seconds(*rate, &options.channel, compute_times);
                    (snr_key(*snr), if t > 0.0 { n / t } else { 0.0 })
                })
                .collect(),
            speedup_over_hlm: BTreeMap::new(),
        })
        .collect();
    fill_speedups(&mut results);
    Ok(PaperReport {
        prompts: prompts.source.clone(),
        eval_prompts: eval.len(),
        positions,
        options: options.clone(),
        compute: compute_times,
        calibration,
        systems: results,
        measured: Vec::new(),
        measure_options: None,
        sweep: options
            .sweep
            .iter()
            .zip(&sweep_accs)
            .map(|(&threshold, a)| SweepPoint {
                threshold,
                skip_rate: a.skip / n,
                fidelity: a.fidelity / n,
                agreement: a.agree / n,
            })
            .collect(),
    })
}

/// The threshold a device shipped with `calibration` starts from under the SDK's default policy
/// ([`PolicyConfig::default`]'s mode: a bound on the share of outputs that differ from the
/// LLM's, certified with confidence from the calibration), so that the harness's uhlm is the
/// uhlm users run: a small calibration certifies little and sends more. Without a calibration
/// (no fit in a tiny run) nothing is skipped, the safe choice.
pub fn sdk_threshold(calibration: Option<&Calibration>) -> f32 {
    calibration.map_or(0.0, |c| c.threshold(&PolicyConfig::default().mode))
}

/// Mean Shannon rate of the fading uplink at each SNR (ergodic rate over seeded draws).
fn mean_uplink_rates(options: &PaperOptions) -> Vec<f64> {
    options
        .snr_db
        .iter()
        .map(|&snr_db| {
            let config = ChannelConfig {
                snr_db,
                ..options.channel.clone()
            };
            let mut channel = Channel::new(config.clone(), options.seed);
            const DRAWS: usize = 20_000;
            (0..DRAWS)
                .map(|_| config.uplink_rate_bps(channel.draw_gain()))
                .sum::<f64>()
                / DRAWS as f64
        })
        .collect()
}

#[derive(Default)]
struct TimeAcc {
    slm: f64,
    llm: f64,
    steps: usize,
}

impl TimeAcc {
    fn mean(&self) -> ComputeTimes {
        let n = self.steps.max(1) as f64;
        ComputeTimes {
            slm_step_s: self.slm / n,
            llm_step_s: self.llm / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uhlm_core::threshold::{DEFAULT_CONFIDENCE, DEFAULT_MAX_OUTPUT_RISK, Sample};

    /// `outputs` generations of 16 tokens whose rejection chance grows with `u`, as on a real
    /// pair: confident tokens are mostly accepted.
    fn calibration(outputs: usize) -> Calibration {
        let outputs: Vec<Vec<Sample>> = (0..outputs)
            .map(|g| {
                (0..16)
                    .map(|t| {
                        let u = ((g * 16 + t) * 37 % 100) as f32 / 100.0;
                        Sample { u, beta: u * u }
                    })
                    .collect()
            })
            .collect();
        let samples: Vec<Sample> = outputs.iter().flatten().copied().collect();
        Calibration::from_samples(UncertaintyKind::default(), &samples, 0.1)
            .unwrap()
            .with_output_quality(&outputs, DEFAULT_MAX_OUTPUT_RISK, DEFAULT_CONFIDENCE)
            .unwrap()
    }

    /// The harness's uhlm skips by the SDK's default policy, not by the target-risk point
    /// estimate: on a small calibration the bound certifies less, and the harness sends more.
    #[test]
    fn uhlm_runs_the_sdks_default_threshold_policy() {
        for outputs in [4, 16, 400] {
            let c = calibration(outputs);
            let sdk = sdk_threshold(Some(&c));
            assert_eq!(sdk, c.output_quality.unwrap().controlled.u_th, "{outputs}");
            assert!(sdk <= c.target_risk, "{outputs}: {sdk} > {}", c.target_risk);
        }
        let small = calibration(4);
        assert!(small.target_risk > 0.2, "{}", small.target_risk);
        assert!(
            sdk_threshold(Some(&small)) < small.target_risk / 2.0,
            "a small calibration certifies little: {} against the point estimate's {}",
            sdk_threshold(Some(&small)),
            small.target_risk
        );
        assert_eq!(sdk_threshold(None), 0.0);
    }
}
