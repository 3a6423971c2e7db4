//! How unsure the SLM is about its draft, computed from the logits of the one forward pass that
//! produced the draft.
//!
//! The U-HLM paper perturbs the temperature: it draws `K` temperatures `theta_k ~ U(theta_min,
//! theta_max]`, samples one token at each, and reports the fraction that differ from the draft.
//! That estimator is noisy and random. Its expectation has a closed form,
//! `u = 1 - E_theta[softmax(z / theta)_d]`, a smooth one-dimensional integral that we compute by
//! Gauss-Legendre quadrature: same meaning, zero sampling noise, no RNG. It is the default.

pub mod combined;
mod normaliser;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use combined::LogisticCombiner;
use normaliser::TemperatureNormaliser;

/// An uncertainty estimator: maps one position's logits and the drafted token to `u` in `[0, 1]`.
///
/// Implementations keep reusable buffers, so calling it per token allocates nothing once warm.
pub trait UncertaintyEstimator: Send {
    /// A short stable name, used in calibration files and reports.
    fn name(&self) -> &'static str;
    /// The uncertainty of `draft` given the SLM's raw `logits`. Returns 1.0 (maximally unsure)
    /// when the logits have no finite value.
    fn estimate(&mut self, logits: &[f32], draft: u32) -> f32;

    /// The uncertainty of each of `drafts` at one position, into `out` (same order). Estimators
    /// that normalise over the whole vocabulary share that work between the drafts; each
    /// value has the distribution [`estimate`](Self::estimate) would give it.
    fn estimate_many(&mut self, logits: &[f32], drafts: &[u32], out: &mut Vec<f32>) {
        out.clear();
        for &d in drafts {
            out.push(self.estimate(logits, d));
        }
    }

    /// The separate signals behind the last [`estimate`](Self::estimate) of a combined
    /// predictor, which the policy refits from; empty for a single signal.
    fn signals(&self) -> &[f32] {
        &[]
    }

    /// Replaces a combined predictor's weights with the policy's online refit; single signals
    /// have none and ignore it.
    fn set_combiner(&mut self, _combiner: &LogisticCombiner) {}
}

/// Serialisable choice of estimator, as found in configs and calibration files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UncertaintyKind {
    /// The paper's Monte-Carlo temperature perturbation.
    TemperaturePerturbation {
        samples: u32,
        theta_min: f32,
        theta_max: f32,
        seed: u64,
    },
    /// The exact expectation of the paper's estimator, by quadrature (default).
    ExpectedTemperature {
        theta_min: f32,
        theta_max: f32,
        /// Number of quadrature panels; each uses 4 Gauss-Legendre nodes.
        panels: u32,
    },
    /// `1 - max_x q_x` at temperature 1.
    MaxProbability,
    /// Entropy of the softmax at temperature 1, divided by `ln(vocab)`.
    Entropy,
    /// `1 - (q_top1 - q_top2)` at temperature 1.
    Margin,
    /// A predicted rejection probability: a logistic combination of other signals
    /// ([`combined`]), whose weights the device refits online from the server's verdicts.
    Combined {
        signals: Vec<UncertaintyKind>,
        combiner: LogisticCombiner,
    },
}

impl Default for UncertaintyKind {
    fn default() -> Self {
        Self::ExpectedTemperature {
            theta_min: 0.05,
            theta_max: 2.0,
            panels: 8,
        }
    }
}

impl UncertaintyKind {
    /// The paper's Monte-Carlo estimator with its defaults (K = 20, theta in (0.05, 2]).
    pub fn paper(seed: u64) -> Self {
        Self::TemperaturePerturbation {
            samples: 20,
            theta_min: 0.05,
            theta_max: 2.0,
            seed,
        }
    }

    /// Every estimator with default parameters, for calibration runs that compare them.
    pub fn all(seed: u64) -> Vec<Self> {
        vec![
            Self::default(),
            Self::paper(seed),
            Self::MaxProbability,
            Self::Entropy,
            Self::Margin,
        ]
    }

