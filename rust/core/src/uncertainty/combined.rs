//! A device-side predictor of the LLM's rejection that combines several uncertainty signals of
//! the same forward pass: logistic regression on their logarithms,
//! `r = σ(bias + Σ_i w_i · ln(u_i + FLOOR))`.
//!
//! Each signal ranks drafts well on its own; they disagree mostly among confident tokens, where
//! the skip decision is made, and the logarithm spreads exactly that region. The fit is plain
//! Newton–Raphson (iteratively reweighted least squares) with a small ridge penalty: a handful
//! of features, a few thousand samples, milliseconds. Sample weights let a refit use the
//! policy's importance weights (probes stand for the skipped tokens).

use serde::{Deserialize, Serialize};

/// Added to every signal before the logarithm, so that `u = 0` stays finite.
const FLOOR: f64 = 1e-4;
/// Ridge penalty on the weights (not the bias), in units of the summed sample weight.
const RIDGE: f64 = 1e-5;

/// Fitted weights of [`LogisticCombiner::score`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogisticCombiner {
    pub weights: Vec<f64>,
    pub bias: f64,
}

impl LogisticCombiner {
    /// The predicted rejection probability for one token's signals (same order as the fit).
    pub fn score(&self, signals: &[f32]) -> f32 {
        let z = self.bias
            + self
                .weights
                .iter()
                .zip(signals)
                .map(|(w, &u)| w * feature(u))
                .sum::<f64>();
        sigmoid(z) as f32
    }

    /// Fits the combiner to `signals` (one row per token) and soft labels `beta` in `[0, 1]`,
    /// each row weighted by `weight` (all 1 when `None`). `None` when there are no rows, the
    /// rows have different lengths, or a value is not finite.
    pub fn fit(signals: &[Vec<f32>], beta: &[f32], weight: Option<&[f64]>) -> Option<Self> {
        let d = signals.first()?.len();
        if signals.len() != beta.len()
            || weight.is_some_and(|w| w.len() != beta.len())
            || signals.iter().any(|r| r.len() != d)
        {
            return None;
        }
        let rows: Vec<Vec<f64>> = signals
            .iter()
            .map(|r| {
                std::iter::once(1.0)
                    .chain(r.iter().map(|&u| feature(u)))
                    .collect()
            })
            .collect();
        if rows.iter().flatten().any(|x| !x.is_finite()) || beta.iter().any(|b| !b.is_finite()) {
            return None;
        }
        let w_of = |i: usize| weight.map_or(1.0, |w| w[i]);
        let total: f64 = (0..rows.len()).map(w_of).sum();
        if total <= 0.0 {
            return None;
        }
        // Start from the base rate, every weight 0.
        let base = (0..rows.len())
            .map(|i| w_of(i) * beta[i].clamp(0.0, 1.0) as f64)
            .sum::<f64>()
            / total;
        let base = base.clamp(1e-6, 1.0 - 1e-6);
        let mut theta = vec![0.0; d + 1];
        theta[0] = (base / (1.0 - base)).ln();
        let ridge = RIDGE * total;
        // The weighted negative log-likelihood plus the ridge term.
        let loss = |theta: &[f64]| -> f64 {
            let nll: f64 = rows
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let z = dot(theta, x);
                    let y = beta[i].clamp(0.0, 1.0) as f64;
                    // log(1 + e^z) − y·z, stable for large |z|.
                    w_of(i) * (z.max(0.0) + (-z.abs()).exp().ln_1p() - y * z)
                })
                .sum();
            nll + 0.5 * ridge * theta[1..].iter().map(|t| t * t).sum::<f64>()
        };
        for _ in 0..50 {
            // Gradient and Hessian of the weighted negative log-likelihood plus the ridge.
            let mut grad = vec![0.0; d + 1];
            let mut hess = vec![vec![0.0; d + 1]; d + 1];
            for (i, x) in rows.iter().enumerate() {
                let p = sigmoid(dot(&theta, x));
                let w = w_of(i);
                let r = p - beta[i].clamp(0.0, 1.0) as f64;
                let s = (p * (1.0 - p)).max(1e-12);
                for ((g, row), &xa) in grad.iter_mut().zip(hess.iter_mut()).zip(x) {
                    *g += w * r * xa;
                    for (h, &xb) in row.iter_mut().zip(x) {
                        *h += w * s * xa * xb;
                    }
                }
            }
            for (a, (g, row)) in grad.iter_mut().zip(hess.iter_mut()).enumerate().skip(1) {
                *g += ridge * theta[a];
                row[a] += ridge;
            }
            let step = solve(hess, grad)?;
            // Damped: halve the step until the penalised likelihood improves (a full Newton
            // step can overshoot on nearly separable data).
            let before = loss(&theta);
            let mut scale = 1.0;
            let next = loop {
                let next: Vec<f64> = theta
                    .iter()
                    .zip(&step)
                    .map(|(t, s)| t - scale * s)
                    .collect();
                if loss(&next) <= before || scale < 1e-6 {
                    break next;
                }
                scale *= 0.5;
            };
            let largest = theta
                .iter()
                .zip(&next)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            theta = next;
            if largest < 1e-9 {
                break;
            }
        }
        theta.iter().all(|t| t.is_finite()).then(|| Self {
            bias: theta[0],
            weights: theta[1..].to_vec(),
        })
    }
}

fn feature(u: f32) -> f64 {
    (u.clamp(0.0, 1.0) as f64 + FLOOR).ln()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `a · x = b` by Gaussian elimination with partial pivoting; `None` when singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (above, below) = a.split_at_mut(col + 1);
        let pivot_row = &above[col];
        for (offset, row) in below.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn recovers_a_known_logistic_model() {
        // Labels drawn from σ(-1 + 2·ln(u1 + ε) - 0.5·ln(u2 + ε)).
        let truth = LogisticCombiner {
            weights: vec![2.0, -0.5],
            bias: -1.0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let signals: Vec<Vec<f32>> = (0..40_000)
            .map(|_| vec![rng.random::<f32>(), rng.random::<f32>()])
            .collect();
        let beta: Vec<f32> = signals
            .iter()
            .map(|s| (rng.random::<f32>() < truth.score(s)) as u8 as f32)
            .collect();
        let fit = LogisticCombiner::fit(&signals, &beta, None).unwrap();
        assert!((fit.bias + 1.0).abs() < 0.15, "{fit:?}");
        assert!((fit.weights[0] - 2.0).abs() < 0.1, "{fit:?}");
        assert!((fit.weights[1] + 0.5).abs() < 0.1, "{fit:?}");
    }

    #[test]
    fn a_useless_signal_gets_little_weight_and_bad_input_none() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let signals: Vec<Vec<f32>> = (0..5000)
            .map(|_| vec![rng.random::<f32>(), rng.random::<f32>()])
            .collect();
        let beta: Vec<f32> = signals.iter().map(|s| (s[0] > 0.8) as u8 as f32).collect();
        let fit = LogisticCombiner::fit(&signals, &beta, None).unwrap();
        assert!(fit.weights[0] > 5.0 * fit.weights[1].abs(), "{fit:?}");
        assert!(fit.score(&[0.95, 0.5]) > 0.5 && fit.score(&[0.1, 0.5]) < 0.1);
        assert!(LogisticCombiner::fit(&[], &[], None).is_none());
        assert!(LogisticCombiner::fit(&[vec![0.1], vec![0.1, 0.2]], &[0.0, 1.0], None).is_none());
        assert!(LogisticCombiner::fit(&[vec![f32::NAN]], &[0.0], None).is_none());
    }
}
