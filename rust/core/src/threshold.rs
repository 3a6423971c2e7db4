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

mod calibration_file;
mod error;
mod fit;
mod mode;
mod policy;
#[cfg(test)]
mod test_samples;

pub use crate::sample::Sample;
pub use calibration_file::{Calibration, QualityCalibration};
pub use error::ThresholdError;
pub use fit::{LinearFit, delta, fit, target_risk};
pub use mode::{
    DEFAULT_CONFIDENCE, DEFAULT_MAX_OUTPUT_RISK, DEFAULT_MAX_RISK, DEFAULT_TOKENS_PER_OUTPUT,
    ThresholdMode,
};
pub use policy::{Decision, PolicyConfig, ThresholdPolicy};
