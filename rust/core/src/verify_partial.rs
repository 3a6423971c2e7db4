//! Verification against an LLM known only in part, as a sampling engine reports it.
//!
//! An inference engine such as llama.cpp's server or vLLM answers cheaply with its probability
//! at a few tokens (its top candidates) and with samples it drew, each with its probability;
//! the whole distribution over a 150k vocabulary costs it ten times more (docs/BENCHMARKS.md,
//! "The gateway on llama-server"). That is enough to verify exactly:
//!
//! - the draft `d` is accepted with `min(1, p_d / q_d)`, which needs `p_d` only;
//! - on a rejection, the residual `norm(max(0, p - q))` is sampled by rejection from `p`: a
//!   draw `x ~ p` is kept with probability `max(0, 1 - q_x / p_x)`. A draw from `p` is made
//!   here from the known top set `S` with probability `p(S)` (its probabilities are exact),
//!   and otherwise taken from the engine's own samples that fell outside `S` (independent draws
//!   from `p` restricted to the rest, each with its probability).
//!
//! When `p_d` is not among the known probabilities, the answer is "verify against the whole distribution"
//! ([`Partial::NeedFull`]), decided from the report alone before any random draw, so the switch
//! changes no probability. When the engine's samples outside `S` run out, more are asked for
//! (`more`) and the same rejection rounds go on: giving up half way and starting over would
//! favour the tokens of the known set.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::verify::{Verdict, VerifyError};

/// Most rejection rounds: each keeps its draw with probability `sum max(0, p - q)`, the
/// total-variation distance, so this many happen only when `p` and `q` are nearly equal, where
/// a rejection was itself rare; past it the request fails.
const MAX_ROUNDS: usize = 1_000_000;

/// What an engine reported about the LLM's distribution `p` at one position.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PartialTarget {
    /// Exact `p` at these tokens (the engine's top candidates), distinct ids.
    pub known: Vec<(u32, f32)>,
    /// Independent draws from `p`, each with its exact probability.
    pub draws: Vec<(u32, f32)>,
    /// `known` lists every token `p` gives mass to (a greedy or top-k target): `p` is 0
    /// elsewhere.
    pub complete: bool,
}

/// The outcome of [`verify_partial`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partial {
    Decided(Verdict),
    /// `p` at the draft is not in the report; verify against the whole distribution instead.
    NeedFull,
}

/// Asks the engine for more independent draws from `p` (each with its probability); `None`
/// when it cannot give any.
pub type MoreDraws<'a> = dyn FnMut() -> Option<Vec<(u32, f32)>> + 'a;

impl PartialTarget {
    /// `p` at `token`, where the known set has it. Never from the draws: whether the draft is
    /// among them would then decide which procedure runs, and the residual would be drawn from
    /// draws known to contain it (a bias this module's tests caught).
    pub fn p(&self, token: u32) -> Option<f32> {
        match self.known.iter().find(|(t, _)| *t == token) {
            Some((_, p)) => Some(*p),
            None if self.complete => Some(0.0),
            None => None,
        }
    }

    fn check(&self) -> Result<f64, VerifyError> {
        let mut mass = 0.0f64;
        for (index, &(_, p)) in self.known.iter().chain(&self.draws).enumerate() {
            if !p.is_finite() || p < 0.0 || p > 1.0 + crate::verify::NORMALISATION_TOLERANCE as f32
            {
                return Err(VerifyError::NotFinite {
                    which: crate::verify::Which::P,
                    index,
                });
            }
        }
        for &(_, p) in &self.known {
            mass += f64::from(p);
        }
        if mass > 1.0 + crate::verify::NORMALISATION_TOLERANCE {
            return Err(VerifyError::NotNormalised {
                which: crate::verify::Which::P,
                sum: mass,
            });
        }
        Ok(mass.min(1.0))
    }
}

/// Verifies `draft`, sampled by the device from `q`, against the partly known `p`.
///
/// `beta` is exact; `tv_distance` is a lower bound (exact over the known tokens, the rest by
/// their total mass).
pub fn verify_partial<R: Rng + ?Sized>(
    target: &PartialTarget,
    q: &[f32],
    draft: u32,
    rng: &mut R,
    more: &mut MoreDraws<'_>,
) -> Result<Partial, VerifyError> {
    let known_mass = target.check()?;
    let q_d = *q.get(draft as usize).ok_or(VerifyError::DraftOutOfRange {
        draft,
        vocab: q.len(),
    })? as f64;
    if q_d <= 0.0 {
        return Err(VerifyError::DraftNotInSupport { draft });
    }
    let Some(p_d) = target.p(draft) else {
        return Ok(Partial::NeedFull);
    };
    let ratio = f64::from(p_d) / q_d;
    let beta = (1.0 - ratio).max(0.0) as f32;
    let tv = tv_lower_bound(target, q, known_mass);
    let accept = ratio >= 1.0 || rng.random::<f64>() < ratio;
    if accept {
        return Ok(Partial::Decided(Verdict {
            token: draft,
            accepted: true,
            beta,
            tv_distance: tv,
        }));
    }
    let keep = |x: u32, p_x: f32| {
        let q_x = q.get(x as usize).copied().unwrap_or(0.0);
        (1.0 - f64::from(q_x) / f64::from(p_x)).max(0.0)
    };
    let token = draw(target, known_mass, rng, more, keep)?;
    Ok(Partial::Decided(Verdict {
        token,
        accepted: false,
        beta,
        tv_distance: tv,
    }))
}

