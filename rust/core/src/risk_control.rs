//! A skip threshold with a finite-sample guarantee on what skipping costs.
//!
//! What a user can ask for is "how often may the output differ from what the LLM alone would
//! have produced". A skipped token whose draft the LLM would have rejected with probability
//! `beta` changes the output distribution at that token by `beta`, so the risk per generated
//! token of a threshold `λ` is
//!
//! ```text
//! R(λ) = E[ 1{u < λ} · beta ]        over all tokens,
//! ```
//!
//! not the mean `beta` among skipped tokens (which a high skip rate dilutes). `R` is
//! non-decreasing in `λ` and `R(0) = 0` (uncertainties are `>= 0`, so `λ = 0` skips nothing).
//!
//! [`controlled_threshold`] picks `λ̂` from calibration samples so that, with probability at least
//! `1 − δ` over the calibration draw, `R(λ̂) <= α`: Learn-then-Test (Angelopoulos, Bates et al.)
//! with fixed-sequence testing over increasing candidates, each tested with the
//! Hoeffding–Bentkus p-value for a bounded mean (Bates, Angelopoulos et al., "Distribution-free,
//! risk-controlling prediction sets"). Because `R` is monotone, testing from the smallest
//! candidate up and stopping at the first that fails needs no multiplicity correction.
//!
//! [`controlled_threshold_per_output`] does the same for the risk per *output*, `E[min(1, Σ_t
//! 1{u_t < λ}·β_t)]` over whole generations: at greedy decoding exactly the probability that
//! the hybrid's output differs from the LLM's, the target a task score cares about (a few
//! differing tokens can decide a completion), with generations as the independent draws.
//!
//! The guarantee assumes the calibration samples are i.i.d. draws from the distribution the
//! threshold will meet. Small or shifted calibration therefore errs toward sending: with 24
//! samples no threshold above 0 can pass at `α = 0.01` (even zero observed risk only gives a
//! p-value of `0.99^24 ≈ 0.79`).
//!
//! Everything here is a pure function; the binomial CDF is computed in log space here so the
//! core keeps its small dependency list.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sample::Sample;
pub use crate::sample::WeightedSample;

/// Why a controlled threshold could not be computed.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum RiskControlError {
    #[error("max risk alpha = {0} must be in (0, 1)")]
    InvalidAlpha(f64),
    #[error("error rate delta = {0} must be in (0, 1)")]
    InvalidDelta(f64),
    #[error("sample {index} is not finite (u = {u}, beta = {beta})")]
    NonFiniteSample { index: usize, u: f32, beta: f32 },
    #[error("sample {index} has weight {weight}; weights must be finite and >= 0")]
    InvalidWeight { index: usize, weight: f64 },
}

/// The threshold chosen by [`controlled_threshold`] and what the calibration says about it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RiskControlled {
    /// Skip when `u < u_th`; 0 skips nothing.
    pub u_th: f32,
    /// Calibration estimate of `R(u_th)`: (weighted) mean of `1{u < u_th} · beta`.
    pub empirical_risk: f64,
    /// Hoeffding–Bentkus upper confidence bound on `R(u_th)` at the requested `δ`; `<= α`
    /// whenever `u_th > 0`.
    pub risk_bound: f64,
    /// Share of the calibration (weight) with `u < u_th`.
    pub skip_rate: f64,
    /// Number of samples.
    pub n: usize,
    /// Sample size the bound used: `n` unweighted, Kish's `(Σw)²/Σw²` weighted.
    pub n_eff: f64,
}

fn check_levels(alpha: f64, delta: f64) -> Result<(), RiskControlError> {
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(RiskControlError::InvalidAlpha(alpha));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(RiskControlError::InvalidDelta(delta));
    }
    Ok(())
}

/// Smallest sample size at which any threshold above 0 can pass: even with zero observed risk
/// the p-value is `(1 − α)^n` (Hoeffding) and must reach `δ`. Below it the bound always says
/// "send everything", so a window smaller than this carries no evidence either way.
pub fn min_certifying_samples(alpha: f64, delta: f64) -> f64 {
    // Bentkus at zero risk is e·(1−α)^n, never below Hoeffding's (1−α)^n.
    (delta.ln() / (-alpha).ln_1p()).max(0.0)
}

