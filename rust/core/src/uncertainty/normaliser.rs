//! `Z(θ) = Σ_x e^(s_x/θ)` over the vocabulary for many temperatures from one pass over it.
//!
//! The temperature estimators need the softmax normaliser at 32 quadrature nodes (or `K` random
//! temperatures). Summed directly that is 32 `exp`s per vocabulary entry, more time than the
//! SLM's forward pass at 151,936 tokens. Most entries lie far below the maximum, where
//! `e^(s/θ)` is smooth in `s`: they are binned by shifted logit (bins [`BIN_WIDTH`] wide), and
//! each bin keeps its count and the first two moments of its entries about its centre `c`, so
//! that one `exp` per bin and temperature gives the bin's sum to second order:
//! `Σ e^(s/θ) = e^(c/θ) Σ e^(δ/θ) ≈ e^(c/θ) (n + Σδ/θ + Σδ²/2θ²)`. Entries within [`HEAD_NATS`]
//! of the maximum, which carry most of the mass at low temperatures, are summed exactly.
//!
//! The Taylor remainder of each entry is at most `|δ/θ|³/6 · e^|δ/θ|` of its term (`|δ|` is at
//! most half a bin), so the error of the tail is bounded by that factor times the tail's upper
//! bound; where the bound exceeds [`MAX_RELATIVE_ERROR`] of `Z`, that temperature is summed
//! directly over the vocabulary instead. Every `Z(θ)` returned is therefore within
//! `MAX_RELATIVE_ERROR` of the exact sum (up to f32 rounding), and so is every probability
//! `e^(s_d/θ)/Z(θ)` computed from it.

use crate::fast_exp;

/// Logits more than this many nats (at the largest temperature) below the maximum contribute
/// less than `exp(-88)` of the mass and are skipped (they underflow f32 anyway).
const NEGLIGIBLE_NATS: f32 = 88.0;
/// Entries this many nats or less below the maximum are summed exactly.
const HEAD_NATS: f32 = 10.0;
/// Width of a tail bin, in nats.
const BIN_WIDTH: f32 = 0.125;
/// The largest relative error of `Z(θ)` the binned sum may have; beyond it, sum directly.
pub(crate) const MAX_RELATIVE_ERROR: f64 = 1e-5;

/// Copies of each bin filled in turn (merged into the first after the pass).
const COPIES: usize = 4;
const HEAD: u32 = u32::MAX;
const SKIPPED: u32 = u32::MAX - 1;

#[derive(Clone, Copy, Default)]
struct Bin {
    count: f64,
    /// `Σ δ` and `Σ δ²`, `δ` the entry's offset from the bin's centre.
    first: f64,
    second: f64,
}

/// The binned summary of one position's logits.
#[derive(Default)]
pub(crate) struct TemperatureNormaliser {
    /// Shifted logits (maximum 0) of the head, summed exactly.
    head: Vec<f32>,
    bins: Vec<Bin>,
    /// Indices of the non-empty bins, so a temperature costs one `exp` per used bin.
    used: Vec<u32>,
    /// Per entry: its bin, [`HEAD`] or [`SKIPPED`].
    index: Vec<u32>,
    max: f32,
    cutoff: f32,
    /// How many temperatures fell back to the direct sum (for tests and profiling).
    pub(crate) direct_sums: u64,
}

impl TemperatureNormaliser {
    /// Summarises `logits` for temperatures up to `theta_max`: entries more than
    /// [`NEGLIGIBLE_NATS`]` · theta_max` below the maximum are dropped (they underflow at every
    /// temperature). Returns the maximum, or `None` when no logit is finite.
    pub fn build(&mut self, logits: &[f32], theta_max: f32) -> Option<f32> {
        let max = crate::sampling::max_finite(logits)?;
        self.max = max;
        self.cutoff = -NEGLIGIBLE_NATS * theta_max;
        let bins = ((-self.cutoff - HEAD_NATS).max(0.0) / BIN_WIDTH).ceil() as usize + 1;
        // First a pass that only classifies (it vectorises): the bin of each entry, or a mark
        // for the head and for entries left out.
        let (cutoff, inv_width, last) = (self.cutoff, 1.0 / BIN_WIDTH, (bins - 1) as f32);
        self.index.clear();
        self.index.extend(logits.iter().map(|&z| {
            let s = z - max;
            if !kept(s, cutoff) {
                SKIPPED
            } else if s > -HEAD_NATS {
                HEAD
            } else {
                ((-HEAD_NATS - s) * inv_width).min(last) as u32
            }
        }));
        // Then the scatter, into 4 interleaved copies of the bins so that consecutive entries
        // of one bin do not wait on each other's additions.
        self.bins.clear();
        self.bins.resize(COPIES * bins, Bin::default());
        self.head.clear();
        for (i, (&b, &z)) in self.index.iter().zip(logits).enumerate() {
            match b {
                SKIPPED => {}
                HEAD => self.head.push(z - max),
                b => {
                    let delta = (z - max - centre(b as usize)) as f64;
                    let bin = &mut self.bins[b as usize * COPIES + (i % COPIES)];
                    bin.count += 1.0;
                    bin.first += delta;
                    bin.second += delta * delta;
                }
            }
        }
        self.used.clear();
        for b in 0..bins {
            let copies = &self.bins[b * COPIES..(b + 1) * COPIES];
            let merged = copies.iter().fold(Bin::default(), |a, c| Bin {
                count: a.count + c.count,
                first: a.first + c.first,
                second: a.second + c.second,
            });
            if merged.count > 0.0 {
                self.bins[b * COPIES] = merged;
                self.used.push(b as u32);
            }
        }
        Some(max)
    }