/// Samples one token from the partly known `p` (no draft to verify): a plain draw.
pub fn sample_partial<R: Rng + ?Sized>(
    target: &PartialTarget,
    rng: &mut R,
    more: &mut MoreDraws<'_>,
) -> Result<u32, VerifyError> {
    let known_mass = target.check()?;
    draw(target, known_mass, rng, more, |_, _| 1.0)
}

/// Draws `x ~ p` until one is kept with probability `keep(x, p_x)`.
fn draw<R: Rng + ?Sized>(
    target: &PartialTarget,
    known_mass: f64,
    rng: &mut R,
    more: &mut MoreDraws<'_>,
    keep: impl Fn(u32, f32) -> f64,
) -> Result<u32, VerifyError> {
    // The rounds draw from a stream of their own, seeded from the position's: a position's
    // stream has room for a few words only, and the next position's must stay untouched.
    let mut rounds = ChaCha8Rng::seed_from_u64(rng.random::<u64>());
    let is_known = |t: u32| target.known.iter().any(|(k, _)| *k == t);
    // The engine's draws that fell outside the known set: independent draws from `p` there.
    let mut outside: std::collections::VecDeque<(u32, f32)> = target
        .draws
        .iter()
        .copied()
        .filter(|(t, _)| !is_known(*t))
        .collect();
    for _ in 0..MAX_ROUNDS {
        // A complete report has all the mass, whatever its float sum says.
        let scale = if target.complete { known_mass } else { 1.0 };
        let u = rounds.random::<f64>() * scale;
        let (x, p_x) = if u < known_mass {
            // Within the known set, by its probabilities: u is uniform on [0, p(S)).
            let mut acc = 0.0f64;
            let mut pick = target.known[target.known.len() - 1];
            for &(t, p) in &target.known {
                acc += f64::from(p);
                if u < acc {
                    pick = (t, p);
                    break;
                }
            }
            pick
        } else {
            while outside.is_empty() {
                let fresh = more().ok_or(VerifyError::NoMoreDraws)?;
                if fresh.is_empty() {
                    return Err(VerifyError::NoMoreDraws);
                }
                outside.extend(fresh.into_iter().filter(|(t, _)| !is_known(*t)));
            }
            outside.pop_front().expect("refilled above")
        };
        if !(p_x > 0.0 && p_x.is_finite()) {
            return Err(VerifyError::NotFinite {
                which: crate::verify::Which::P,
                index: x as usize,
            });
        }
        if rounds.random::<f64>() < keep(x, p_x) {
            return Ok(x);
        }
    }
    Err(VerifyError::NoResidualMass)
}