    /// The deterministic signals a combined predictor is built from (the Monte-Carlo one is a
    /// noisy copy of the closed form).
    pub fn combinable() -> Vec<Self> {
        vec![
            Self::default(),
            Self::MaxProbability,
            Self::Entropy,
            Self::Margin,
        ]
    }

    /// Checks parameter ranges.
    pub fn validate(&self) -> Result<(), String> {
        let temps = |lo: f32, hi: f32| {
            if lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > lo {
                Ok(())
            } else {
                Err(format!(
                    "temperature range must satisfy 0 < theta_min < theta_max, got ({lo}, {hi}]"
                ))
            }
        };
        match *self {
            Self::TemperaturePerturbation {
                samples,
                theta_min,
                theta_max,
                ..
            } => {
                if samples == 0 {
                    return Err("samples must be at least 1".into());
                }
                temps(theta_min, theta_max)
            }
            Self::ExpectedTemperature {
                theta_min,
                theta_max,
                panels,
            } => {
                if panels == 0 {
                    return Err("panels must be at least 1".into());
                }
                temps(theta_min, theta_max)
            }
            Self::Combined {
                ref signals,
                ref combiner,
            } => {
                if signals.is_empty() || signals.len() != combiner.weights.len() {
                    return Err(format!(
                        "a combined predictor needs one weight per signal, got {} signals and \
                         {} weights",
                        signals.len(),
                        combiner.weights.len()
                    ));
                }
                if !combiner.bias.is_finite() || combiner.weights.iter().any(|w| !w.is_finite()) {
                    return Err("combined predictor weights must be finite".into());
                }
                for s in signals {
                    if matches!(s, Self::Combined { .. }) {
                        return Err("a combined predictor cannot contain another".into());
                    }
                    s.validate()?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Builds the estimator.
    pub fn build(&self) -> Box<dyn UncertaintyEstimator> {
        match *self {
            Self::TemperaturePerturbation {
                samples,
                theta_min,
                theta_max,
                seed,
            } => Box::new(TemperaturePerturbation::new(
                samples, theta_min, theta_max, seed,
            )),
            Self::ExpectedTemperature {
                theta_min,
                theta_max,
                panels,
            } => Box::new(ExpectedTemperature::new(theta_min, theta_max, panels)),
            Self::MaxProbability => Box::new(MaxProbability::default()),
            Self::Entropy => Box::new(Entropy::default()),
            Self::Margin => Box::new(Margin::default()),
            Self::Combined {
                ref signals,
                ref combiner,
            } => Box::new(Combined {
                parts: signals.iter().map(Self::build).collect(),
                combiner: combiner.clone(),
                last: Vec::with_capacity(signals.len()),
            }),
        }
    }
}

/// [`UncertaintyKind::Combined`]: every part's uncertainty, mapped to a predicted rejection
/// probability by the combiner.
pub struct Combined {
    parts: Vec<Box<dyn UncertaintyEstimator>>,
    combiner: LogisticCombiner,
    last: Vec<f32>,
}

impl UncertaintyEstimator for Combined {
    fn name(&self) -> &'static str {
        "combined"
    }

    fn estimate(&mut self, logits: &[f32], draft: u32) -> f32 {
        self.last.clear();
        for part in &mut self.parts {
            self.last.push(part.estimate(logits, draft));
        }
        self.combiner.score(&self.last)
    }

    fn signals(&self) -> &[f32] {
        &self.last
    }

    fn set_combiner(&mut self, combiner: &LogisticCombiner) {
        if combiner.weights.len() == self.parts.len() {
            self.combiner = combiner.clone();
        }
    }
}

/// Reusable buffers of the estimators that normalise over the vocabulary.
#[derive(Default)]
struct Scratch {
    normaliser: TemperatureNormaliser,
    /// Each draft's shifted logit (`None`: negligible or absent).
    shifts: Vec<Option<f32>>,
    /// Per draft: expected probability (quadrature) or differing samples (Monte Carlo).
    acc: Vec<f64>,
    /// The output buffer of a single [`UncertaintyEstimator::estimate`].
    single: Vec<f32>,
}

/// `softmax(z / theta)_d` given the normaliser at `theta`.
fn softmax_from(draft_shift: f32, theta: f32, total: f64) -> f64 {
    (((draft_shift / theta).exp()) as f64 / total).min(1.0)
}

/// The paper's estimator: `K` temperatures `theta_k ~ U(theta_min, theta_max]`, one token
/// sampled at each, `u = #{s_k != d} / K`.
///
/// Whether `s_k` equals `d` is a Bernoulli draw with probability `softmax(z/theta_k)_d`, so we
/// draw that Bernoulli directly: the same distribution of `u` as sampling whole tokens.
pub struct TemperaturePerturbation {
    samples: u32,
    theta_min: f32,
    theta_max: f32,
    rng: ChaCha8Rng,
    scratch: Scratch,
}

impl TemperaturePerturbation {
    pub fn new(samples: u32, theta_min: f32, theta_max: f32, seed: u64) -> Self {
        Self {
            samples,
            theta_min,
            theta_max,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Scratch::default(),
        }
    }
}

impl UncertaintyEstimator for TemperaturePerturbation {
    fn name(&self) -> &'static str {
        "temperature_perturbation"
    }

    fn estimate(&mut self, logits: &[f32], draft: u32) -> f32 {
        let mut out = std::mem::take(&mut self.scratch.single);
        self.estimate_many(logits, &[draft], &mut out);
        let u = out[0];
        self.scratch.single = out;
        u
    }

    /// One temperature draw per sample, shared by every draft: each draft still sees `K`
    /// independent temperatures and Bernoulli draws.
    fn estimate_many(&mut self, logits: &[f32], drafts: &[u32], out: &mut Vec<f32>) {
        out.clear();
        let Scratch {
            normaliser,
            shifts,
            acc,
            ..
        } = &mut self.scratch;
        if normaliser.build(logits, self.theta_max).is_none() {
            out.resize(drafts.len(), 1.0);
            return;
        }
        shifts.clear();
        shifts.extend(drafts.iter().map(|&d| normaliser.shift(logits, d)));
        acc.clear();
        acc.resize(drafts.len(), 0.0);
        for _ in 0..self.samples {
            // U(theta_min, theta_max]: 1 - U[0,1) lies in (0, 1].
            let theta = self.theta_min
                + (self.theta_max - self.theta_min) * (1.0 - self.rng.random::<f32>());
            let total = normaliser.normaliser(logits, theta);
            for (shift, differ) in shifts.iter().zip(acc.iter_mut()) {
                let p_d = shift.map_or(0.0, |s| softmax_from(s, theta, total));
                if self.rng.random::<f64>() >= p_d {
                    *differ += 1.0;
                }
            }
        }
        out.extend(acc.iter().map(|&n| (n / self.samples as f64) as f32));
    }
}

/// 4-point Gauss-Legendre nodes and weights on [-1, 1].
const GL4: [(f64, f64); 4] = [
    (-0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
    (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
];

/// `u = 1 - (1 / (theta_max - theta_min)) * integral of softmax(z/theta)_d over theta`,
/// by composite 4-point Gauss-Legendre quadrature. Deterministic.
pub struct ExpectedTemperature {
    /// (theta, weight) pairs, weights summing to 1.
    nodes: Vec<(f32, f64)>,
    theta_max: f32,
    scratch: Scratch,
}

impl ExpectedTemperature {
    pub fn new(theta_min: f32, theta_max: f32, panels: u32) -> Self {
        let panels = panels.max(1);
        let width = (theta_max - theta_min) as f64 / panels as f64;
        let mut nodes = Vec::with_capacity(4 * panels as usize);
        for i in 0..panels {
            let mid = theta_min as f64 + width * (i as f64 + 0.5);
            for (x, w) in GL4 {
                // Each panel's weights sum to 2; normalising by 2 * panels averages over theta.
                nodes.push(((mid + x * width / 2.0) as f32, w / (2.0 * panels as f64)));
            }
        }
        Self {
            nodes,
            theta_max,
            scratch: Scratch::default(),
        }
    }
}

impl UncertaintyEstimator for ExpectedTemperature {
    fn name(&self) -> &'static str {
        "expected_temperature"
    }

    fn estimate(&mut self, logits: &[f32], draft: u32) -> f32 {
        let mut out = std::mem::take(&mut self.scratch.single);
        self.estimate_many(logits, &[draft], &mut out);
        let u = out[0];
        self.scratch.single = out;
        u
    }

    /// One normaliser per quadrature node, shared by every draft.
    fn estimate_many(&mut self, logits: &[f32], drafts: &[u32], out: &mut Vec<f32>) {
        out.clear();
        let Scratch {
            normaliser,
            shifts,
            acc: expected,
            ..
        } = &mut self.scratch;
        if normaliser.build(logits, self.theta_max).is_none() {
            out.resize(drafts.len(), 1.0);
            return;
        }
        shifts.clear();
        shifts.extend(drafts.iter().map(|&d| normaliser.shift(logits, d)));
        expected.clear();
        expected.resize(drafts.len(), 0.0);
        for &(theta, w) in &self.nodes {
            let total = normaliser.normaliser(logits, theta);
            for (shift, e) in shifts.iter().zip(expected.iter_mut()) {
                if let Some(s) = shift {
                    *e += w * softmax_from(*s, theta, total);
                }
            }
        }
        out.extend(
            shifts
                .iter()
                .zip(expected.iter())
                .map(|(shift, e)| match shift {
                    Some(_) => (1.0 - e).clamp(0.0, 1.0) as f32,
                    None => 1.0,
                }),
        );
    }
}

/// Softmax at temperature 1 into `probs`; `false` when nothing is finite.
fn softmax_t1(logits: &[f32], probs: &mut Vec<f32>) -> bool {
    let Some(max) = crate::sampling::max_finite(logits) else {
        return false;
    };
    probs.clear();
    probs.resize(logits.len(), 0.0);
    crate::sampling::softmax_into(logits, max, 1.0, probs);
    true
}

/// `1 - max q`: how much mass the most likely token leaves to the others.
#[derive(Default)]
pub struct MaxProbability {
    probs: Vec<f32>,
}

impl UncertaintyEstimator for MaxProbability {
    fn name(&self) -> &'static str {
        "max_probability"
    }

    fn estimate(&mut self, logits: &[f32], _draft: u32) -> f32 {
        if !softmax_t1(logits, &mut self.probs) {
            return 1.0;
        }
        (1.0 - self.probs.iter().copied().fold(0.0, f32::max)).clamp(0.0, 1.0)
    }
}

/// Normalised Shannon entropy `H(q) / ln V`.
#[derive(Default)]
pub struct Entropy {
    probs: Vec<f32>,
}

impl UncertaintyEstimator for Entropy {
    fn name(&self) -> &'static str {
        "entropy"
    }

    fn estimate(&mut self, logits: &[f32], _draft: u32) -> f32 {
        if logits.len() < 2 || !softmax_t1(logits, &mut self.probs) {
            return 1.0;
        }
        let h: f64 = self
            .probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -(p as f64) * (p as f64).ln())
            .sum();
        (h / (logits.len() as f64).ln()).clamp(0.0, 1.0) as f32
    }
}

