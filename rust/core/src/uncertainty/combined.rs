//! A device-side predictor of the LLM's rejection that combines several uncertainty signals of
//! the same forward pass: logistic regression on their logarithms,
//! `r = σ(bias + Σ_i w_i · ln(u_i + FLOOR))`.
//!
//! Each signal ranks drafts well on its own; they disagree mostly among confident tokens, where
//! the skip decision is made, and the logarithm spreads exactly that region. The fit is plain
//! Newton–Raphson (iteratively reweighted least squares) with a small ridge penalty: a handful
//! of features, a few thousand samples, milliseconds. Sample weights let a refit use the
//! policy's importance weights (probes stand for the skipped tokens).
//!
//! Online, [`refit_at_equal_skip`] proposes weights fitted on half of the policy's window of
//! verdicts and adopts them only if, on the other half, they skip the same share of tokens at
//! no more risk and predict rejections better: a refit re-ranks tokens, and never buys more
//! skipping with quality that a calibration did not certify.

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

/// One verdict in the policy's window: the signals of the token, its rejection probability and
/// its weight (importance × forgetting).
#[derive(Clone, Copy, Debug)]
pub struct Verdict<'a> {
    pub signals: &'a [f32],
    pub beta: f32,
    pub weight: f64,
}

/// New weights for `current` and the threshold that keeps the skip share, or `None` to keep
/// `current` with `u_th`.
///
/// The window is split by alternate entries. The candidate is fitted on one half; on the
/// other it must (a) skip no more risk, `Σ w·β·1{skipped}`, than `current` at `u_th` once its
/// threshold is set to skip the same weighted share, and (b) have a lower weighted log-loss.
/// Judging on verdicts the fit has not seen keeps the comparison honest. The returned
/// threshold skips, over the whole window, the share that `current` skips at `u_th`.
pub fn refit_at_equal_skip(
    current: &LogisticCombiner,
    u_th: f32,
    window: &[Verdict<'_>],
) -> Option<(LogisticCombiner, f32)> {
    let d = current.weights.len();
    if window.len() < 4 || window.iter().any(|v| v.signals.len() != d) {
        return None;
    }
    let (fit_half, test_half): (Vec<_>, Vec<_>) =
        window.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let x: Vec<Vec<f32>> = fit_half.iter().map(|(_, v)| v.signals.to_vec()).collect();
    let y: Vec<f32> = fit_half.iter().map(|(_, v)| v.beta).collect();
    let w: Vec<f64> = fit_half.iter().map(|(_, v)| v.weight).collect();
    let candidate = LogisticCombiner::fit(&x, &y, Some(&w))?;
    let test: Vec<Verdict<'_>> = test_half.into_iter().map(|(_, v)| *v).collect();
    let held_out_th = equal_skip_threshold(current, u_th, &candidate, &test);
    let skipped_risk = |c: &LogisticCombiner, th: f32| -> f64 {
        test.iter()
            .filter(|v| c.score(v.signals) < th)
            .map(|v| v.weight * v.beta.clamp(0.0, 1.0) as f64)
            .sum()
    };
    let no_riskier = skipped_risk(&candidate, held_out_th) <= skipped_risk(current, u_th);
    let better = log_loss(&candidate, &test) < log_loss(current, &test);
    (no_riskier && better).then(|| {
        let th = equal_skip_threshold(current, u_th, &candidate, window);
        (candidate, th)
    })
}

/// The threshold under which `next` skips, over `verdicts`, at most the weighted share that
/// `current` skips at `u_th` (the largest such, between distinct scores).
fn equal_skip_threshold(
    current: &LogisticCombiner,
    u_th: f32,
    next: &LogisticCombiner,
    verdicts: &[Verdict<'_>],
) -> f32 {
    let budget: f64 = verdicts
        .iter()
        .filter(|v| current.score(v.signals) < u_th)
        .map(|v| v.weight)
        .sum();
    let mut scored: Vec<(f32, f64)> = verdicts
        .iter()
        .map(|v| (next.score(v.signals), v.weight))
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut taken = 0.0;
    let mut i = 0;
    while i < scored.len() {
        // Tokens of equal score are skipped together or not at all.
        let j = i + scored[i..]
            .iter()
            .take_while(|s| s.0 == scored[i].0)
            .count();
        let group: f64 = scored[i..j].iter().map(|s| s.1).sum();
        if taken + group > budget * (1.0 + 1e-12) {
            return scored[i].0;
        }
        taken += group;
        i = j;
    }
    // Everything fits: skip every score the combiner can give (scores are at most 1).
    1.0f32.next_up()
}

/// Weighted mean negative log-likelihood of `beta` under `c`.
fn log_loss(c: &LogisticCombiner, verdicts: &[Verdict<'_>]) -> f64 {
    let (mut loss, mut total) = (0.0, 0.0);
    for v in verdicts {
        let p = (c.score(v.signals) as f64).clamp(1e-9, 1.0 - 1e-9);
        let y = v.beta.clamp(0.0, 1.0) as f64;
        loss -= v.weight * (y * p.ln() + (1.0 - y) * (1.0 - p).ln());
        total += v.weight;
    }
    if total > 0.0 { loss / total } else { 0.0 }
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

    /// Two signals: the first predicts rejection, the second is noise.
    fn stream(n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let signals: Vec<Vec<f32>> = (0..n)
            .map(|_| vec![rng.random::<f32>(), rng.random::<f32>()])
            .collect();
        let beta = signals
            .iter()
            .map(|s| (rng.random::<f32>() < s[0] * s[0]) as u8 as f32)
            .collect();
        (signals, beta)
    }

    fn verdicts<'a>(signals: &'a [Vec<f32>], beta: &[f32]) -> Vec<Verdict<'a>> {
        signals
            .iter()
            .zip(beta)
            .map(|(s, &b)| Verdict {
                signals: s,
                beta: b,
                weight: 1.0,
            })
            .collect()
    }

    #[test]
    fn an_online_refit_reranks_at_the_same_skip_share_with_less_risk() {
        let (signals, beta) = stream(2000, 8);
        let window = verdicts(&signals, &beta);
        // Weights on the noise signal only: its ranking is random.
        let current = LogisticCombiner {
            weights: vec![0.0, 1.0],
            bias: 0.0,
        };
        let u_th = current.score(&[0.0, 0.3]);
        let (next, th) = refit_at_equal_skip(&current, u_th, &window).expect("adopted");
        assert!(next.weights[0] > 5.0 * next.weights[1].abs(), "{next:?}");
        let skipped = |c: &LogisticCombiner, t: f32| {
            let skip: Vec<usize> = (0..signals.len())
                .filter(|&i| c.score(&signals[i]) < t)
                .collect();
            let risk = skip.iter().map(|&i| beta[i] as f64).sum::<f64>();
            (skip.len(), risk)
        };
        let (n_before, risk_before) = skipped(&current, u_th);
        let (n_after, risk_after) = skipped(&next, th);
        assert!(
            n_after <= n_before && n_after + 2 >= n_before,
            "{n_after} vs {n_before}"
        );
        assert!(
            risk_after < 0.5 * risk_before,
            "{risk_after} vs {risk_before}"
        );
        // The refit from there keeps what it has (or improves it marginally): never riskier.
        if let Some((again, th2)) = refit_at_equal_skip(&next, th, &window) {
            let (n2, risk2) = skipped(&again, th2);
            assert!(n2 <= n_after && risk2 <= risk_after + 2.0, "{n2} {risk2}");
        }
    }

    #[test]
    fn a_refit_needs_matching_signals() {
        let (signals, beta) = stream(100, 9);
        let window = verdicts(&signals, &beta);
        let three = LogisticCombiner {
            weights: vec![1.0, 0.0, 0.0],
            bias: 0.0,
        };
        assert!(refit_at_equal_skip(&three, 0.5, &window).is_none());
        let two = LogisticCombiner {
            weights: vec![1.0, 0.0],
            bias: 0.0,
        };
        assert!(refit_at_equal_skip(&two, 0.5, &window[..3]).is_none());
    }
}
