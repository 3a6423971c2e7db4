//! The paper's linear fit `beta ≈ a·u + b` and the point-estimate thresholds read from
//! calibration samples: risk-averse, risk-prone, target-risk.

use serde::{Deserialize, Serialize};

use super::error::ThresholdError;
use crate::sample::{Sample, WeightedSample};

/// Least-squares fit `beta ≈ a·u + b`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearFit {
    pub a: f64,
    pub b: f64,
    /// Coefficient of determination.
    pub r2: f64,
    /// Pearson correlation of u and beta.
    pub pearson_r: f64,
    /// Number of samples (or effective weight, for weighted fits).
    pub n: f64,
}

impl LinearFit {
    /// Predicted beta at `u`.
    pub fn predict(&self, u: f64) -> f64 {
        self.a * u + self.b
    }

    /// The paper's risk-averse threshold `-b/a`: where the fit predicts zero rejection.
    pub fn risk_averse(&self) -> Result<f64, ThresholdError> {
        self.check_slope()?;
        Ok(-self.b / self.a)
    }

    /// The paper's risk-prone threshold `(Δ - b)/a`, with `Δ` the fraction of calibration
    /// tokens with `p_d < q_d` (see [`delta`]).
    pub fn risk_prone(&self, delta: f64) -> Result<f64, ThresholdError> {
        self.check_slope()?;
        Ok((delta - self.b) / self.a)
    }

    fn check_slope(&self) -> Result<(), ThresholdError> {
        if self.a > 0.0 && self.a.is_finite() {
            Ok(())
        } else {
            Err(ThresholdError::NonPositiveSlope(self.a))
        }
    }
}

/// Ordinary least squares over samples.
pub fn fit(samples: &[Sample]) -> Result<LinearFit, ThresholdError> {
    weighted_fit(samples.iter().map(|s| (s.u as f64, s.beta as f64, 1.0)))
}

/// Weighted least squares over `(u, beta, weight)`.
pub(super) fn weighted_fit(
    points: impl Iterator<Item = (f64, f64, f64)> + Clone,
) -> Result<LinearFit, ThresholdError> {
    let (mut w, mut su, mut sb, mut count) = (0.0, 0.0, 0.0, 0usize);
    for (u, b, wi) in points.clone() {
        w += wi;
        su += wi * u;
        sb += wi * b;
        count += 1;
    }
    if count < 2 || w <= 0.0 {
        return Err(ThresholdError::TooFewSamples {
            needed: 2,
            got: count,
        });
    }
    let (mu, mb) = (su / w, sb / w);
    let (mut suu, mut sub, mut sbb) = (0.0, 0.0, 0.0);
    for (u, b, wi) in points {
        suu += wi * (u - mu) * (u - mu);
        sub += wi * (u - mu) * (b - mb);
        sbb += wi * (b - mb) * (b - mb);
    }
    if suu <= f64::EPSILON * w {
        return Err(ThresholdError::NoSpread);
    }
    let a = sub / suu;
    let b = mb - a * mu;
    let pearson_r = if sbb > 0.0 {
        sub / (suu * sbb).sqrt()
    } else {
        0.0
    };
    Ok(LinearFit {
        a,
        b,
        r2: pearson_r * pearson_r,
        pearson_r,
        n: w,
    })
}

/// `Δ`: the fraction of samples whose draft had `p_d < q_d`, i.e. `beta > 0`.
pub fn delta(samples: &[Sample]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().filter(|s| s.beta > 0.0).count() as f64 / samples.len() as f64
}

/// The largest threshold whose skipped samples (`u < u_th`) have weighted mean beta `<= epsilon`.
///
/// Thresholds are only placed between distinct uncertainties, so ties are skipped or sent
/// together. Returns 0 (skip nothing) when even the most certain sample is too risky, and a
/// value above every sample when all of them may be skipped.
pub(super) fn target_risk_weighted(points: &mut [WeightedSample], epsilon: f64) -> f32 {
    points.sort_by(|a, b| a.u.total_cmp(&b.u));
    let mut best = 0.0f32;
    let (mut w, mut wb) = (0.0f64, 0.0f64);
    for i in 0..points.len() {
        let WeightedSample {
            u,
            beta,
            weight: wi,
        } = points[i];
        w += wi;
        wb += wi * beta as f64;
        let boundary = points.get(i + 1).map(|n| n.u);
        if boundary == Some(u) {
            continue;
        }
        // A hair of tolerance so a risk exactly at epsilon is not lost to f32 rounding.
        if w > 0.0 && wb / w <= epsilon + 1e-7 {
            // Skip up to and including u: the threshold sits at the next distinct value.
            best = boundary.unwrap_or_else(|| next_up(u));
        }
    }
    best
}

