//! From logits to the distribution a system actually samples from.
//!
//! The device and the server must apply the *same* transformation (temperature, top-k, top-p) to
//! their own logits, otherwise verification would compare distributions of different processes.
//! Temperature 0 is greedy decoding, represented exactly as a one-hot distribution so that the
//! verification rule needs no special case.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::fast_exp;

/// Temperatures below this are greedy: dividing logits by a subnormal temperature overflows
/// (1e-45 made every probability NaN and picked token 0), and long before that the softmax is
/// an argmax in `f32`. vLLM draws the same line.
pub const GREEDY_BELOW: f32 = 1e-5;

/// Sampling options shared by every mode, the CLI, the FFI and the wire protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingOptions {
    /// Softmax temperature; `0.0` (anything below [`GREEDY_BELOW`]) means greedy (argmax,
    /// ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: no limit).
    pub top_k: Option<u32>,
    /// Keep the smallest set of most likely tokens whose mass reaches `p` (`None`: no limit).
    pub top_p: Option<f32>,
    /// Maximum number of generated tokens.
    pub max_tokens: u32,
    /// Seed of every random draw of a generation; `None` lets the caller pick one. The same
    /// seed gives the same tokens while the server answers (each position draws its own
    /// numbers, see [`seek_position`]); tokens decided offline follow the device's model.
    pub seed: Option<u64>,
    /// Generation stops once the text ends with one of these strings.
    pub stop: Vec<String>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: None,
            top_p: None,
            max_tokens: 128,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl SamplingOptions {
    /// Whether these options pick the most likely token (see [`GREEDY_BELOW`]).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }

    /// Greedy decoding with `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("top_p must be in (0, 1], got {p}"));
        }
        Ok(())
    }
}

/// Index of the largest finite logit; ties go to the lowest id. `None` when nothing is finite.
pub fn argmax(values: &[f32]) -> Option<u32> {
    // The maximum, then its first position: two passes that vectorise, instead of one that
    // branches on every element. `f32::max` ignores NaN.
    let max = lane_max(values, |x| x);
    values.iter().position(|&v| v == max).map(|i| i as u32)
}

/// The largest finite value (NaN and infinities ignored), `None` when there is none.
pub fn max_finite(values: &[f32]) -> Option<f32> {
    let max = lane_max(
        values,
        |x| if x.is_finite() { x } else { f32::NEG_INFINITY },
    );
    max.is_finite().then_some(max)
}

/// `max f(x)` over `values` (NaN ignored) with 8 independent lanes, so that it vectorises.
#[inline(always)]
fn lane_max(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(f(x));
        }
    }
    chunks
        .remainder()
        .iter()
        .map(|&x| f(x))
        .chain(lanes)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `out = softmax((logits − max) · inv_t)`, with `max` the largest finite logit and `out`
/// already as long as `logits`. NaN and -inf logits get probability 0.
pub(crate) fn softmax_into(logits: &[f32], max: f32, inv_t: f32, out: &mut [f32]) {
    let sum = fast_exp::map_sum(logits, out, |z| fast_exp::exp((z - max) * inv_t));
    let inv = (1.0 / sum) as f32;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Writes into `out` the distribution that `opts` makes of `logits`.
///
/// `scratch` is a reusable index buffer, so the per-token path allocates nothing once warm.
/// Logits that are NaN or `-inf` get probability zero. Returns `false` when no logit is usable
/// (then `out` is all zeros).
pub fn probabilities_into(
    logits: &[f32],
    opts: &SamplingOptions,
    out: &mut Vec<f32>,
    scratch: &mut Vec<u32>,
) -> bool {
    out.clear();
    out.resize(logits.len(), 0.0);
    let Some(best) = argmax(logits) else {
        return false;
    };
    if opts.is_greedy() || !logits[best as usize].is_finite() {
        out[best as usize] = 1.0;
        return true;
    }
    softmax_into(logits, logits[best as usize], 1.0 / opts.temperature, out);
    let top_k = opts.top_k.map(|k| k as usize).filter(|&k| k < logits.len());
    let top_p = opts.top_p.filter(|&p| p < 1.0);
    if top_k.is_none() && top_p.is_none() {
        return true;
    }
    // Rank candidate ids by probability (descending, ties by id) and keep the allowed prefix.
    scratch.clear();
    scratch.extend(0..logits.len() as u32);
    let by_prob_desc =
        |a: &u32, b: &u32| out[*b as usize].total_cmp(&out[*a as usize]).then(a.cmp(b));
    let k = top_k.unwrap_or(logits.len());
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, by_prob_desc);
        scratch.truncate(k);
    }
    scratch.sort_unstable_by(by_prob_desc);
    let mut keep = scratch.len();
    if let Some(p) = top_p {
        let mut acc = 0.0f64;
        for (i, &id) in scratch.iter().enumerate() {
            acc += out[id as usize] as f64;
            if acc >= p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    scratch.truncate(keep);
    let kept_mass: f64 = scratch.iter().map(|&id| out[id as usize] as f64).sum();
    let inv = 1.0 / kept_mass;
    // Keep the renormalised probabilities (as bits, behind the ids) while `out` is zeroed.
    let n = scratch.len();
    for i in 0..n {
        let id = scratch[i] as usize;
        scratch.push(((out[id] as f64 * inv) as f32).to_bits());
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for i in 0..n {
        out[scratch[i] as usize] = f32::from_bits(scratch[n + i]);
    }
    true
}

/// Samples an id from a normalised distribution by inverse CDF. Only ids with positive
/// probability can come out, whatever the rounding of the running sum.
pub fn sample<R: Rng + ?Sized>(probs: &[f32], rng: &mut R) -> u32 {
    let total: f64 = probs.iter().map(|&p| p.max(0.0) as f64).sum();
    let target = rng.random::<f64>() * total;
    let mut acc = 0.0f64;
    let mut last_positive = 0u32;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p as f64;
            last_positive = i as u32;
            if target < acc {
                return i as u32;
            }
        }
    }
    last_positive
}

