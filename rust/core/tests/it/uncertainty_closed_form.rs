//! The closed-form (quadrature) uncertainty is the expectation of the paper's Monte-Carlo
//! estimator: over many samples the two agree.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uhlm_core::uncertainty::{ExpectedTemperature, TemperaturePerturbation, UncertaintyEstimator};

/// Logits shaped like a real LM head over 49,152 tokens: a Gaussian bulk and a few leaders.
fn real_shaped_logits(seed: u64, leaders: &[f32]) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut z: Vec<f32> = (0..49_152)
        .map(|_| {
            // Box-Muller normal with sd 2.5.
            let (a, b): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random());
            2.5 * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
        })
        .collect();
    for (i, &l) in leaders.iter().enumerate() {
        z[i * 977] = l;
    }
    z
}

#[test]
fn closed_form_equals_monte_carlo_mean() {
    let cases = [
        (1, vec![18.0, 16.5, 15.0]), // a few close contenders
        (2, vec![25.0, 14.0]),       // confident
        (3, vec![12.0, 11.8, 11.5, 11.0]),
    ];
    for (seed, leaders) in cases {
        let logits = real_shaped_logits(seed, &leaders);
        for draft in [0u32, 977, 5] {
            let exact = ExpectedTemperature::new(0.05, 2.0, 8).estimate(&logits, draft);
            let mut mc = TemperaturePerturbation::new(10_000, 0.05, 2.0, seed * 31 + draft as u64);
            let sampled = mc.estimate(&logits, draft);
            assert!(
                (exact - sampled).abs() < 0.01,
                "seed {seed} draft {draft}: closed form {exact}, Monte-Carlo {sampled}"
            );
        }
    }
}
