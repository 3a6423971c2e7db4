//! When is a token uncertain enough to be worth sending?
//!
//! The U-HLM paper observes that the rejection probability `beta` of a draft grows roughly
//! linearly with the SLM's uncertainty `u`, fits `beta ≈ a·u + b`, and skips the uplink when `u`
//! is below a threshold: risk-averse `u_th = -b/a` (where the fit predicts no rejection) or
//! risk-prone `u_th = (Δ - b)/a`. We add a target-risk threshold (the largest `u_th` whose skipped
//! tokens have mean `beta <= ε`) and online recalibration from the server's verdicts.
//!
//! Those are point estimates of the wrong quantity, kept as baselines. The quality modes bound
//! a risk with confidence, via [`crate::risk_control`]: [`ThresholdMode::OutputQuality`] (the
//! default) the share of whole outputs that differ from what the LLM alone would have written,
//! from a calibration; [`ThresholdMode::Quality`] the risk per generated token
//! `E[1{u < u_th}·beta]`, which the device can also certify online.
//!
//! A token is skipped when `u < u_th`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use thiserror::Error;

use crate::risk_control::{
    RiskControlError, RiskControlled, WeightedSample, controlled_threshold,
    controlled_threshold_per_output, controlled_threshold_weighted, excess_p_value,
    min_certifying_samples, weighted_risk,
};
use crate::uncertainty::UncertaintyKind;
use crate::uncertainty::combined::{LogisticCombiner, Verdict, refit_at_equal_skip};

/// Default [`ThresholdMode::Quality`] `max_risk`: at most 1% of generated tokens may differ in
/// distribution from the LLM's, i.e. about 99% of the LLM's quality.
pub const DEFAULT_MAX_RISK: f32 = 0.01;
/// Default [`ThresholdMode::OutputQuality`] `max_risk`: at most 10% of generations may differ
/// from what the LLM alone would have written.
pub const DEFAULT_MAX_OUTPUT_RISK: f32 = 0.1;
/// Default [`ThresholdMode::OutputQuality`] `tokens_per_output`, for the online per-token check.
pub const DEFAULT_TOKENS_PER_OUTPUT: u32 = 256;
/// Default [`ThresholdMode::Quality`] `confidence` (`1 − δ`): the bound holds for 9 in 10
/// calibrations. Higher confidence costs skips; 0.9 is the usual choice in risk control.
pub const DEFAULT_CONFIDENCE: f32 = 0.9;
/// Verdicts in the window before a combined predictor's weights are refitted: half fit the
/// weights and half judge them, so each half needs enough rejections to say anything.
const COMBINER_MIN_VERDICTS: usize = 256;

/// One calibration observation: the device's uncertainty and the server's rejection probability.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub u: f32,
    pub beta: f32,
}