/// Words of a ChaCha stream reserved for each position: a verdict takes at most four (an
/// acceptance draw and a residual sample, two words each), a draft two.
const WORDS_PER_POSITION: u128 = 16;

/// Moves `rng` to the draws reserved for the token at `position`. Each token's random numbers
/// are then a function of the seed and its position alone, not of how many were drawn before:
/// a hybrid generation comes out the same from its seed however many drafts were made and
/// discarded while a verdict travelled, and however many requests were retried. Draws of
/// different positions never overlap, so each is as independent as sequential draws.
pub fn seek_position(rng: &mut ChaCha8Rng, position: usize) {
    rng.set_word_pos(position as u128 * WORDS_PER_POSITION);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_positions_draws_do_not_depend_on_the_draws_before_them() {
        let draw = |skipped: usize, position: usize| {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            for _ in 0..skipped {
                rng.random::<f64>();
            }
            seek_position(&mut rng, position);
            (rng.random::<f64>(), rng.random::<f64>())
        };
        assert_eq!(draw(0, 3), draw(7, 3));
        assert_eq!(draw(40, 3), draw(1, 3));
        assert_ne!(draw(0, 3), draw(0, 4));
        // A position's draws stay inside its words: the next position starts after them.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        seek_position(&mut rng, 4);
        let next = rng.random::<f64>();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        seek_position(&mut rng, 3);
        let within: Vec<f64> = (0..4).map(|_| rng.random::<f64>()).collect();
        assert!(!within.contains(&next));
    }

    fn probs(logits: &[f32], opts: &SamplingOptions) -> Vec<f32> {
        let mut out = Vec::new();
        assert!(probabilities_into(logits, opts, &mut out, &mut Vec::new()));
        out
    }

    #[test]
    fn greedy_is_one_hot_with_ties_to_lowest_id() {
        let p = probs(&[1.0, 3.0, 3.0, -2.0], &SamplingOptions::greedy(1));
        assert_eq!(p, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn a_subnormal_temperature_is_greedy() {
        let logits = [0.5f32, 3.0, 2.9, -1.0];
        let (mut probs, mut scratch) = (Vec::new(), Vec::new());
        for t in [1e-45f32, 1e-30, 1e-6] {
            let opts = SamplingOptions {
                temperature: t,
                ..SamplingOptions::default()
            };
            assert!(opts.is_greedy());
            assert!(probabilities_into(&logits, &opts, &mut probs, &mut scratch));
            assert_eq!(probs, [0.0, 1.0, 0.0, 0.0], "temperature {t}");
        }
        let warm = SamplingOptions {
            temperature: 1e-4,
            ..SamplingOptions::default()
        };
        assert!(!warm.is_greedy());
        assert!(probabilities_into(&logits, &warm, &mut probs, &mut scratch));
        assert!(probs.iter().all(|p| p.is_finite()));
    }

    #[test]
    fn temperature_softmax_sums_to_one_and_orders() {
        let opts = SamplingOptions {
            temperature: 0.5,
            ..Default::default()
        };
        let p = probs(&[0.0, 1.0, 2.0, f32::NEG_INFINITY], &opts);
        let s: f32 = p.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0] && p[3] == 0.0);
        // exp(2*(1-2)) / exp(0) ratio check
        assert!((p[1] / p[2] - (-2.0f32).exp()).abs() < 1e-5);
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_sets() {
        let logits = [4.0, 3.0, 2.0, 1.0, 0.0];
        let k2 = probs(
            &logits,
            &SamplingOptions {
                temperature: 1.0,
                top_k: Some(2),
                ..Default::default()
            },
        );
        assert!(k2[0] > 0.0 && k2[1] > 0.0 && k2[2..].iter().all(|&p| p == 0.0));
        assert!((k2.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let p = probs(
            &logits,
            &SamplingOptions {
                temperature: 1.0,
                top_p: Some(0.7),
                ..Default::default()
            },
        );
        // softmax: 0.636, 0.234, ... → the first two reach 0.7.
        assert!(p[0] > 0.0 && p[1] > 0.0 && p[2..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn sample_never_returns_zero_probability_ids() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let p = [0.0, 0.25, 0.0, 0.75, 0.0];
        for _ in 0..10_000 {
            let t = sample(&p, &mut rng);
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn nothing_finite_is_reported() {
        let mut out = Vec::new();
        assert!(!probabilities_into(
            &[f32::NAN, f32::NAN],
            &SamplingOptions::default(),
            &mut out,
            &mut Vec::new()
        ));
        assert_eq!(argmax(&[f32::NAN]), None);
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(
            SamplingOptions {
                temperature: -1.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingOptions {
                top_p: Some(0.0),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(SamplingOptions::default().validate().is_ok());
    }
}
