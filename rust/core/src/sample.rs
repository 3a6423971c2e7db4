//! Calibration samples: the device's uncertainty beside the server's rejection probability,
//! plain or weighted. The threshold fits and the risk-controlled bounds both read them.

use serde::{Deserialize, Serialize};

/// One calibration observation: the device's uncertainty and the server's rejection probability.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub u: f32,
    pub beta: f32,
}

/// A calibration sample with a weight (importance × forgetting in the online refit).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightedSample {
    pub u: f32,
    pub beta: f32,
    pub weight: f64,
}

impl From<Sample> for WeightedSample {
    /// An unweighted calibration sample counts once.
    fn from(s: Sample) -> Self {
        Self {
            u: s.u,
            beta: s.beta,
            weight: 1.0,
        }
    }
}
