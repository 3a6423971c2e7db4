//! Judging the uncertainty signals on the labelled calibration tokens: AUROC as a predictor of
//! a greedy mismatch, and the skip rate each certifies per output, alone or combined.

use serde::{Deserialize, Serialize};
use uhlm_core::threshold::Sample as CalibrationSample;
use uhlm_core::uncertainty::combined::LogisticCombiner;

use crate::EvalError;
use crate::calibrate::CalibrationRun;

/// One uncertainty signal judged on labelled calibration tokens.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignalScore {
    pub estimator: String,
    /// Probability that a token the LLM decides otherwise has a higher `u` than one it agrees
    /// with (ties count half): 0.5 is no signal, 1 a perfect one.
    pub auroc: f64,
    /// Share of tokens skipped by the per-output risk-controlled threshold, at each `max_risk`.
    pub skip_at_risk: Vec<SkipAtRisk>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SkipAtRisk {
    pub max_risk: f64,
    pub u_th: f32,
    pub skip_rate: f64,
    pub empirical_risk: f64,
}

/// Scores every estimator of the calibration runs (pooled) at the given risk levels.
pub fn signal_scores(
    runs: &[CalibrationRun],
    max_risks: &[f64],
    confidence: f64,
) -> Result<Vec<SignalScore>, EvalError> {
    let Some(first) = runs.first() else {
        return Ok(Vec::new());
    };
    let mut scores = Vec::new();
    for (i, kind) in first.options.estimators.iter().enumerate() {
        let outputs: Vec<Vec<CalibrationSample>> =
            runs.iter().flat_map(|r| r.outputs_of(i)).collect();
        let samples: Vec<CalibrationSample> = outputs.iter().flatten().copied().collect();
        scores.push(SignalScore {
            estimator: kind.build().name().to_string(),
            auroc: auroc(&samples),
            skip_at_risk: skip_at_risks(&outputs, max_risks, confidence)?,
        });
    }
    if let Some(outputs) = combined_out_of_fold(runs) {
        let samples: Vec<CalibrationSample> = outputs.iter().flatten().copied().collect();
        scores.push(SignalScore {
            estimator: COMBINED.into(),
            auroc: auroc(&samples),
            skip_at_risk: skip_at_risks(&outputs, max_risks, confidence)?,
        });
    }
    Ok(scores)
}

/// The per-output risk-controlled threshold of `outputs` at each of `max_risks`.
fn skip_at_risks(
    outputs: &[Vec<CalibrationSample>],
    max_risks: &[f64],
    confidence: f64,
) -> Result<Vec<SkipAtRisk>, EvalError> {
    max_risks
        .iter()
        .map(|&max_risk| {
            let c = uhlm_core::risk_control::controlled_threshold_per_output(
                outputs,
                max_risk,
                1.0 - confidence,
            )?;
            Ok(SkipAtRisk {
                max_risk,
                u_th: c.u_th,
                skip_rate: c.skip_rate,
                empirical_risk: c.empirical_risk,
            })
        })
        .collect()
}

/// Name of the combined predictor's row in the signal table.
pub const COMBINED: &str = "combined (logistic, cross-fitted)";

/// Every calibration output scored by a [`LogisticCombiner`] fitted without it: outputs are
/// split into 4 folds by index, and each fold is scored by the fit on the other three, so the
/// table judges the predictor on tokens it has not seen, as the single signals are.
fn combined_out_of_fold(runs: &[CalibrationRun]) -> Option<Vec<Vec<CalibrationSample>>> {
    const FOLDS: usize = 4;
    let outputs = CalibrationRun::combinable_outputs(runs)?;
    let mut scored: Vec<Vec<CalibrationSample>> = vec![Vec::new(); outputs.len()];
    for fold in 0..FOLDS {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (o, tokens) in outputs.iter().enumerate() {
            if o % FOLDS != fold {
                for (signals, beta) in tokens {
                    x.push(signals.clone());
                    y.push(*beta);
                }
            }
        }
        let model = LogisticCombiner::fit(&x, &y, None)?;
        for (o, tokens) in outputs.iter().enumerate() {
            if o % FOLDS == fold {
                scored[o] = tokens
                    .iter()
                    .map(|(signals, beta)| CalibrationSample {
                        u: model.score(signals),
                        beta: *beta,
                    })
                    .collect();
            }
        }
    }
    Some(scored)
}

/// Area under the ROC curve of `u` as a predictor of `beta > 0.5` (a greedy mismatch).
fn auroc(samples: &[CalibrationSample]) -> f64 {
    let mut sorted: Vec<(f32, bool)> = samples.iter().map(|s| (s.u, s.beta > 0.5)).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = sorted.iter().filter(|s| s.1).count() as f64;
    let negatives = sorted.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return f64::NAN;
    }
    // Mann–Whitney U over tied groups: each positive beats the negatives below it and ties half.
    let (mut below, mut wins, mut i) = (0.0f64, 0.0f64, 0);
    while i < sorted.len() {
        let j = i + sorted[i..]
            .iter()
            .take_while(|s| s.0 == sorted[i].0)
            .count();
        let pos = sorted[i..j].iter().filter(|s| s.1).count() as f64;
        let neg = (j - i) as f64 - pos;
        wins += pos * (below + 0.5 * neg);
        below += neg;
        i = j;
    }
    wins / (positives * negatives)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_scored_per_output_and_the_combined_predictor_out_of_fold() {
        use crate::test_support::synthetic_run;
        let runs = [synthetic_run(1), synthetic_run(2)];
        let scores = signal_scores(&runs, &[0.05, 0.1, 0.2], 0.9).unwrap();
        assert_eq!(scores.len(), 6, "five signals and the combined predictor");
        let combined = scores.last().unwrap();
        assert_eq!(combined.estimator, COMBINED);
        for s in &scores {
            assert!(
                s.auroc > 0.8 && s.auroc <= 1.0,
                "{}: {}",
                s.estimator,
                s.auroc
            );
            // Looser targets skip at least as much; what is skipped meets the target.
            for w in s.skip_at_risk.windows(2) {
                assert!(w[1].skip_rate >= w[0].skip_rate, "{s:?}");
            }
            for r in &s.skip_at_risk {
                assert!(r.empirical_risk <= r.max_risk, "{s:?}");
            }
            assert!(s.skip_at_risk[2].skip_rate > 0.5, "{s:?}");
        }
        // Every token of both runs is scored exactly once, by a fit that did not see it.
        let outputs = combined_out_of_fold(&runs).unwrap();
        assert_eq!(outputs.len(), 160);
        assert!(outputs.iter().all(|o| o.len() == 50));
    }

    #[test]
    fn auroc_counts_pairs_and_ties() {
        let s = |u: f32, miss: bool| CalibrationSample {
            u,
            beta: if miss { 1.0 } else { 0.0 },
        };
        assert_eq!(auroc(&[s(0.1, false), s(0.9, true)]), 1.0);
        assert_eq!(auroc(&[s(0.9, false), s(0.1, true)]), 0.0);
        assert_eq!(auroc(&[s(0.5, false), s(0.5, true)]), 0.5);
        // 2 positives x 2 negatives: (0.7 beats 0.2 and 0.4) + (0.3 beats 0.2) = 3 of 4.
        let v = [s(0.2, false), s(0.3, true), s(0.4, false), s(0.7, true)];
        assert_eq!(auroc(&v), 0.75);
        assert!(auroc(&[s(0.1, false)]).is_nan());
    }
}
