//! What a paper run takes (its options) and what it gives: each system's metrics, the threshold
//! sweep and, when run, the measured comparison.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uhlm_core::threshold::Calibration;

use super::systems::{SystemKind, SystemSpec};
use crate::calibrate::{CalibrationOptions, CalibrationRun};
use crate::channel::ChannelConfig;
use crate::measured::{MeasureOptions, MeasuredRun, link_key};

/// Parameters of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaperOptions {
    /// Tokens of the LLM's greedy reference per evaluation prompt.
    pub max_tokens: u32,
    /// Calibration on its own prompts (the first `calibration_prompts` of the set).
    pub calibration: CalibrationOptions,
    pub calibration_prompts: usize,
    /// Uplink SNRs of the simulated channel, in dB.
    pub snr_db: Vec<f64>,
    /// Bandwidth, RTT and downlink rate of the simulated channel (its SNR is swept).
    pub channel: ChannelConfig,
    /// Entries CU-HLM keeps; `None`: 2.6% of the vocabulary (the paper's 97.4% compression).
    pub cuhlm_k: Option<u32>,
    /// Thresholds of the skip-rate/fidelity sweep of our system.
    pub sweep: Vec<f32>,
    pub seed: u64,
}

impl Default for PaperOptions {
    fn default() -> Self {
        Self {
            max_tokens: 32,
            calibration: CalibrationOptions::default(),
            calibration_prompts: 16,
            snr_db: vec![-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
            channel: ChannelConfig::default(),
            cuhlm_k: None,
            sweep: (0..=20).map(|i| i as f32 * 0.05).collect(),
            seed: 7,
        }
    }
}

impl PaperOptions {
    /// A few prompts and tokens: checks the harness end to end in seconds.
    pub fn quick() -> Self {
        let mut o = Self {
            max_tokens: 8,
            calibration_prompts: 2,
            snr_db: vec![0.0, 20.0],
            sweep: vec![0.0, 0.5, 1.0],
            ..Self::default()
        };
        o.calibration.sampling.max_tokens = 12;
        o
    }
}

/// Measured per-token compute times on this machine.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ComputeTimes {
    pub slm_step_s: f64,
    pub llm_step_s: f64,
}

/// The metrics of one system (names as the JSON contract).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SystemResult {
    pub name: String,
    pub description: String,
    pub kind: SystemKind,
    pub skip_rate: f64,
    pub uplink_bytes_per_token: f64,
    pub uplink_bytes_per_generation: f64,
    pub agreement: f64,
    pub fidelity: f64,
    pub llm_loglik: f64,
    /// Tokens/s on the simulated channel, keyed `snr_<dB>db`, and measured through the
    /// emulated link, keyed `link_<profile>` (see [`crate::measured`]).
    pub throughput_tokens_per_s: BTreeMap<String, f64>,
    /// Throughput over HLM's under the same condition, keyed like `throughput_tokens_per_s`.
    pub speedup_over_hlm: BTreeMap<String, f64>,
}

impl SystemResult {
    /// What was compared, without its results.
    pub fn spec(&self) -> SystemSpec {
        SystemSpec {
            name: self.name.clone(),
            description: self.description.clone(),
            kind: self.kind.clone(),
        }
    }
}

/// Our system at one threshold of the sweep.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SweepPoint {
    pub threshold: f32,
    pub skip_rate: f64,
    pub fidelity: f64,
    pub agreement: f64,
}

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaperReport {
    pub prompts: String,
    pub eval_prompts: usize,
    pub positions: usize,
    pub options: PaperOptions,
    pub compute: ComputeTimes,
    pub calibration: CalibrationRun,
    pub systems: Vec<SystemResult>,
    pub sweep: Vec<SweepPoint>,
    /// Every system run for real through each link profile (empty when not measured).
    #[serde(default)]
    pub measured: Vec<MeasuredRun>,
    #[serde(default)]
    pub measure_options: Option<MeasureOptions>,
}

impl PaperReport {
    /// The calibration of uhlm's estimator (the first one fitted), which its threshold and its
    /// measured runs start from; `None` when the calibration found no fit.
    pub fn uhlm_calibration(&self) -> Option<&Calibration> {
        self.calibration.fits.first()?.calibration.as_ref()
    }

    /// Adds measured runs: their tokens/s join each system's throughput (and speedup) maps.
    pub fn add_measured(&mut self, options: MeasureOptions, runs: Vec<MeasuredRun>) {
        for run in &runs {
            if let Some(s) = self.systems.iter_mut().find(|s| s.name == run.system) {
                s.throughput_tokens_per_s
                    .insert(link_key(&run.profile), run.tokens_per_s);
            }
        }
        fill_speedups(&mut self.systems);
        self.measured = runs;
        self.measure_options = Some(options);
    }

    /// Keys of the throughput maps in reading order: simulated SNRs, then measured profiles.
    pub fn throughput_keys(&self) -> Vec<String> {
        let profiles = self.measure_options.iter().flat_map(|o| &o.profiles);
        self.options
            .snr_db
            .iter()
            .map(|s| snr_key(*s))
            .chain(profiles.map(|p| link_key(p)))
            .collect()
    }
}

/// Each system's throughput over HLM's under the same condition.
pub(super) fn fill_speedups(results: &mut [SystemResult]) {
    let hlm = results
        .iter()
        .find(|r| r.name == "hlm")
        .map(|r| r.throughput_tokens_per_s.clone())
        .unwrap_or_default();
    for r in results {
        r.speedup_over_hlm = r
            .throughput_tokens_per_s
            .iter()
            .map(|(k, v)| (k.clone(), v / hlm.get(k).copied().unwrap_or(f64::NAN)))
            .collect();
    }
}

/// `snr_10db`-style keys of the throughput maps.
pub fn snr_key(snr_db: f64) -> String {
    format!("snr_{snr_db}db")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snr_keys() {
        assert_eq!(snr_key(-5.0), "snr_-5db");
    }
}
