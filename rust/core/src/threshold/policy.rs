//! The device's runtime threshold policy: decides per token whether to skip, send or probe,
//! and refits its threshold (and a combined predictor's weights) from the server's verdicts.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::calibration_file::Calibration;
use super::error::ThresholdError;
use super::fit::{LinearFit, target_risk_weighted, weighted_fit};
use super::mode::{ThresholdMode, check_quality};
use crate::risk_control::{
    RiskControlled, controlled_threshold_weighted, excess_p_value, min_certifying_samples,
    weighted_risk,
};
use crate::sample::WeightedSample;
use crate::uncertainty::UncertaintyKind;
use crate::uncertainty::combined::{LogisticCombiner, Verdict, refit_at_equal_skip};

/// Verdicts in the window before a combined predictor's weights are refitted: half fit the
/// weights and half judge them, so each half needs enough rejections to say anything.
const COMBINER_MIN_VERDICTS: usize = 256;

/// Parameters of the runtime threshold policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    pub mode: ThresholdMode,
    /// Threshold used until `min_samples` verdicts arrive, unless a calibration sets one.
    ///
    /// Under [`ThresholdMode::Quality`] this is a guess outside the guarantee: it holds only
    /// until the first refit, where the bound replaces it (with 0 — send everything — while
    /// the window is too small to certify anything). Set it from a shipped calibration's
    /// `quality` threshold, or to 0 to be strict from the first token. A threshold from
    /// [`ThresholdPolicy::with_calibration`] is evidence and is kept until the window can
    /// certify on its own or shows it unsafe.
    pub initial_threshold: f32,
    /// Refit from the server's verdicts while generating.
    pub online: bool,
    /// Fraction of below-threshold tokens still sent, so the fit also sees confident tokens.
    pub probe_rate: f32,
    /// Per-observation decay of older samples' weight (exponential forgetting).
    pub forgetting: f32,
    /// Most recent observations kept for refitting.
    pub window: usize,
    /// Observations needed before the first refit.
    pub min_samples: usize,
    /// Refit after this many new observations.
    pub refit_every: usize,
    /// With a combined predictor ([`UncertaintyKind::Combined`]), also refit its weights from
    /// the verdicts (see [`crate::uncertainty::combined::refit_at_equal_skip`]).
    pub refit_combiner: bool,
    pub seed: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            mode: ThresholdMode::output_quality(),
            // A guess (the target-risk threshold, epsilon 0.1, measured on the SmolLM2 pair was
            // 0.42): it only lasts until the first refit (`min_samples` verdicts), where the
            // bound takes over, and the bound alone cannot certify a per-output target within
            // a window; a calibration (`uhlm calibrate`) replaces it and is kept.
            initial_threshold: 0.4,
            online: true,
            probe_rate: 0.05,
            forgetting: 0.995,
            window: 1024,
            min_samples: 32,
            refit_every: 16,
            refit_combiner: true,
            seed: 0,
        }
    }
}

impl PolicyConfig {
    /// Verify every token (the papers' HLM baseline).
    pub fn send_all() -> Self {
        Self {
            mode: ThresholdMode::Fixed { u_th: 0.0 },
            initial_threshold: 0.0,
            online: false,
            probe_rate: 0.0,
            ..Self::default()
        }
    }

    /// A fixed threshold without recalibration.
    pub fn fixed(u_th: f32) -> Self {
        Self {
            mode: ThresholdMode::Fixed { u_th },
            initial_threshold: u_th,
            online: false,
            probe_rate: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), ThresholdError> {
        let bad = |m: &str| Err(ThresholdError::InvalidParameter(m.into()));
        if !(0.0..=1.0).contains(&self.probe_rate) {
            return bad("probe_rate must be in [0, 1]");
        }
        if !(self.forgetting > 0.0 && self.forgetting <= 1.0) {
            return bad("forgetting must be in (0, 1]");
        }
        if self.window < 2 || self.refit_every == 0 {
            return bad("window must be >= 2 and refit_every >= 1");
        }
        match self.mode {
            ThresholdMode::TargetRisk { epsilon } if !(0.0..=1.0).contains(&epsilon) => {
                return bad("epsilon must be in [0, 1]");
            }
            ThresholdMode::Quality {
                max_risk,
                confidence,
            } => check_quality(max_risk, confidence)?,
            ThresholdMode::OutputQuality {
                max_risk,
                confidence,
                tokens_per_output,
            } => {
                check_quality(max_risk, confidence)?;
                if tokens_per_output == 0 {
                    return bad("tokens_per_output must be at least 1");
                }
            }
            _ => {}
        }
        // Without probes the window holds only sent tokens, so the risk of the skipped ones
        // would be estimated as zero.
        if self.mode.token_risk().is_some() && self.online && self.probe_rate <= 0.0 {
            return bad("online quality mode needs probe_rate > 0");
        }
        if !self.initial_threshold.is_finite() {
            return bad("initial_threshold must be finite");
        }
        Ok(())
    }
}

/// What to do with one drafted token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep the draft locally; nothing goes uplink.
    Skip,
    /// Send for verification. `probe` marks a below-threshold token sent only to keep the
    /// online fit unbiased.
    Send { probe: bool },
}

