//! Why a threshold could not be computed.

use thiserror::Error;

use crate::risk_control::RiskControlError;

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