/// Why a threshold could not be computed.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum ThresholdError {
    #[error("need at least {needed} samples to fit, got {got}")]
    TooFewSamples { needed: usize, got: usize },
    #[error("all uncertainties are equal, so beta cannot be fitted against them")]
    NoSpread,
    #[error("fitted slope a = {0} is not positive: uncertainty does not predict rejection")]
    NonPositiveSlope(f64),
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    #[error("calibration file: {0}")]
    Json(String),
    #[error(transparent)]
    RiskControl(#[from] RiskControlError),
}

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
fn weighted_fit(
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
fn target_risk_weighted(points: &mut [WeightedSample], epsilon: f64) -> f32 {
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

/// How the threshold is chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ThresholdMode {
    /// A fixed `u_th`, never refitted.
    Fixed { u_th: f32 },
    /// The paper's `-b/a`.
    RiskAverse,
    /// The paper's `(Δ - b)/a`.
    RiskProne,
    /// Largest `u_th` with mean skipped beta `<= epsilon` (a point estimate; a baseline).
    TargetRisk { epsilon: f32 },
    /// Largest `u_th` whose risk per generated token `E[1{u < u_th}·beta]` is at most
    /// `max_risk` with probability at least `confidence` over the calibration (see
    /// [`crate::risk_control`]). `max_risk` is the largest share of generated tokens that may
    /// differ in distribution from what the LLM alone would produce; with too little evidence
    /// the bound sends everything.
    Quality { max_risk: f32, confidence: f32 },
    /// Largest `u_th` such that at most `max_risk` of generations differ from what the LLM
    /// alone would have produced, with probability at least `confidence` over the calibration
    /// (a bound per output: [`crate::risk_control::controlled_threshold_per_output`]). The
    /// threshold comes from a calibration that has that bound
    /// ([`Calibration::with_output_quality`]). Online, verdicts are judged per token at
    /// `max_risk / tokens_per_output` (the union bound over an output's tokens, so stricter
    /// than the request): that can lower a threshold the stream shows unsafe, and certify one
    /// on its own given enough verdicts.
    OutputQuality {
        max_risk: f32,
        confidence: f32,
        tokens_per_output: u32,
    },
}

impl ThresholdMode {
    /// The default mode: [`ThresholdMode::OutputQuality`] at [`DEFAULT_MAX_OUTPUT_RISK`].
    pub fn output_quality() -> Self {
        ThresholdMode::OutputQuality {
            max_risk: DEFAULT_MAX_OUTPUT_RISK,
            confidence: DEFAULT_CONFIDENCE,
            tokens_per_output: DEFAULT_TOKENS_PER_OUTPUT,
        }
    }

    /// [`ThresholdMode::Quality`] at its default per-token risk.
    pub fn quality() -> Self {
        ThresholdMode::Quality {
            max_risk: DEFAULT_MAX_RISK,
            confidence: DEFAULT_CONFIDENCE,
        }
    }

    /// The per-token risk the online refit certifies under the quality modes.
    fn token_risk(&self) -> Option<(f32, f32)> {
        match *self {
            ThresholdMode::Quality {
                max_risk,
                confidence,
            } => Some((max_risk, confidence)),
            ThresholdMode::OutputQuality {
                max_risk,
                confidence,
                tokens_per_output,
            } => Some((max_risk / tokens_per_output.max(1) as f32, confidence)),
            _ => None,
        }
    }
}

fn check_quality(max_risk: f32, confidence: f32) -> Result<(), ThresholdError> {
    if !(max_risk > 0.0 && max_risk < 1.0) {
        return Err(ThresholdError::InvalidParameter(
            "max_risk must be in (0, 1)".into(),
        ));
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(ThresholdError::InvalidParameter(
            "confidence must be in (0, 1)".into(),
        ));
    }
    Ok(())
}

/// A [`ThresholdMode::Quality`] threshold computed from calibration samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QualityCalibration {
    pub max_risk: f32,
    pub confidence: f32,
    pub controlled: RiskControlled,
}

impl QualityCalibration {
    pub fn from_samples(
        samples: &[Sample],
        max_risk: f32,
        confidence: f32,
    ) -> Result<Self, ThresholdError> {
        check_quality(max_risk, confidence)?;
        Ok(Self {
            max_risk,
            confidence,
            controlled: controlled_threshold(samples, max_risk as f64, 1.0 - confidence as f64)?,
        })
    }
}

/// A calibration as computed from a labelled run and shipped to devices as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub estimator: UncertaintyKind,
    pub fit: LinearFit,
    pub delta: f64,
    pub risk_averse: f64,
    pub risk_prone: f64,
    pub target_risk_epsilon: f32,
    pub target_risk: f32,
    /// Number of (u, beta) samples behind the calibration.
    pub samples: usize,
    /// The risk-controlled threshold; absent in calibrations written before it existed.
    #[serde(default)]
    pub quality: Option<QualityCalibration>,
    /// The threshold controlling the risk per output ([`ThresholdMode::OutputQuality`]); only
    /// calibrations that know which tokens form one generation have it.
    #[serde(default)]
    pub output_quality: Option<QualityCalibration>,
}

