//! The compared systems: what each decides per token, and the catalogue in the order of the
//! papers' tables.

use serde::{Deserialize, Serialize};
use uhlm_core::codec::Codec;
use uhlm_core::threshold::{DEFAULT_CONFIDENCE, DEFAULT_MAX_OUTPUT_RISK};
use uhlm_core::uncertainty::UncertaintyKind;

/// How a system decides each token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SystemKind {
    /// The device alone.
    SlmOnly,
    /// The server samples every token; the device only asks (no draft).
    LlmOnly,
    /// Draft on the device, skip when `u < threshold`, otherwise send the draft with `codec`.
    Hybrid {
        estimator: UncertaintyKind,
        threshold: f32,
        codec: Codec,
        /// Whether the device refits the threshold from verdicts while generating (ours). The
        /// exact evaluation holds every threshold fixed; the measured runs honour this.
        #[serde(default)]
        recalibrate: bool,
    },
}

/// One compared system.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SystemSpec {
    pub name: String,
    pub description: String,
    pub kind: SystemKind,
}

/// The compared systems, in the order of the papers' tables.
pub fn systems(our_threshold: f32, paper_threshold: f32, cuhlm_k: u32) -> Vec<SystemSpec> {
    let paper_estimator = UncertaintyKind::paper(7);
    vec![
        SystemSpec {
            name: "slm".into(),
            description: "SLM only, on the device".into(),
            kind: SystemKind::SlmOnly,
        },
        SystemSpec {
            name: "llm".into(),
            description: "LLM only: the server generates and streams every token (one request)"
                .into(),
            kind: SystemKind::LlmOnly,
        },
        SystemSpec {
            name: "hlm".into(),
            description: "HLM: every token verified, dense f32 uplink".into(),
            kind: SystemKind::Hybrid {
                estimator: paper_estimator.clone(),
                threshold: 0.0,
                codec: Codec::DenseF32,
                recalibrate: false,
            },
        },
        SystemSpec {
            name: "u-hlm".into(),
            description: format!(
                "U-HLM as published: Monte-Carlo u (K=20), risk-averse u_th = -b/a = {paper_threshold:.3}, dense f32"
            ),
            kind: SystemKind::Hybrid {
                estimator: paper_estimator.clone(),
                threshold: paper_threshold,
                codec: Codec::DenseF32,
                recalibrate: false,
            },
        },
        SystemSpec {
            name: "cu-hlm".into(),
            description: format!(
                "CU-HLM as published: U-HLM's u and u_th, top-{cuhlm_k} uplink with a uniform tail (not exact)"
            ),
            kind: SystemKind::Hybrid {
                estimator: paper_estimator,
                threshold: paper_threshold,
                codec: Codec::TopKUniformTail { k: cuhlm_k },
                recalibrate: false,
            },
        },
        SystemSpec {
            name: "uhlm".into(),
            description: format!(
                "uhlm: closed-form u, the SDK's default policy (at most {} of outputs differ from the LLM's, confidence {}) -> u_th = {our_threshold:.3}, exact {} uplink",
                DEFAULT_MAX_OUTPUT_RISK,
                DEFAULT_CONFIDENCE,
                Codec::default()
            ),
            kind: SystemKind::Hybrid {
                estimator: UncertaintyKind::default(),
                threshold: our_threshold,
                codec: Codec::default(),
                recalibrate: true,
            },
        },
    ]
}
