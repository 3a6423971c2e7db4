//! Speculative-sampling verification of one drafted token.
//!
//! The device drafted `d` by sampling from `q` (the exact distribution it sent uplink, after
//! compression). The server holds the LLM's `p`. Accepting `d` with probability
//! `min(1, p_d / q_d)` and otherwise sampling from `norm(max(0, p - q))` makes the final token
//! distributed exactly as `p`, whatever `q` is. That is why the uplink may be compressed freely
//! as long as the device samples from what it sends.

use rand::Rng;
use thiserror::Error;

/// How far from 1 a distribution's sum may be before it is rejected as not normalised.
pub const NORMALISATION_TOLERANCE: f64 = 1e-3;

/// The server's decision for one draft.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// The final token: the draft if accepted, otherwise a sample from the residual.
    pub token: u32,
    /// Whether the draft was kept.
    pub accepted: bool,
    /// Rejection probability of this draft, `max(0, 1 - p_d / q_d)`; what the threshold policy
    /// learns to predict from the device's uncertainty.
    pub beta: f32,
    /// Total-variation distance `1 - sum_x min(p_x, q_x)`: the expected rejection rate of a
    /// draft sampled from `q`.
    pub tv_distance: f32,
}

/// Which of the two distributions an input error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The LLM's distribution.
    P,
    /// The device's (decoded) distribution.
    Q,
}

impl std::fmt::Display for Which {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Which::P => "p (LLM)",
            Which::Q => "q (device)",
        })
    }
}

/// Inputs that cannot be verified. None of these can happen with a well-behaved device and
/// server; all of them can be sent by a broken or hostile client.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum VerifyError {
    #[error("distributions have different lengths: p has {p}, q has {q}")]
    LengthMismatch { p: usize, q: usize },
    #[error("distributions are empty")]
    Empty,
    #[error("{which} has a non-finite value at index {index}")]
    NotFinite { which: Which, index: usize },
    #[error("{which} has a negative value {value} at index {index}")]
    Negative {
        which: Which,
        index: usize,
        value: f32,
    },
    #[error("{which} is not normalised: it sums to {sum}")]
    NotNormalised { which: Which, sum: f64 },
    #[error("draft token {draft} is outside the vocabulary of {vocab} tokens")]
    DraftOutOfRange { draft: u32, vocab: usize },
    #[error(
        "draft token {draft} has zero probability under q, so it cannot have been sampled from q"
    )]
    DraftNotInSupport { draft: u32 },
    #[error("the draft was rejected but max(0, p - q) has no mass to resample from")]
    NoResidualMass,
    #[error("the engine gave no more draws from p to sample the residual with")]
    NoMoreDraws,
}

fn check(which: Which, dist: &[f32]) -> Result<(), VerifyError> {
    let mut sum = 0.0f64;
    for (index, &v) in dist.iter().enumerate() {
        if !v.is_finite() {
            return Err(VerifyError::NotFinite { which, index });
        }
        if v < 0.0 {
            return Err(VerifyError::Negative {
                which,
                index,
                value: v,
            });
        }
        sum += v as f64;
    }
    if (sum - 1.0).abs() > NORMALISATION_TOLERANCE {
        return Err(VerifyError::NotNormalised { which, sum });
    }
    Ok(())
}

/// Total-variation distance `1 - sum_x min(p_x, q_x)`, clamped to `[0, 1]`.
pub fn tv_distance(p: &[f32], q: &[f32]) -> f32 {
    let overlap: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| a.min(b).max(0.0) as f64)
        .sum();
    (1.0 - overlap).clamp(0.0, 1.0) as f32
}

/// Verifies `draft`, sampled by the device from `q`, against the LLM's `p`.
///
/// `rng` is injected so the server can seed it per session and results are reproducible.
pub fn verify<R: Rng + ?Sized>(
    p: &[f32],
    q: &[f32],
    draft: u32,
    rng: &mut R,
) -> Result<Verdict, VerifyError> {
    if p.len() != q.len() {
        return Err(VerifyError::LengthMismatch {
            p: p.len(),
            q: q.len(),
        });
    }
    if p.is_empty() {
        return Err(VerifyError::Empty);
    }
    check(Which::P, p)?;
    check(Which::Q, q)?;
    let d = draft as usize;
    if d >= q.len() {
        return Err(VerifyError::DraftOutOfRange {
            draft,
            vocab: q.len(),
        });
    }
    let (p_d, q_d) = (p[d] as f64, q[d] as f64);
    if q_d <= 0.0 {
        return Err(VerifyError::DraftNotInSupport { draft });
    }
    let ratio = p_d / q_d;
    let beta = (1.0 - ratio).max(0.0) as f32;
    let tv = tv_distance(p, q);
    if ratio >= 1.0 || rng.random::<f64>() < ratio {
        return Ok(Verdict {
            token: draft,
            accepted: true,
            beta,
            tv_distance: tv,
        });
    }
    let token = sample_residual(p, q, rng)?;
    Ok(Verdict {
        token,
        accepted: false,
        beta,
        tv_distance: tv,
    })
}