/// `P(Binomial(n, p) <= k)`, summed in log space so large `n` neither underflows nor overflows.
pub fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let ln_q = (-p).ln_1p();
    let odds = p.ln() - ln_q;
    // log P(X = 0), then P(X = j+1)/P(X = j) = (n−j)/(j+1) · p/q.
    let mut term = n as f64 * ln_q;
    let mut acc = term;
    for j in 0..k {
        term += ((n - j) as f64).ln() - ((j + 1) as f64).ln() + odds;
        acc = log_add_exp(acc, term);
    }
    acc.exp().min(1.0)
}

fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `h1(a, b) = a ln(a/b) + (1−a) ln((1−a)/(1−b))`: the Bernoulli KL divergence, with `0 ln 0 = 0`.
fn h1(a: f64, b: f64) -> f64 {
    let term = |x: f64, y: f64| if x > 0.0 { x * (x / y).ln() } else { 0.0 };
    term(a, b) + term(1.0 - a, 1.0 - b)
}

/// Hoeffding–Bentkus p-value for `H0: R > α`, given the mean `risk_hat` of `n` i.i.d. losses in
/// `[0, 1]`. Small values are evidence that the risk is at most `α`; reject `H0` when `<= δ`.
///
/// Hoeffding: `exp(−n·h1(min(r̂, α), α))`; Bentkus: `e·P(Binomial(n, α) <= ⌈n r̂⌉)`; the p-value
/// is the smaller, capped at 1.
pub fn hb_p_value(risk_hat: f64, n: usize, alpha: f64) -> f64 {
    hb_p_value_eff(risk_hat, n as f64, alpha)
}

/// [`hb_p_value`] for a real (effective) sample size: Hoeffding uses it as is, Bentkus its floor,
/// which only makes the p-value larger.
pub(crate) fn hb_p_value_eff(risk_hat: f64, n: f64, alpha: f64) -> f64 {
    if n.is_nan() || n <= 0.0 || risk_hat.is_nan() || risk_hat >= alpha {
        // At r̂ >= α Hoeffding gives exp(0) = 1, and Bentkus e·P(X <= ⌈nα⌉) >= e/2 (the median
        // of a binomial is ⌊nα⌋ or ⌈nα⌉).
        return 1.0;
    }
    let r = risk_hat.max(0.0);
    let hoeffding = (-n * h1(r, alpha)).exp();
    // Snap Kish's n_eff of equal weights (n up to rounding) to n.
    let n_int = (n + 1e-9).floor();
    // ⌈n r̂⌉ with a hair of tolerance, so r̂ = k/n recomputed in floating point stays k.
    let k = (n_int * r - 1e-9).ceil().max(0.0);
    let bentkus = std::f64::consts::E * binomial_cdf(k as u64, n_int as u64, alpha);
    hoeffding.min(bentkus).min(1.0)
}

/// The Hoeffding–Bentkus upper confidence bound: the smallest `α` whose p-value is `<= δ`, so
/// `R <= ucb` with probability at least `1 − δ`. Returns 1 when no `α < 1` qualifies.
pub fn hb_ucb(risk_hat: f64, n: usize, delta: f64) -> f64 {
    hb_ucb_eff(risk_hat, n as f64, delta)
}

