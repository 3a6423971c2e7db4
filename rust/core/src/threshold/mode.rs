//! How the threshold is chosen ([`ThresholdMode`]) and the default risk a quality mode bounds.

use serde::{Deserialize, Serialize};

use super::error::ThresholdError;

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
    ///
    /// [`Calibration::with_output_quality`]: crate::threshold::Calibration::with_output_quality
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
    pub(super) fn token_risk(&self) -> Option<(f32, f32)> {
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

pub(super) fn check_quality(max_risk: f32, confidence: f32) -> Result<(), ThresholdError> {
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