/// Samples from `norm(max(0, p - q))` in two passes without allocating: the token a rejected
/// draft is replaced by.
pub fn sample_residual<R: Rng + ?Sized>(
    p: &[f32],
    q: &[f32],
    rng: &mut R,
) -> Result<u32, VerifyError> {
    let residual = |i: usize| (p[i] as f64 - q[i] as f64).max(0.0);
    let total: f64 = (0..p.len()).map(residual).sum();
    if total <= 0.0 {
        return Err(VerifyError::NoResidualMass);
    }
    let target = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut last_positive = None;
    for i in 0..p.len() {
        let r = residual(i);
        if r > 0.0 {
            acc += r;
            last_positive = Some(i as u32);
            if target < acc {
                return Ok(i as u32);
            }
        }
    }
    last_positive.ok_or(VerifyError::NoResidualMass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(1)
    }

    #[test]
    fn accepts_when_p_dominates() {
        let v = verify(&[0.7, 0.3], &[0.5, 0.5], 0, &mut rng()).unwrap();
        assert!(v.accepted);
        assert_eq!(v.token, 0);
        assert_eq!(v.beta, 0.0);
        assert!((v.tv_distance - 0.2).abs() < 1e-6);
    }

    #[test]
    fn rejected_draft_resamples_only_where_p_exceeds_q() {
        // p_d = 0, so the draft is always rejected and the only residual mass is on token 1.
        let p = [0.0, 1.0, 0.0];
        let q = [0.5, 0.0, 0.5];
        for seed in 0..50 {
            let v = verify(&p, &q, 0, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            assert!(!v.accepted);
            assert_eq!(v.token, 1);
            assert_eq!(v.beta, 1.0);
        }
    }

    #[test]
    fn beta_is_one_minus_ratio() {
        let v = verify(&[0.2, 0.8], &[0.8, 0.2], 0, &mut rng()).unwrap();
        assert!((v.beta - 0.75).abs() < 1e-6);
        assert!((v.tv_distance - 0.6).abs() < 1e-6);
    }

    #[test]
    fn degenerate_inputs_are_typed_errors() {
        let r = &mut rng();
        assert_eq!(
            verify(&[1.0], &[0.5, 0.5], 0, r),
            Err(VerifyError::LengthMismatch { p: 1, q: 2 })
        );
        assert_eq!(verify(&[], &[], 0, r), Err(VerifyError::Empty));
        assert!(matches!(
            verify(&[f32::NAN, 1.0], &[0.5, 0.5], 0, r),
            Err(VerifyError::NotFinite {
                which: Which::P,
                index: 0
            })
        ));
        assert!(matches!(
            verify(&[0.5, 0.5], &[-0.5, 1.5], 1, r),
            Err(VerifyError::Negative {
                which: Which::Q,
                ..
            })
        ));
        assert!(matches!(
            verify(&[0.5, 0.9], &[0.5, 0.5], 1, r),
            Err(VerifyError::NotNormalised {
                which: Which::P,
                ..
            })
        ));
        assert_eq!(
            verify(&[0.5, 0.5], &[0.5, 0.5], 2, r),
            Err(VerifyError::DraftOutOfRange { draft: 2, vocab: 2 })
        );
        assert_eq!(
            verify(&[0.5, 0.5], &[1.0, 0.0], 1, r),
            Err(VerifyError::DraftNotInSupport { draft: 1 })
        );
    }

    #[test]
    fn no_residual_mass_is_reported_not_panicked() {
        // Within tolerance but p < q everywhere: rejection finds nothing to resample.
        let p = [0.4996, 0.4996];
        let q = [0.5, 0.5];
        let mut saw = false;
        for seed in 0..2000 {
            match verify(&p, &q, 0, &mut ChaCha8Rng::seed_from_u64(seed)) {
                Ok(v) => assert!(v.accepted),
                Err(e) => {
                    assert_eq!(e, VerifyError::NoResidualMass);
                    saw = true;
                }
            }
        }
        assert!(saw);
    }
}