/// `1 - (q_top1 - q_top2)`: a small margin between the two best tokens means doubt.
#[derive(Default)]
pub struct Margin {
    probs: Vec<f32>,
}

impl UncertaintyEstimator for Margin {
    fn name(&self) -> &'static str {
        "margin"
    }

    fn estimate(&mut self, logits: &[f32], _draft: u32) -> f32 {
        if !softmax_t1(logits, &mut self.probs) {
            return 1.0;
        }
        let (mut first, mut second) = (0.0f32, 0.0f32);
        for &p in &self.probs {
            if p > first {
                second = first;
                first = p;
            } else if p > second {
                second = p;
            }
        }
        (1.0 - (first - second)).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confident_logits_give_low_uncertainty_for_the_top_token() {
        let mut logits = vec![0.0f32; 1000];
        logits[7] = 30.0;
        for kind in UncertaintyKind::all(3) {
            let mut e = kind.build();
            let u = e.estimate(&logits, 7);
            assert!(u < 0.05, "{}: {u}", e.name());
        }
        // Drafting anything but the top token is maximally surprising for the
        // draft-aware estimators.
        assert!(UncertaintyKind::default().build().estimate(&logits, 3) > 0.9);
        assert!(UncertaintyKind::paper(1).build().estimate(&logits, 3) > 0.9);
    }

    #[test]
    fn flat_logits_give_high_uncertainty() {
        let logits = vec![1.0f32; 500];
        for kind in UncertaintyKind::all(3) {
            let mut e = kind.build();
            let u = e.estimate(&logits, 0);
            assert!(u > 0.9, "{}: {u}", e.name());
        }
    }

    #[test]
    fn quadrature_matches_a_fine_riemann_sum() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32) * 0.7).collect();
        let draft = 5;
        let mut e = ExpectedTemperature::new(0.05, 2.0, 8);
        let u = e.estimate(&logits, draft);
        let n = 100_000;
        let mean: f64 = (0..n)
            .map(|i| exact_probability(&logits, draft, 0.05 + 1.95 * (i as f64 + 0.5) / n as f64))
            .sum::<f64>()
            / n as f64;
        assert!(
            (u as f64 - (1.0 - mean)).abs() < 1e-4,
            "{u} vs {}",
            1.0 - mean
        );
    }

    /// `softmax(z / theta)_d`, summed directly in f64.
    fn exact_probability(logits: &[f32], draft: u32, theta: f64) -> f64 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = logits
            .iter()
            .map(|&v| ((v as f64 - max) / theta).exp())
            .sum();
        ((logits[draft as usize] as f64 - max) / theta).exp() / z
    }

    /// The closed form computed the slow way: every quadrature node summed over the whole
    /// vocabulary in f64. The binned normaliser must stay within 1e-4 of it on a real-sized
    /// vocabulary, for confident and flat positions and for likely and unlikely drafts.
    #[test]
    fn closed_form_matches_the_direct_sum_on_a_large_vocabulary() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut e = ExpectedTemperature::new(0.05, 2.0, 8);
        let nodes = e.nodes.clone();
        for spread in [0.3f32, 2.0, 6.0] {
            let logits: Vec<f32> = (0..151_936)
                .map(|i| {
                    let g: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
                    if i % 9000 == 11 {
                        8.0 + 10.0 * rng.random::<f32>()
                    } else {
                        g * spread
                    }
                })
                .collect();
            let top = crate::sampling::argmax(&logits).unwrap();
            for draft in [top, 11, 9011, 5, 77_777] {
                let want = 1.0
                    - nodes
                        .iter()
                        .map(|&(theta, w)| w * exact_probability(&logits, draft, theta as f64))
                        .sum::<f64>();
                let got = e.estimate(&logits, draft) as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "spread {spread}, draft {draft}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn estimating_many_drafts_at_once_agrees_with_one_at_a_time() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 997) as f32) * 0.013)
            .collect();
        let drafts = [3u32, 996, 4999, 17, 5000];
        let mut e = ExpectedTemperature::new(0.05, 2.0, 8);
        let mut many = Vec::new();
        e.estimate_many(&logits, &drafts, &mut many);
        for (&d, &u) in drafts.iter().zip(&many) {
            assert_eq!(u, e.estimate(&logits, d), "draft {d}");
        }
        assert_eq!(
            many[4], 1.0,
            "an id outside the vocabulary is maximally uncertain"
        );
        // Monte Carlo: same mean as one-at-a-time estimates, over many positions' draws.
        let mut a = TemperaturePerturbation::new(20, 0.05, 2.0, 1);
        let mut b = TemperaturePerturbation::new(20, 0.05, 2.0, 2);
        let (mut sum_many, mut sum_one) = (vec![0.0f64; 4], vec![0.0f64; 4]);
        for _ in 0..400 {
            a.estimate_many(&logits, &drafts[..4], &mut many);
            for i in 0..4 {
                sum_many[i] += many[i] as f64;
                sum_one[i] += b.estimate(&logits, drafts[i]) as f64;
            }
        }
        for i in 0..4 {
            let (m, o) = (sum_many[i] / 400.0, sum_one[i] / 400.0);
            assert!((m - o).abs() < 0.02, "draft {}: {m} vs {o}", drafts[i]);
            let exact = 1.0 - e.estimate(&logits, drafts[i]) as f64;
            assert!(
                (1.0 - m - exact).abs() < 0.02,
                "draft {}: {m} vs exact",
                drafts[i]
            );
        }
    }

    #[test]
    fn non_finite_logits_are_maximally_uncertain() {
        for kind in UncertaintyKind::all(3) {
            assert_eq!(
                kind.build().estimate(&[f32::NAN, f32::NEG_INFINITY], 0),
                1.0
            );
        }
    }

    #[test]
    fn kinds_round_trip_through_json_and_validate() {
        for kind in UncertaintyKind::all(9) {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(
                serde_json::from_str::<UncertaintyKind>(&json).unwrap(),
                kind
            );
            assert!(kind.validate().is_ok());
        }
        let bad = UncertaintyKind::ExpectedTemperature {
            theta_min: 2.0,
            theta_max: 1.0,
            panels: 4,
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn a_combined_predictor_scores_its_parts_and_takes_new_weights() {
        let signals = UncertaintyKind::combinable();
        let combiner = LogisticCombiner {
            weights: vec![1.0, 0.5, -0.25, 0.0],
            bias: 0.3,
        };
        let kind = UncertaintyKind::Combined {
            signals: signals.clone(),
            combiner: combiner.clone(),
        };
        assert!(kind.validate().is_ok());
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(
            serde_json::from_str::<UncertaintyKind>(&json).unwrap(),
            kind
        );

        let logits: Vec<f32> = (0..300).map(|i| ((i * 17 % 23) as f32) * 0.4).collect();
        let mut e = kind.build();
        let u = e.estimate(&logits, 3);
        let parts: Vec<f32> = signals
            .iter()
            .map(|k| k.build().estimate(&logits, 3))
            .collect();
        assert_eq!(e.signals(), parts.as_slice());
        assert_eq!(u, combiner.score(&parts));
        let flipped = LogisticCombiner {
            weights: vec![-1.0, 0.0, 0.0, 0.0],
            bias: 0.0,
        };
        e.set_combiner(&flipped);
        assert_eq!(e.estimate(&logits, 3), flipped.score(&parts));
        // Weights of another shape are not this predictor's: ignored.
        e.set_combiner(&LogisticCombiner {
            weights: vec![1.0],
            bias: 0.0,
        });
        assert_eq!(e.estimate(&logits, 3), flipped.score(&parts));
        // A single signal has no parts.
        assert!(UncertaintyKind::Margin.build().signals().is_empty());

        let mut short = combiner.clone();
        short.weights.pop();
        let nested = UncertaintyKind::Combined {
            signals: vec![kind.clone()],
            combiner: LogisticCombiner {
                weights: vec![1.0],
                bias: 0.0,
            },
        };
        for bad in [
            UncertaintyKind::Combined {
                signals: signals.clone(),
                combiner: short,
            },
            nested,
            UncertaintyKind::Combined {
                signals,
                combiner: LogisticCombiner {
                    weights: vec![f64::NAN, 0.0, 0.0, 0.0],
                    bias: 0.0,
                },
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