impl Calibration {
    /// Computes every threshold from labelled samples; the quality threshold at
    /// [`DEFAULT_MAX_RISK`] and [`DEFAULT_CONFIDENCE`] (see [`Calibration::with_quality`]).
    pub fn from_samples(
        estimator: UncertaintyKind,
        samples: &[Sample],
        target_risk_epsilon: f32,
    ) -> Result<Self, ThresholdError> {
        let fit = fit(samples)?;
        let delta = delta(samples);
        Ok(Self {
            estimator,
            risk_averse: fit.risk_averse()?,
            risk_prone: fit.risk_prone(delta)?,
            fit,
            delta,
            target_risk_epsilon,
            target_risk: target_risk(samples, target_risk_epsilon as f64),
            samples: samples.len(),
            quality: Some(QualityCalibration::from_samples(
                samples,
                DEFAULT_MAX_RISK,
                DEFAULT_CONFIDENCE,
            )?),
            output_quality: None,
        })
    }

    /// Adds the per-output threshold from the same samples grouped by generation.
    pub fn with_output_quality(
        mut self,
        outputs: &[Vec<Sample>],
        max_risk: f32,
        confidence: f32,
    ) -> Result<Self, ThresholdError> {
        check_quality(max_risk, confidence)?;
        self.output_quality = Some(QualityCalibration {
            max_risk,
            confidence,
            controlled: controlled_threshold_per_output(
                outputs,
                max_risk as f64,
                1.0 - confidence as f64,
            )?,
        });
        Ok(self)
    }

    /// Recomputes the quality threshold for another `max_risk` / `confidence`.
    pub fn with_quality(
        mut self,
        samples: &[Sample],
        max_risk: f32,
        confidence: f32,
    ) -> Result<Self, ThresholdError> {
        self.quality = Some(QualityCalibration::from_samples(
            samples, max_risk, confidence,
        )?);
        Ok(self)
    }

    /// The threshold this calibration gives under `mode`.
    pub fn threshold(&self, mode: &ThresholdMode) -> f32 {
        match *mode {
            ThresholdMode::Fixed { u_th } => u_th,
            ThresholdMode::RiskAverse => self.risk_averse as f32,
            ThresholdMode::RiskProne => self.risk_prone as f32,
            ThresholdMode::TargetRisk { epsilon } if epsilon == self.target_risk_epsilon => {
                self.target_risk
            }
            // A different epsilon than calibrated: use the linear fit's prediction of it.
            ThresholdMode::TargetRisk { epsilon } => {
                (((epsilon as f64 - self.fit.b) / self.fit.a).max(0.0)) as f32
            }
            // A calibration at least as strict (lower risk, higher confidence) still guarantees
            // the request; anything else is not evidence for it, so send everything.
            ThresholdMode::Quality {
                max_risk,
                confidence,
            } => match self.quality {
                Some(q) if q.max_risk <= max_risk && q.confidence >= confidence => {
                    q.controlled.u_th
                }
                _ => 0.0,
            },
            // Per output, or else per token at the union bound's share of it.
            ThresholdMode::OutputQuality {
                max_risk,
                confidence,
                ..
            } => match (self.output_quality, mode.token_risk()) {
                (Some(q), _) if q.max_risk <= max_risk && q.confidence >= confidence => {
                    q.controlled.u_th
                }
                (_, Some((token_risk, _))) => self.threshold(&ThresholdMode::Quality {
                    max_risk: token_risk,
                    confidence,
                }),
                _ => 0.0,
            },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("calibration serialises")
    }

    pub fn from_json(json: &str) -> Result<Self, ThresholdError> {
        serde_json::from_str(json).map_err(|e| ThresholdError::Json(e.to_string()))
    }
}

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

    fn synthetic(a: f64, b: f64, n: usize, noise: f64, seed: u64) -> Vec<Sample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                let e: f64 = (rng.random::<f64>() - 0.5) * 2.0 * noise;
                Sample {
                    u: u as f32,
                    beta: (a * u + b + e) as f32,
                }
            })
            .collect()
    }

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

    #[test]
    fn calibration_round_trips_through_json() {
        let samples = synthetic(0.8, -0.05, 500, 0.02, 3);
        let c = Calibration::from_samples(UncertaintyKind::default(), &samples, 0.05).unwrap();
        let back = Calibration::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            c.threshold(&ThresholdMode::RiskAverse),
            c.risk_averse as f32
        );
        assert!(matches!(
            Calibration::from_json("{"),
            Err(ThresholdError::Json(_))
        ));
    }

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