fn next_up(u: f32) -> f32 {
    if u >= 1.0 {
        u + f32::EPSILON * 2.0
    } else {
        f32::from_bits(u.to_bits() + 1).max(u + 1e-6)
    }
}

/// [`target_risk_weighted`] over unweighted samples.
pub fn target_risk(samples: &[Sample], epsilon: f64) -> f32 {
    let mut pts: Vec<WeightedSample> = samples.iter().copied().map(Into::into).collect();
    target_risk_weighted(&mut pts, epsilon)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threshold::test_samples::synthetic;

    #[test]
    fn recovers_known_line_and_paper_thresholds() {
        let samples = synthetic(0.82, -0.06, 5000, 0.0, 1);
        let f = fit(&samples).unwrap();
        assert!((f.a - 0.82).abs() < 1e-5 && (f.b + 0.06).abs() < 1e-5);
        assert!(f.r2 > 0.999999);
        assert!((f.risk_averse().unwrap() - 0.06 / 0.82).abs() < 1e-5);
        assert!((f.risk_prone(0.3).unwrap() - 0.36 / 0.82).abs() < 1e-5);

        let noisy = synthetic(0.82, -0.06, 20_000, 0.05, 2);
        let f = fit(&noisy).unwrap();
        assert!((f.a - 0.82).abs() < 0.01 && (f.b + 0.06).abs() < 0.01);
        assert!(f.r2 > 0.9 && f.r2 < 1.0);
    }

    #[test]
    fn fit_errors_are_typed() {
        assert!(matches!(
            fit(&[]),
            Err(ThresholdError::TooFewSamples { .. })
        ));
        let flat = vec![Sample { u: 0.3, beta: 0.1 }; 10];
        assert_eq!(fit(&flat), Err(ThresholdError::NoSpread));
        let falling: Vec<_> = (0..10)
            .map(|i| Sample {
                u: i as f32 / 10.0,
                beta: 1.0 - i as f32 / 10.0,
            })
            .collect();
        assert!(matches!(
            fit(&falling).unwrap().risk_averse(),
            Err(ThresholdError::NonPositiveSlope(_))
        ));
    }

    #[test]
    fn delta_counts_rejection_risk() {
        let s = [
            Sample { u: 0.1, beta: 0.0 },
            Sample { u: 0.2, beta: 0.5 },
            Sample { u: 0.3, beta: 0.0 },
            Sample { u: 0.4, beta: 0.1 },
        ];
        assert_eq!(delta(&s), 0.5);
    }

    #[test]
    fn target_risk_is_the_largest_safe_threshold() {
        let s = [
            Sample { u: 0.1, beta: 0.0 },
            Sample { u: 0.2, beta: 0.1 },
            Sample { u: 0.3, beta: 0.2 },
            Sample { u: 0.4, beta: 0.9 },
        ];
        // Prefix means: 0, 0.05, 0.1, 0.3.
        assert_eq!(target_risk(&s, 0.1), 0.4);
        assert_eq!(target_risk(&s, 0.05), 0.3);
        assert_eq!(target_risk(&s, 0.0), 0.2);
        assert!(target_risk(&s, 1.0) > 0.4);
        let risky = [Sample { u: 0.1, beta: 0.5 }];
        assert_eq!(target_risk(&risky, 0.1), 0.0);
        // Ties are kept together: both 0.2s have mean 0.25 > 0.1.
        let tied = [
            Sample { u: 0.1, beta: 0.0 },
            Sample { u: 0.2, beta: 0.0 },
            Sample { u: 0.2, beta: 0.5 },
        ];
        assert_eq!(target_risk(&tied, 0.1), 0.2);
    }
}
