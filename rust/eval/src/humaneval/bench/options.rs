//! What a HumanEval run is asked for: everything that changes what a sample is, and the check
//! that a resumed run asks for the same.

use serde::{Deserialize, Serialize};

use crate::EvalError;
use crate::humaneval::PromptFormat;

/// Parameters of a run. Everything that changes what a sample is belongs here: a resumed run
/// must have the same options (see [`HumanEvalOptions::check_resumable`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HumanEvalOptions {
    /// Evaluate the first `limit` problems (all 164 when `None`).
    pub limit: Option<usize>,
    pub format: PromptFormat,
    /// Tokens per completion at most.
    pub max_tokens: u32,
    /// Samples per problem at [`temperature`](Self::temperature), for pass@1 by the unbiased
    /// estimator (0: greedy only).
    pub samples: u32,
    pub temperature: f32,
    /// Problems each fold's thresholds are calibrated on (never problems of that fold).
    pub calibration_problems: usize,
    /// Tokens per calibration problem at most; each stops where its generation would (greedy:
    /// drafts are labelled by whether the LLM's greedy choice differs, the quality the greedy
    /// runs are scored on).
    pub calibration_tokens: u32,
    /// uhlm's quality target: the share of completions that may differ from what the LLM
    /// alone would have written (per output, see
    /// [`controlled_threshold_per_output`](uhlm_core::risk_control::controlled_threshold_per_output)).
    pub max_risk: f32,
    /// Probability that the calibrated threshold meets `max_risk` (finite-sample guarantee).
    pub confidence: f32,
    /// Extra uhlm systems at fixed closed-form thresholds: the pass@1-against-skip-rate curve.
    pub sweep: Vec<f32>,
    /// Systems to run (all when empty): `slm`, `llm`, `hlm`, `u-hlm`, `cu-hlm`, `uhlm`.
    pub systems: Vec<String>,
    /// A `uhlm-linkemu` preset between device and server (`None`: direct loopback).
    pub link: Option<String>,
    /// How long the device waits for the server before deciding locally.
    pub request_timeout_ms: u64,
    /// What runs the server's LLM: `None` its own runtime, `Some("llama-server")` llama.cpp's
    /// server started for the run, the gateway in front of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    pub seed: u64,
    /// Kernel threads of the device's SLM (the server's are set on its command line). Speed
    /// only, so a run may resume with another value.
    #[serde(skip)]
    pub threads: Option<usize>,
}

impl Default for HumanEvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            format: PromptFormat::Chat,
            max_tokens: 384,
            samples: 0,
            temperature: 0.2,
            calibration_problems: 32,
            calibration_tokens: 384,
            max_risk: 0.1,
            confidence: 0.9,
            sweep: Vec::new(),
            systems: Vec::new(),
            link: None,
            request_timeout_ms: 120_000,
            engine: None,
            seed: 7,
            threads: None,
        }
    }
}

impl HumanEvalOptions {
    /// A resumed run must have been started with the same options, except for what only adds
    /// samples beside the existing ones (more `samples`, other `sweep` points or `systems`):
    /// a long greedy run can grow its sweep and its sampled runs later.
    pub fn check_resumable(&self, previous: &HumanEvalOptions) -> Result<(), EvalError> {
        let saved = |o: &HumanEvalOptions| {
            let o = HumanEvalOptions {
                samples: 0,
                sweep: Vec::new(),
                systems: Vec::new(),
                ..o.clone()
            };
            serde_json::to_value(o).ok()
        };
        if saved(self) == saved(previous) {
            return Ok(());
        }
        Err(EvalError::Resume(format!(
            "the output directory holds a run with other options ({}); use another --out or remove it",
            serde_json::to_string(previous).unwrap_or_default()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_needs_the_same_options_but_may_add_samples() {
        let a = HumanEvalOptions::default();
        assert!(a.check_resumable(&a.clone()).is_ok());
        let b = HumanEvalOptions {
            max_risk: 0.05,
            ..a.clone()
        };
        assert!(a.check_resumable(&b).is_err());
        let faster = HumanEvalOptions {
            threads: Some(2),
            ..a.clone()
        };
        assert!(
            a.check_resumable(&faster).is_ok(),
            "threads change speed only"
        );
        let grown = HumanEvalOptions {
            samples: 5,
            sweep: vec![0.3],
            systems: vec!["uhlm".into()],
            ..a.clone()
        };
        assert!(
            grown.check_resumable(&a).is_ok(),
            "samples, sweep points and systems only add sample files"
        );
        let hotter = HumanEvalOptions {
            temperature: 0.8,
            ..grown.clone()
        };
        assert!(hotter.check_resumable(&grown).is_err());
    }
}
