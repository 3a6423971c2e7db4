//! Cross-fitting: the folds of evaluated problems, each fold's calibration on problems
//! outside it, the thresholds that calibration gives, and the systems each fold runs.

use serde::{Deserialize, Serialize};
use uhlm_core::uncertainty::UncertaintyKind;
use uhlm_sdk::SamplingOptions;

use super::options::HumanEvalOptions;
use crate::EvalError;
use crate::calibrate::{CalibrationOptions, CalibrationRun, calibrate_with_progress};
use crate::humaneval::{Problem, eval_prompt, stop_strings};
use crate::pair::Pair;
use crate::paper::{SystemKind, SystemSpec, systems};
use crate::prompts::PromptSet;

/// One fold: the problems generated with one set of thresholds, and the problems those
/// thresholds were calibrated on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fold {
    /// Indices into the problem list.
    pub evaluated: Vec<usize>,
    pub calibration: Vec<usize>,
}

/// Splits the evaluated problems into folds whose calibration problems lie outside them.
pub fn folds(problems: usize, options: &HumanEvalOptions) -> Vec<Fold> {
    let n = options.limit.unwrap_or(problems).min(problems);
    let outside = |fold: &[usize]| -> Vec<usize> {
        (0..problems)
            .filter(|i| !fold.contains(i))
            .take(options.calibration_problems)
            .collect()
    };
    let all: Vec<usize> = (0..n).collect();
    if problems - n >= options.calibration_problems || n < 2 {
        return vec![Fold {
            calibration: outside(&all),
            evaluated: all,
        }];
    }
    let (a, b) = all.split_at(n / 2);
    [a, b]
        .into_iter()
        .map(|fold| Fold {
            evaluated: fold.to_vec(),
            calibration: outside(fold),
        })
        .collect()
}

/// Calibrates a fold on its calibration problems, every estimator, at temperature 0.
pub fn calibrate_fold(
    pair: &Pair,
    problems: &[Problem],
    fold: &Fold,
    options: &HumanEvalOptions,
    done: &mut dyn FnMut(usize),
) -> Result<CalibrationRun, EvalError> {
    let set = PromptSet {
        source: format!(
            "HumanEval problems {:?} ({} format)",
            fold.calibration, options.format
        ),
        prompts: fold
            .calibration
            .iter()
            .map(|&i| eval_prompt(&problems[i], options.format))
            .collect(),
    };
    let mut cal = CalibrationOptions {
        estimators: UncertaintyKind::all(options.seed),
        seed: options.seed,
        ..CalibrationOptions::default()
    };
    cal.sampling = SamplingOptions {
        temperature: 0.0,
        max_tokens: options.calibration_tokens,
        stop: stop_strings(options.format),
        ..SamplingOptions::default()
    };
    calibrate_with_progress(pair, &set, &cal, done)
}

/// The thresholds one fold's calibration gives each skipping system.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FoldThresholds {
    /// uhlm's: the largest closed-form threshold whose risk bound meets the quality target.
    pub uhlm: f32,
    /// The share of calibration tokens it skips, and their empirical risk.
    pub uhlm_calibration_skip: f64,
    pub uhlm_calibration_risk: f64,
    /// U-HLM's and CU-HLM's published rule: `-b/a` of the Monte-Carlo estimator's fit.
    pub paper: f32,
    pub calibration_tokens: usize,
}

impl FoldThresholds {
    pub fn from_calibration(
        run: &CalibrationRun,
        options: &HumanEvalOptions,
    ) -> Result<Self, EvalError> {
        let index = |kind: &UncertaintyKind| run.options.estimators.iter().position(|k| k == kind);
        let ours = index(&UncertaintyKind::default())
            .map(|i| run.outputs_of(i))
            .unwrap_or_default();
        let controlled = uhlm_core::risk_control::controlled_threshold_per_output(
            &ours,
            options.max_risk as f64,
            1.0 - options.confidence as f64,
        )?;
        let paper = index(&UncertaintyKind::paper(options.seed))
            .and_then(|i| run.fits[i].calibration.as_ref())
            .map_or(0.0, |c| (c.risk_averse as f32).max(0.0));
        Ok(Self {
            uhlm: controlled.u_th,
            uhlm_calibration_skip: controlled.skip_rate,
            uhlm_calibration_risk: controlled.empirical_risk,
            paper,
            calibration_tokens: ours.iter().map(Vec::len).sum(),
        })
    }
}

/// The systems of one fold: the papers' comparison, then the threshold sweep.
pub fn fold_systems(
    thresholds: &FoldThresholds,
    vocab: usize,
    options: &HumanEvalOptions,
) -> Vec<SystemSpec> {
    let cuhlm_k = ((vocab as f64 * 0.026).round() as u32).max(1);
    let mut all = systems(thresholds.uhlm, thresholds.paper, cuhlm_k);
    for s in &mut all {
        if let SystemKind::Hybrid { recalibrate, .. } = &mut s.kind {
            // The calibrated threshold holds for the whole run: its guarantee is the one
            // measured here, and every problem sees the same policy.
            *recalibrate = false;
        }
        if s.name == "uhlm" {
            s.description = format!(
                "uhlm: closed-form u, u_th = {:.3} (at most {} of outputs differ from the LLM's, confidence {}), exact {} uplink",
                thresholds.uhlm,
                options.max_risk,
                options.confidence,
                uhlm_core::codec::Codec::default()
            );
        }
    }
    if !options.systems.is_empty() {
        all.retain(|s| options.systems.contains(&s.name));
    }
    for &th in &options.sweep {
        all.push(SystemSpec {
            name: sweep_name(th),
            description: format!("uhlm at the fixed closed-form threshold {th}"),
            kind: SystemKind::Hybrid {
                estimator: UncertaintyKind::default(),
                threshold: th,
                codec: uhlm_core::codec::Codec::default(),
                recalibrate: false,
            },
        });
    }
    all
}

fn sweep_name(th: f32) -> String {
    format!("uhlm@{th}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(limit: Option<usize>, calibration: usize) -> HumanEvalOptions {
        HumanEvalOptions {
            limit,
            calibration_problems: calibration,
            ..HumanEvalOptions::default()
        }
    }

    #[test]
    fn a_subset_is_calibrated_on_the_problems_after_it() {
        let f = folds(164, &options(Some(20), 16));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].evaluated, (0..20).collect::<Vec<_>>());
        assert_eq!(f[0].calibration, (20..36).collect::<Vec<_>>());
    }

    #[test]
    fn the_full_set_is_cross_fitted_and_no_fold_sees_its_own_problems() {
        let f = folds(164, &options(None, 16));
        assert_eq!(f.len(), 2);
        let all: Vec<usize> = f.iter().flat_map(|f| f.evaluated.clone()).collect();
        assert_eq!(all, (0..164).collect::<Vec<_>>());
        for fold in &f {
            assert_eq!(fold.calibration.len(), 16);
            assert!(fold.calibration.iter().all(|i| !fold.evaluated.contains(i)));
        }
        assert_eq!(f[1].calibration, (0..16).collect::<Vec<_>>());
    }
}