fn hb_ucb_eff(risk_hat: f64, n: f64, delta: f64) -> f64 {
    // The p-value is non-increasing in α (both parts are), so bisect.
    let (mut lo, mut hi) = (risk_hat.clamp(0.0, 1.0), 1.0);
    if hb_p_value_eff(risk_hat, n, next_below_one()) > delta {
        return 1.0;
    }
    for _ in 0..64 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if hb_p_value_eff(risk_hat, n, mid) <= delta {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

fn next_below_one() -> f64 {
    1.0 - f64::EPSILON
}

/// p-value for the opposite hypothesis `H0: R <= α` (Hoeffding's KL tail,
/// `exp(−n·h1(max(r̂, α), α))`): small values are evidence that the risk exceeds `α`. The online
/// policy uses it to drop a threshold the window shows to be unsafe before it has enough data to
/// certify a new one.
pub fn excess_p_value(risk_hat: f64, n_eff: f64, alpha: f64) -> f64 {
    if n_eff.is_nan() || n_eff <= 0.0 || risk_hat.is_nan() || risk_hat <= alpha {
        return 1.0;
    }
    (-n_eff * h1(risk_hat.min(1.0), alpha)).exp().min(1.0)
}

/// The largest threshold `λ̂` whose risk per generated token `R(λ̂)` is at most `alpha` with
/// probability at least `1 − delta` over the (i.i.d.) calibration draw.
///
/// Candidates are the midpoints between distinct sorted uncertainties (and one just above the
/// largest, which skips every calibration token), tested in increasing order; the first whose
/// Hoeffding–Bentkus p-value exceeds `delta` stops the sequence. `beta` is clamped to `[0, 1]`
/// (it is a probability; a fitted or noisy value outside only shifts it to the nearest valid
/// loss). Returns `u_th = 0` (skip nothing) when no candidate passes, including for no samples.
pub fn controlled_threshold(
    samples: &[Sample],
    alpha: f64,
    delta: f64,
) -> Result<RiskControlled, RiskControlError> {
    let mut points: Vec<WeightedSample> = samples.iter().copied().map(Into::into).collect();
    controlled_threshold_weighted(&mut points, alpha, delta)
}

/// [`controlled_threshold`] over weighted samples, for the online refit. Sorts `samples` by `u`
/// in place, so a refit can reuse one buffer.
///
/// The risk estimate is the weighted (Hájek) mean `Σ wᵢ 1{uᵢ < λ} βᵢ / Σ wᵢ`, and the bound uses
/// Kish's effective sample size `n_eff = (Σw)²/Σw²` in place of `n`. With equal weights this is
/// exactly the unweighted procedure. With unequal weights the guarantee is **approximate**: it
/// treats the weights as fixed and the weighted mean as if it were a plain mean of `n_eff` i.i.d.
/// losses. (Hoeffding's sub-Gaussian bound with `n_eff` is exact for fixed weights; the KL and
/// Bentkus forms with `n_eff`, and the ratio estimator's normalisation, are not.) Importance
/// weights `1/probe_rate` shrink `n_eff` as the variance of the estimate grows, which is the
/// right direction and the right order of magnitude.
pub fn controlled_threshold_weighted(
    samples: &mut [WeightedSample],
    alpha: f64,
    delta: f64,
) -> Result<RiskControlled, RiskControlError> {
    check_levels(alpha, delta)?;
    let (mut w_sum, mut w2_sum) = (0.0f64, 0.0f64);
    for (index, s) in samples.iter().enumerate() {
        if !s.u.is_finite() || !s.beta.is_finite() {
            return Err(RiskControlError::NonFiniteSample {
                index,
                u: s.u,
                beta: s.beta,
            });
        }
        if !(s.weight.is_finite() && s.weight >= 0.0) {
            return Err(RiskControlError::InvalidWeight {
                index,
                weight: s.weight,
            });
        }
        w_sum += s.weight;
        w2_sum += s.weight * s.weight;
    }
    let n_eff = if w2_sum > 0.0 {
        w_sum * w_sum / w2_sum
    } else {
        0.0
    };
    let mut best = RiskControlled {
        u_th: 0.0,
        empirical_risk: 0.0,
        risk_bound: 0.0,
        skip_rate: 0.0,
        n: samples.len(),
        n_eff,
    };
    if w_sum <= 0.0 {
        return Ok(best);
    }
    samples.sort_by(|a, b| a.u.total_cmp(&b.u));
    let (mut loss, mut skipped) = (0.0f64, 0.0f64);
    for i in 0..samples.len() {
        let s = samples[i];
        loss += s.weight * s.beta.clamp(0.0, 1.0) as f64;
        skipped += s.weight;
        let next = samples.get(i + 1).map(|n| n.u);
        if next == Some(s.u) {
            continue; // ties are skipped or sent together
        }
        let risk_hat = loss / w_sum;
        if hb_p_value_eff(risk_hat, n_eff, alpha) > delta {
            break; // fixed-sequence testing: the first failure ends the sequence
        }
        best.u_th = match next {
            Some(n) => midpoint(s.u, n),
            None => next_up(s.u),
        };
        best.empirical_risk = risk_hat;
        best.skip_rate = skipped / w_sum;
    }
    best.risk_bound = if best.u_th > 0.0 {
        hb_ucb_eff(best.empirical_risk, n_eff, delta)
    } else {
        0.0
    };
    Ok(best)
}

/// The largest threshold `λ̂` whose risk per *output* is at most `alpha` with probability at
/// least `1 − delta` over the (i.i.d.) draw of calibration outputs. `outputs` holds one entry
/// per calibration generation: its drafted tokens' `(u, beta)`, in any order.
///
/// The loss of one output is `min(1, Σ_t 1{u_t < λ}·β_t)`. At greedy decoding `β` is 1 exactly
/// where the LLM's token differs from the draft, and a hybrid generation is the LLM's own until
/// its first skipped token that differs (every sent token is the LLM's), so the loss is 1
/// exactly when the hybrid's output differs from what the LLM alone would have produced: the
/// guarantee is on "how often may the output differ", the quality a user asks for. At other
/// temperatures the sum is the union bound on that probability (each skipped token moves the
/// output distribution by its `β`). Outputs, unlike the tokens within one, are independent
/// draws, so the i.i.d. assumption of the bound is the natural one here.
///
/// Same procedure as [`controlled_threshold`] (fixed-sequence Learn-then-Test with the
/// Hoeffding–Bentkus p-value), with `n` the number of outputs; `skip_rate` is the share of
/// calibration tokens below the threshold.
pub fn controlled_threshold_per_output(
    outputs: &[Vec<Sample>],
    alpha: f64,
    delta: f64,
) -> Result<RiskControlled, RiskControlError> {
    check_levels(alpha, delta)?;
    let mut tokens: Vec<(f32, f32, usize)> = Vec::new();
    for (g, output) in outputs.iter().enumerate() {
        for s in output {
            if !s.u.is_finite() || !s.beta.is_finite() {
                return Err(RiskControlError::NonFiniteSample {
                    index: tokens.len(),
                    u: s.u,
                    beta: s.beta,
                });
            }
            tokens.push((s.u, s.beta.clamp(0.0, 1.0), g));
        }
    }
    let n = outputs.len();
    let mut best = RiskControlled {
        u_th: 0.0,
        empirical_risk: 0.0,
        risk_bound: 0.0,
        skip_rate: 0.0,
        n,
        n_eff: n as f64,
    };
    if n == 0 || tokens.is_empty() {
        return Ok(best);
    }
    tokens.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut sums = vec![0.0f64; n];
    let mut loss = 0.0f64;
    for i in 0..tokens.len() {
        let (u, beta, g) = tokens[i];
        let before = sums[g].min(1.0);
        sums[g] += beta as f64;
        loss += sums[g].min(1.0) - before;
        let next = tokens.get(i + 1).map(|t| t.0);
        if next == Some(u) {
            continue; // ties are skipped or sent together
        }
        let risk_hat = loss / n as f64;
        if hb_p_value(risk_hat, n, alpha) > delta {
            break;
        }
        best.u_th = match next {
            Some(n) => midpoint(u, n),
            None => next_up(u),
        };
        best.empirical_risk = risk_hat;
        best.skip_rate = (i + 1) as f64 / tokens.len() as f64;
    }
    best.risk_bound = if best.u_th > 0.0 {
        hb_ucb(best.empirical_risk, n, delta)
    } else {
        0.0
    };
    Ok(best)
}

/// The weighted risk estimate `Σ wᵢ 1{uᵢ < λ} βᵢ / Σ wᵢ` of a given threshold.
pub fn weighted_risk(samples: &[WeightedSample], u_th: f32) -> f64 {
    let (mut w, mut loss) = (0.0, 0.0);
    for s in samples {
        w += s.weight;
        if s.u < u_th {
            loss += s.weight * s.beta.clamp(0.0, 1.0) as f64;
        }
    }
    if w > 0.0 { loss / w } else { 0.0 }
}

fn midpoint(a: f32, b: f32) -> f32 {
    let m = a + (b - a) / 2.0;
    // Adjacent floats: the midpoint rounds onto one of them; keep `a` below the threshold.
    if m > a { m } else { b }
}

fn next_up(u: f32) -> f32 {
    if u >= 1.0 {
        u + f32::EPSILON * 2.0 * u
    } else {
        f32::from_bits(u.to_bits() + 1).max(u + 1e-6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_cdf_small_cases_by_hand() {
        // Bin(3, 0.5): P(X <= 0) = 1/8, P(X <= 1) = 4/8, P(X <= 2) = 7/8.
        assert!((binomial_cdf(0, 3, 0.5) - 0.125).abs() < 1e-15);
        assert!((binomial_cdf(1, 3, 0.5) - 0.5).abs() < 1e-15);
        assert!((binomial_cdf(2, 3, 0.5) - 0.875).abs() < 1e-15);
        assert_eq!(binomial_cdf(3, 3, 0.5), 1.0);
        // Far tail (1e-218), where a product of probabilities in linear space would round off.
        let p = binomial_cdf(0, 50_000, 0.01);
        assert!((p.ln() - 50_000.0 * (0.99f64).ln()).abs() < 1e-6);
    }

    #[test]
    fn p_value_edge_cases() {
        assert_eq!(hb_p_value(0.0, 0, 0.1), 1.0);
        assert_eq!(hb_p_value(0.2, 1000, 0.1), 1.0);
        // Zero risk: Hoeffding (1-α)^n beats Bentkus e(1-α)^n.
        assert!((hb_p_value(0.0, 24, 0.01) - 0.99f64.powi(24)).abs() < 1e-12);
        assert_eq!(min_certifying_samples(0.01, 0.1).ceil(), 230.0);
    }

    fn sample(u: f32, beta: f32) -> Sample {
        Sample { u, beta }
    }

    #[test]
    fn per_output_loss_counts_an_output_once() {
        // 40 outputs of 50 tokens; output g has one differing token at u = 0.5 + g/100, the
        // rest agree at low u. Below 0.5 nothing is lost; each step past a differing token
        // loses one more whole output, however many tokens it had.
        let outputs: Vec<Vec<_>> = (0..40)
            .map(|g| {
                let mut o: Vec<_> = (0..49).map(|t| sample(t as f32 / 200.0, 0.0)).collect();
                o.push(sample(0.5 + g as f32 / 100.0, 1.0));
                o
            })
            .collect();
        // Zero loss on 40 outputs certifies α = 0.1 at δ = 0.1 (0.9^40 ≈ 0.015).
        let c = controlled_threshold_per_output(&outputs, 0.1, 0.1).unwrap();
        assert!(c.u_th > 0.245 && c.u_th <= 0.5, "{c:?}");
        assert_eq!(c.empirical_risk, 0.0);
        assert!((c.skip_rate - 49.0 / 50.0).abs() < 1e-12);
        assert!(c.risk_bound <= 0.1);
        // A looser target lets some outputs differ: then the risk is counted per output.
        let c = controlled_threshold_per_output(&outputs, 0.4, 0.1).unwrap();
        let lost = outputs
            .iter()
            .filter(|o| o.iter().any(|s| s.u < c.u_th && s.beta > 0.0))
            .count();
        assert!(lost > 0);
        assert_eq!(c.empirical_risk, lost as f64 / 40.0);
        // Too few outputs certify nothing.
        let c = controlled_threshold_per_output(&outputs[..10], 0.1, 0.1).unwrap();
        assert_eq!(c.u_th, 0.0);
    }

    #[test]
    fn per_output_loss_is_capped_at_one() {
        // Two differing tokens in one output cost it once.
        let mut outputs: Vec<Vec<_>> = (0..30).map(|_| vec![sample(0.1, 0.0)]).collect();
        outputs[0] = vec![sample(0.2, 1.0), sample(0.21, 1.0)];
        let c = controlled_threshold_per_output(&outputs, 0.5, 0.1).unwrap();
        assert!(c.u_th > 0.21);
        assert!((c.empirical_risk - 1.0 / 30.0).abs() < 1e-12);
        assert!(controlled_threshold_per_output(&[vec![sample(f32::NAN, 0.0)]], 0.1, 0.1).is_err());
    }

    #[test]
    fn midpoint_stays_between() {
        assert_eq!(midpoint(0.25, 0.75), 0.5);
        let a = 0.3f32;
        let b = f32::from_bits(a.to_bits() + 1);
        let m = midpoint(a, b);
        assert!(m > a && m <= b);
    }
}
