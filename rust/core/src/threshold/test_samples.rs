//! Synthetic calibration samples on a known line, for the threshold tests.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::sample::Sample;

/// `n` samples with `u` uniform in `[0, 1)` and `beta = a·u + b` plus uniform noise of
/// half-width `noise`.
pub(super) fn synthetic(a: f64, b: f64, n: usize, noise: f64, seed: u64) -> Vec<Sample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u: f64 = rng.random();
            let e: f64 = (rng.random::<f64>() - 0.5) * 2.0 * noise;
            Sample {
                u: u as f32,
                beta: (a * u + b + e) as f32,
            }
        })
        .collect()
}