    /// `Z(θ)`, within [`MAX_RELATIVE_ERROR`]. `logits` must be the ones given to `build`.
    pub fn normaliser(&mut self, logits: &[f32], theta: f32) -> f64 {
        let inv = 1.0 / theta as f64;
        let head = fast_exp::sum_exp_scaled(&self.head, 1.0 / theta);
        let (mut tail, mut tail_upper) = (0.0f64, 0.0f64);
        for &b in &self.used {
            let bin = self.bins[b as usize * COPIES];
            let e = (centre(b as usize) as f64 * inv).exp();
            tail += e * (bin.count + inv * (bin.first + 0.5 * inv * bin.second));
            tail_upper += e * bin.count;
        }
        let x = 0.5 * BIN_WIDTH as f64 * inv;
        let growth = x.exp();
        // Each entry's term is at most e^(c/θ)·e^x, its Taylor remainder at most x³/6·e^x of it.
        let error = tail_upper * growth * x.powi(3) / 6.0 * growth;
        let z = head + tail;
        if error <= MAX_RELATIVE_ERROR * (z - error) {
            return z;
        }
        self.direct_sums += 1;
        let (max, cutoff, scale) = (self.max, self.cutoff, 1.0 / theta);
        fast_exp::sum_by(logits, |z| {
            let s = z - max;
            if kept(s, cutoff) {
                fast_exp::exp(s * scale)
            } else {
                0.0
            }
        })
    }

    /// The shifted logit of `draft` (after [`build`](Self::build)), or `None` if it is
    /// negligible, not finite or out of the vocabulary: such a draft has probability 0 at every
    /// temperature.
    pub fn shift(&self, logits: &[f32], draft: u32) -> Option<f32> {
        logits
            .get(draft as usize)
            .map(|&z| z - self.max)
            .filter(|&s| kept(s, self.cutoff))
    }
}

/// Whether a shifted logit counts: above the cutoff and at most the maximum. Also drops NaN
/// and -inf (and +inf, which the maximum ignored).
fn kept(s: f32, cutoff: f32) -> bool {
    s > cutoff && s <= 0.0
}

/// The shifted logit at the centre of tail bin `b`.
fn centre(b: usize) -> f32 {
    -HEAD_NATS - (b as f32 + 0.5) * BIN_WIDTH
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn exact(logits: &[f32], theta: f32, cutoff: f32) -> f64 {
        let max = logits
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        logits
            .iter()
            .map(|&z| (z - max) as f64)
            .filter(|&s| s > cutoff as f64 && s <= 0.0)
            .map(|s| (s / theta as f64).exp())
            .sum()
    }

    /// Language-model-like logits: a few strong candidates over a wide, roughly normal tail.
    fn lm_logits(rng: &mut ChaCha8Rng, vocab: usize, spread: f32, top: f32) -> Vec<f32> {
        (0..vocab)
            .map(|i| {
                let g: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
                if i % 5000 == 7 {
                    top + rng.random::<f32>() * 5.0
                } else {
                    g * spread
                }
            })
            .collect()
    }

    #[test]
    fn binned_sum_is_within_the_stated_error_at_every_temperature() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut n = TemperatureNormaliser::default();
        for spread in [0.5, 3.0, 8.0, 20.0] {
            let logits = lm_logits(&mut rng, 151_936, spread, 10.0);
            n.build(&logits, 2.0).unwrap();
            for i in 0..40 {
                let theta = 0.05 + 1.95 * i as f32 / 39.0;
                let want = exact(&logits, theta, -176.0);
                let got = n.normaliser(&logits, theta);
                let rel = ((got - want) / want).abs();
                assert!(
                    rel < MAX_RELATIVE_ERROR + 1e-6,
                    "spread {spread}, theta {theta}: {got} vs {want} ({rel})"
                );
            }
        }
    }

    #[test]
    fn a_wide_tail_is_mostly_binned() {
        // A confident position: a few candidates some 20 nats above the bulk.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let logits = lm_logits(&mut rng, 151_936, 3.0, 20.0);
        let mut n = TemperatureNormaliser::default();
        n.build(&logits, 2.0).unwrap();
        assert!(n.head.len() < 2_000, "head {}", n.head.len());
        for i in 0..32 {
            n.normaliser(&logits, 0.05 + i as f32 * 0.06);
        }
        assert!(n.direct_sums <= 4, "{} direct sums", n.direct_sums);
    }

    #[test]
    fn no_finite_logit_gives_none() {
        let mut n = TemperatureNormaliser::default();
        assert!(n.build(&[f32::NAN, f32::NEG_INFINITY], 2.0).is_none());
    }
}
