//! A calibration as computed from a labelled run and shipped to devices as JSON, and the
//! threshold it gives under each [`ThresholdMode`].

use serde::{Deserialize, Serialize};

use super::error::ThresholdError;
use super::fit::{LinearFit, delta, fit, target_risk};
use super::mode::{DEFAULT_CONFIDENCE, DEFAULT_MAX_RISK, ThresholdMode, check_quality};
use crate::risk_control::{RiskControlled, controlled_threshold, controlled_threshold_per_output};
use crate::sample::Sample;
use crate::uncertainty::UncertaintyKind;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threshold::test_samples::synthetic;

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
}