/// `sum_x max(0, q_x - p_x)` over the known tokens, plus what the rest of `q` exceeds the rest
/// of `p` by: the total-variation distance where all of `p` is known, a lower bound otherwise.
fn tv_lower_bound(target: &PartialTarget, q: &[f32], known_mass: f64) -> f32 {
    let mut over_known = 0.0f64;
    let mut q_known = 0.0f64;
    for &(t, p) in &target.known {
        let q_t = f64::from(q.get(t as usize).copied().unwrap_or(0.0));
        over_known += (q_t - f64::from(p)).max(0.0);
        q_known += q_t;
    }
    let rest = ((1.0 - q_known) - (1.0 - known_mass)).max(0.0);
    (over_known + rest).clamp(0.0, 1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::verify;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// A target's report drawn from `p`: its top `k` exactly, and `n` draws.
    fn report(p: &[f32], k: usize, n: usize, rng: &mut ChaCha8Rng) -> PartialTarget {
        let mut ids: Vec<u32> = (0..p.len() as u32).collect();
        ids.sort_by(|a, b| p[*b as usize].total_cmp(&p[*a as usize]));
        let known = ids[..k].iter().map(|&t| (t, p[t as usize])).collect();
        let draws = (0..n)
            .map(|_| {
                let t = crate::sampling::sample(p, rng);
                (t, p[t as usize])
            })
            .collect();
        PartialTarget {
            known,
            draws,
            complete: false,
        }
    }

    #[test]
    fn the_final_token_follows_p_whatever_the_draft() {
        // p and q far apart; a quarter of p's mass outside the known top 3, where the residual
        // is then drawn from the engine's own samples (and more of them asked for).
        let p = [0.30, 0.05, 0.25, 0.10, 0.20, 0.10];
        let q = [0.05, 0.02, 0.50, 0.30, 0.08, 0.05];
        let mut r = rng(7);
        let n = 200_000;
        let mut counts = [0u64; 6];
        let (mut full, mut asked) = (0, 0);
        for _ in 0..n {
            let d = crate::sampling::sample(&q, &mut r);
            let target = report(&p, 3, 1, &mut r);
            let mut engine = rng(r.random());
            let mut more = || {
                asked += 1;
                Some(report(&p, 0, 1, &mut engine).draws)
            };
            let token = match verify_partial(&target, &q, d, &mut r, &mut more).unwrap() {
                Partial::Decided(v) => v.token,
                Partial::NeedFull => {
                    full += 1;
                    verify(&p, &q, d, &mut r).unwrap().token
                }
            };
            counts[token as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let f = c as f64 / n as f64;
            assert!(
                (f - f64::from(p[i])).abs() < 0.004,
                "token {i}: {f} vs {}",
                p[i]
            );
        }
        // Drafts outside the top 3 (token 3, q 0.3, and the small ones) took the whole
        // distribution; the rest were decided from the report and the draws.
        assert!(full < n / 2, "{full} of {n} needed the whole distribution");
        assert!(asked > 0);
    }

    #[test]
    fn an_unknown_draft_probability_or_spent_draws_ask_for_the_whole_distribution() {
        let q = [0.5, 0.5];
        let target = PartialTarget {
            known: vec![(0, 0.9)],
            draws: vec![],
            complete: false,
        };
        let mut none = || None;
        assert_eq!(
            verify_partial(&target, &q, 1, &mut rng(1), &mut none).unwrap(),
            Partial::NeedFull
        );
        // A rejected draft whose residual lies outside the known set: more draws are asked
        // for, and an engine that has none fails the request rather than guess.
        let q = [0.9, 0.1];
        let target = PartialTarget {
            known: vec![(0, 0.1)],
            draws: vec![],
            complete: false,
        };
        let (mut asked, mut failed) = (0, 0);
        for s in 0..64 {
            let mut more = || {
                asked += 1;
                Some(vec![(1, 0.9)])
            };
            match verify_partial(&target, &q, 0, &mut rng(s), &mut more).unwrap() {
                Partial::Decided(v) => assert!(v.token == 1 || v.accepted),
                Partial::NeedFull => panic!("p at the draft is known"),
            }
            let mut none = || None;
            if verify_partial(&target, &q, 0, &mut rng(s), &mut none).is_err() {
                failed += 1;
            }
        }
        assert!(asked > 0 && failed > 0);
    }

    #[test]
    fn beta_is_exact_and_tv_a_lower_bound() {
        let p = [0.6, 0.3, 0.1];
        let q = [0.2, 0.2, 0.6];
        let full = PartialTarget {
            known: vec![(0, 0.6), (1, 0.3), (2, 0.1)],
            draws: vec![],
            complete: false,
        };
        let mut none = || None;
        let Partial::Decided(v) = verify_partial(&full, &q, 2, &mut rng(3), &mut none).unwrap()
        else {
            panic!("all of p is known");
        };
        let exact = verify(&p, &q, 2, &mut rng(3)).unwrap();
        assert_eq!(v.beta, exact.beta);
        assert!((v.tv_distance - exact.tv_distance).abs() < 1e-6);
        let part = PartialTarget {
            known: vec![(0, 0.6)],
            draws: vec![(2, 0.1)],
            complete: false,
        };
        let mut more = || Some(vec![(0, 0.6)]);
        if let Ok(Partial::Decided(v)) = verify_partial(&part, &q, 2, &mut rng(3), &mut more) {
            assert_eq!(v.beta, exact.beta);
            assert!(v.tv_distance <= exact.tv_distance + 1e-6);
        }
    }

    #[test]
    fn a_complete_report_gives_zero_outside_it() {
        // A greedy target: all of p on token 2; a draft elsewhere is rejected for certain.
        let greedy = PartialTarget {
            known: vec![(2, 1.0)],
            draws: vec![],
            complete: true,
        };
        let q = [0.5, 0.3, 0.2];
        for s in 0..16 {
            let Partial::Decided(v) =
                verify_partial(&greedy, &q, 0, &mut rng(s), &mut || None).unwrap()
            else {
                panic!("a complete report always decides");
            };
            assert_eq!((v.token, v.accepted, v.beta), (2, false, 1.0));
        }
    }

    #[test]
    fn a_plain_draw_follows_p() {
        let p = [0.5, 0.2, 0.2, 0.1];
        let mut r = rng(11);
        let mut counts = [0u64; 4];
        let n = 100_000;
        for _ in 0..n {
            let target = report(&p, 1, 1, &mut r);
            let mut engine = rng(r.random());
            let mut more = || Some(report(&p, 0, 1, &mut engine).draws);
            let t = sample_partial(&target, &mut r, &mut more).unwrap();
            counts[t as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            assert!((c as f64 / n as f64 - f64::from(p[i])).abs() < 0.006);
        }
    }

    #[test]
    fn reports_that_cannot_be_probabilities_are_errors() {
        let q = [0.5, 0.5];
        for known in [
            vec![(0, 0.9), (1, 0.9)],
            vec![(0, f32::NAN)],
            vec![(0, -0.1)],
        ] {
            let t = PartialTarget {
                known,
                draws: vec![],
                complete: false,
            };
            assert!(verify_partial(&t, &q, 0, &mut rng(1), &mut || None).is_err());
        }
    }
}