#[derive(Clone, Debug)]
struct Observation {
    u: f32,
    /// The combined predictor's separate signals (empty for a single signal).
    signals: Box<[f32]>,
    beta: f32,
    /// Inverse probability of having been observed: probes stand for the skipped tokens.
    importance: f64,
}

/// The device's threshold policy: decides per token, learns from verdicts.
pub struct ThresholdPolicy {
    config: PolicyConfig,
    u_th: f32,
    rng: ChaCha8Rng,
    window: VecDeque<Observation>,
    since_refit: usize,
    last_fit: Option<LinearFit>,
    /// Whether `u_th` rests on evidence (0, a calibration, or a passed bound) rather than on
    /// `initial_threshold`; only [`ThresholdMode::Quality`] refits look at it.
    evidenced: bool,
    /// The threshold a shipped calibration gave: dropped when the stream shows it unsafe, put
    /// back when the window no longer does.
    calibrated: Option<f32>,
    last_control: Option<RiskControlled>,
    scratch: Vec<WeightedSample>,
    /// The combined predictor's weights in force, when the estimator is one.
    combiner: Option<LogisticCombiner>,
    /// Weights adopted by a refit that the estimator has not taken yet.
    combiner_update: Option<LogisticCombiner>,
}

impl ThresholdPolicy {
    pub fn new(config: PolicyConfig) -> Result<Self, ThresholdError> {
        config.validate()?;
        let u_th = match config.mode {
            ThresholdMode::Fixed { u_th } => u_th,
            _ => config.initial_threshold,
        };
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            u_th,
            window: VecDeque::with_capacity(config.window),
            since_refit: 0,
            last_fit: None,
            evidenced: u_th <= 0.0,
            calibrated: None,
            last_control: None,
            scratch: Vec::new(),
            combiner: None,
            combiner_update: None,
            config,
        })
    }

    /// The policy of an estimator of kind `kind`: a combined predictor's weights are refitted
    /// online (unless [`PolicyConfig::refit_combiner`] is off).
    pub fn for_estimator(mut self, kind: &UncertaintyKind) -> Self {
        self.combiner = match kind {
            UncertaintyKind::Combined { combiner, .. } => Some(combiner.clone()),
            _ => None,
        };
        self
    }

    /// The combined predictor's weights in force, if the estimator is one.
    pub fn combiner(&self) -> Option<&LogisticCombiner> {
        self.combiner.as_ref()
    }

    /// Weights a refit adopted since the last call: the estimator must take them
    /// ([`crate::uncertainty::UncertaintyEstimator::set_combiner`]) before its next estimate,
    /// since the threshold in force is now on their scale.
    pub fn take_combiner_update(&mut self) -> Option<LogisticCombiner> {
        self.combiner_update.take()
    }

    /// Starts from a shipped calibration's threshold for the configured mode.
    pub fn with_calibration(
        config: PolicyConfig,
        calibration: &Calibration,
    ) -> Result<Self, ThresholdError> {
        let mut policy = Self::new(config)?.for_estimator(&calibration.estimator);
        policy.u_th = calibration.threshold(&policy.config.mode);
        policy.last_fit = Some(calibration.fit);
        policy.evidenced = true;
        policy.calibrated = Some(policy.u_th);
        Ok(policy)
    }

    /// The threshold in force.
    pub fn threshold(&self) -> f32 {
        self.u_th
    }

    /// The latest online fit, if any.
    pub fn fit(&self) -> Option<LinearFit> {
        self.last_fit
    }

    /// The latest online risk-controlled threshold ([`ThresholdMode::Quality`] only), whether
    /// or not it was put in force.
    pub fn risk_control(&self) -> Option<RiskControlled> {
        self.last_control
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Skip or send a token of uncertainty `u`.
    pub fn decide(&mut self, u: f32) -> Decision {
        if u >= self.u_th {
            return Decision::Send { probe: false };
        }
        if self.config.online
            && self.config.probe_rate > 0.0
            && self.rng.random::<f32>() < self.config.probe_rate
        {
            return Decision::Send { probe: true };
        }
        Decision::Skip
    }

    /// Learns from a server verdict for a token that was sent after `decide` said `decision`.
    pub fn observe(&mut self, decision: Decision, u: f32, beta: f32) {
        self.observe_signals(decision, u, &[], beta);
    }

    /// [`observe`](Self::observe) for a combined predictor: `signals` are its separate
    /// signals for the token ([`crate::uncertainty::UncertaintyEstimator::signals`]).
    pub fn observe_signals(&mut self, decision: Decision, u: f32, signals: &[f32], beta: f32) {
        if !self.config.online || !u.is_finite() || !beta.is_finite() {
            return;
        }
        // Horvitz–Thompson: each token enters the window with probability 1 (sent) or
        // probe_rate (a probe, standing for the skipped tokens), so it is weighted by the
        // inverse. A skipped token is not part of that design: a verdict for it would
        // over-represent the skipped region, so it is ignored.
        let importance = match decision {
            Decision::Send { probe: true } => 1.0 / self.config.probe_rate as f64,
            Decision::Send { probe: false } => 1.0,
            Decision::Skip => return,
        };
        if self.window.len() == self.config.window {
            self.window.pop_front();
        }
        self.window.push_back(Observation {
            u,
            signals: signals.into(),
            beta: beta.clamp(0.0, 1.0),
            importance,
        });
        self.since_refit += 1;
        if self.window.len() >= self.config.min_samples
            && self.since_refit >= self.config.refit_every
        {
            self.refit();
        }
    }

    /// Refits from the window: weights are importance × forgetting^age.
    fn refit(&mut self) {
        self.since_refit = 0;
        let n = self.window.len();
        let lambda = self.config.forgetting as f64;
        self.scratch.clear();
        let mut decay = 1.0;
        for (age, o) in self.window.iter().rev().enumerate() {
            if age > 0 {
                decay *= lambda;
            }
            self.scratch.push(WeightedSample {
                u: o.u,
                beta: o.beta,
                weight: o.importance * decay,
            });
        }
        debug_assert_eq!(self.scratch.len(), n);
        self.refit_combiner();
        let fit = weighted_fit(
            self.scratch
                .iter()
                .map(|s| (s.u as f64, s.beta as f64, s.weight)),
        )
        .ok();
        if fit.is_some() {
            self.last_fit = fit;
        }
        let new_th = match self.config.mode {
            ThresholdMode::Fixed { u_th } => Some(u_th),
            ThresholdMode::RiskAverse => fit.and_then(|f| f.risk_averse().ok()).map(|t| t as f32),
            ThresholdMode::RiskProne => {
                let total: f64 = self.scratch.iter().map(|p| p.weight).sum();
                let rejected: f64 = self
                    .scratch
                    .iter()
                    .filter(|p| p.beta > 0.0)
                    .map(|p| p.weight)
                    .sum();
                let delta = if total > 0.0 { rejected / total } else { 0.0 };
                fit.and_then(|f| f.risk_prone(delta).ok()).map(|t| t as f32)
            }
            ThresholdMode::TargetRisk { epsilon } => {
                Some(target_risk_weighted(&mut self.scratch, epsilon as f64))
            }
            ThresholdMode::Quality { .. } | ThresholdMode::OutputQuality { .. } => {
                let (max_risk, confidence) = self.config.mode.token_risk().expect("a quality mode");
                self.quality_refit(max_risk as f64, 1.0 - confidence as f64)
            }
        };
        if let Some(t) = new_th.filter(|t| t.is_finite()) {
            self.u_th = t;
        }
    }

    /// Refits a combined predictor's weights at the skip share in force (see
    /// [`refit_at_equal_skip`]); adopted weights rescore the window, whose scores (and the
    /// threshold) are on the new scale from here on.
    fn refit_combiner(&mut self) {
        let Some(current) = self.combiner.clone() else {
            return;
        };
        if !self.config.refit_combiner
            || matches!(self.config.mode, ThresholdMode::Fixed { .. })
            || self.window.len() < COMBINER_MIN_VERDICTS
        {
            return;
        }
        // Newest first, as the scratch weights are.
        let verdicts: Vec<Verdict<'_>> = self
            .window
            .iter()
            .rev()
            .zip(&self.scratch)
            .map(|(o, s)| Verdict {
                signals: &o.signals,
                beta: o.beta,
                weight: s.weight,
            })
            .collect();
        let Some((next, u_th)) = refit_at_equal_skip(&current, self.u_th, &verdicts) else {
            return;
        };
        for (o, s) in self.window.iter_mut().rev().zip(self.scratch.iter_mut()) {
            o.u = next.score(&o.signals);
            s.u = o.u;
        }
        // A calibration in force moves to the new scale with the threshold; one dropped for
        // now was on the old scale and cannot come back.
        self.calibrated = self.calibrated.filter(|&c| c == self.u_th).map(|_| u_th);
        self.u_th = u_th;
        self.combiner_update = Some(next.clone());
        self.combiner = Some(next);
    }

    /// The online bound over the importance-weighted window (approximate, see
    /// [`controlled_threshold_weighted`]; it also assumes the stream is stationary over the
    /// window's memory).
    ///
    /// The bound replaces the threshold in force when (a) the window is large enough to
    /// certify any skipping (`n_eff` at least [`min_certifying_samples`]), or (b) the threshold
    /// in force is only `initial_threshold`, a guess, or (c) the window shows with the same
    /// confidence that the threshold in force exceeds `max_risk`. Otherwise a calibrated or
    /// previously certified threshold stays: a window too small to certify anything says
    /// nothing against it, and dropping it would throw a calibration away after a few dozen
    /// verdicts, and make the policy oscillate as probes (weight `1/probe_rate`) shrink `n_eff`
    /// whenever it skips. A calibrated threshold dropped under (c) comes back once the window
    /// no longer shows it unsafe.
    fn quality_refit(&mut self, alpha: f64, delta: f64) -> Option<f32> {
        let current_risk = weighted_risk(&self.scratch, self.u_th);
        let control = controlled_threshold_weighted(&mut self.scratch, alpha, delta).ok()?;
        self.last_control = Some(control);
        let informative = control.n_eff >= min_certifying_samples(alpha, delta);
        let unsafe_now = excess_p_value(current_risk, control.n_eff, alpha) <= delta;
        if informative || !self.evidenced || unsafe_now {
            self.evidenced = true;
            return Some(control.u_th);
        }
        // A calibration dropped for a stretch that showed it unsafe (a few rejected probes)
        // comes back once the window, now mostly fully observed tokens, no longer does: a
        // window that cannot certify anything would otherwise keep it at 0 for good.
        let calibrated = self.calibrated.filter(|&c| c > self.u_th)?;
        let risk = weighted_risk(&self.scratch, calibrated);
        (excess_p_value(risk, control.n_eff, alpha) > delta).then_some(calibrated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_all_never_skips_and_fixed_is_strict() {
        let mut all = ThresholdPolicy::new(PolicyConfig::send_all()).unwrap();
        assert!((0..100).all(|i| all.decide(i as f32 / 100.0) != Decision::Skip));
        let mut fixed = ThresholdPolicy::new(PolicyConfig::fixed(0.5)).unwrap();
        assert_eq!(fixed.decide(0.49), Decision::Skip);
        assert_eq!(fixed.decide(0.5), Decision::Send { probe: false });
    }

    /// A world where beta = 0.8·u − 0.05 (clamped): the online policy should converge to the
    /// threshold that holds skipped-token risk at epsilon, starting far away, while probing.
    #[test]
    fn online_target_risk_converges_with_unbiased_probes() {
        let cfg = PolicyConfig {
            mode: ThresholdMode::TargetRisk { epsilon: 0.1 },
            initial_threshold: 0.9,
            window: 4096,
            forgetting: 1.0,
            ..PolicyConfig::default()
        };
        let mut policy = ThresholdPolicy::new(cfg).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (mut probes, mut skipped) = (0, 0);
        for _ in 0..40_000 {
            let u: f32 = rng.random();
            let beta = (0.8 * u - 0.05).clamp(0.0, 1.0);
            match policy.decide(u) {
                Decision::Skip => skipped += 1,
                d @ Decision::Send { probe } => {
                    probes += probe as usize;
                    policy.observe(d, u, beta);
                }
            }
        }
        // Mean beta over u < t is (0.4 t^2 - 0.05 t + 0.05^2/1.6)/t for t > 1/16 → 0.1 at t ≈ 0.364.
        let t = policy.threshold();
        assert!((t - 0.364).abs() < 0.03, "threshold {t}");
        assert!(probes > 100 && skipped > 10_000);
        let f = policy.fit().unwrap();
        assert!(f.a > 0.5, "fit {f:?}");
    }

    #[test]
    fn invalid_policy_configs_are_rejected() {
        let bad = PolicyConfig {
            probe_rate: 2.0,
            ..PolicyConfig::default()
        };
        assert!(ThresholdPolicy::new(bad).is_err());
    }
}
