//! Fixtures the unit tests of several modules share.

use uhlm_core::uncertainty::UncertaintyKind;

use crate::calibrate::{CalibrationOptions, CalibrationRun, Labelled};

/// A synthetic calibration: 80 outputs of 50 tokens; every estimator's `u` is the same
/// noisy function of whether the LLM differs, so each signal (and their combination)
/// ranks the differing tokens well, and the per-output table certifies some skipping.
pub(crate) fn synthetic_run(seed: u64) -> CalibrationRun {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let estimators = UncertaintyKind::all(7);
    let mut samples = Vec::new();
    for prompt in 0..80 {
        for position in 0..50 {
            let differs = rng.random::<f32>() < 0.02;
            let base = if differs { 0.3 } else { 0.0 } + 0.3 * rng.random::<f32>();
            let u = estimators
                .iter()
                .map(|_| (base + 0.05 * rng.random::<f32>()).min(1.0))
                .collect();
            samples.push(Labelled {
                prompt,
                position,
                u,
                beta: differs as u8 as f32,
                tv: 0.0,
                accepted: !differs,
            });
        }
    }
    CalibrationRun {
        prompts: "synthetic".into(),
        options: CalibrationOptions {
            estimators,
            ..Default::default()
        },
        samples,
        fits: Vec::new(),
        mean_acceptance: 0.0,
    }
}
