//! Records the app fills in: flat mirrors of the SDK's [`uhlm_sdk::EngineConfig`] and
//! [`uhlm_sdk::GenerationOptions`]. Optional fields left empty take the SDK's defaults, so
//! the defaults live in one place (the SDK), not in every language.

use std::path::PathBuf;

use uhlm_sdk as sdk;

use crate::error::UhlmError;

/// Who decides each token (see [`sdk::Mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum Mode {
    /// Send only uncertain tokens for verification (U-HLM).
    Uhlm,
    /// Send every token for verification.
    Hlm,
    /// Never contact the server.
    Slm,
    /// Every token is sampled by the server.
    Llm,
}

impl From<Mode> for sdk::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Uhlm => sdk::Mode::Uhlm,
            Mode::Hlm => sdk::Mode::Hlm,
            Mode::Slm => sdk::Mode::Slm,
            Mode::Llm => sdk::Mode::Llm,
        }
    }
}

/// How the SLM's uncertainty is measured (see [`sdk::UncertaintyKind`]).
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum Uncertainty {
    TemperaturePerturbation {
        samples: u32,
        theta_min: f32,
        theta_max: f32,
        seed: u64,
    },
    ExpectedTemperature {
        theta_min: f32,
        theta_max: f32,
        panels: u32,
    },
    MaxProbability,
    Entropy,
    Margin,
}

impl From<Uncertainty> for sdk::UncertaintyKind {
    fn from(u: Uncertainty) -> Self {
        use sdk::UncertaintyKind as K;
        match u {
            Uncertainty::TemperaturePerturbation {
                samples,
                theta_min,
                theta_max,
                seed,
            } => K::TemperaturePerturbation {
                samples,
                theta_min,
                theta_max,
                seed,
            },
            Uncertainty::ExpectedTemperature {
                theta_min,
                theta_max,
                panels,
            } => K::ExpectedTemperature {
                theta_min,
                theta_max,
                panels,
            },
            Uncertainty::MaxProbability => K::MaxProbability,
            Uncertainty::Entropy => K::Entropy,
            Uncertainty::Margin => K::Margin,
        }
    }
}

/// How the skip threshold is chosen (see [`sdk::ThresholdMode`]).
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum ThresholdMode {
    Fixed {
        u_th: f32,
    },
    RiskAverse,
    RiskProne,
    TargetRisk {
        epsilon: f32,
    },
    /// At most `max_risk` of the tokens may differ from the LLM's decision, with probability
    /// `confidence` (the SDK's default: 0.01 and 0.9).
    Quality {
        max_risk: f32,
        confidence: f32,
    },
    /// At most `max_risk` of the generations may differ from what the LLM alone would have
    /// written, with probability `confidence`: needs a calibration with a per-output bound;
    /// verdicts are judged online per token at `max_risk / tokens_per_output`.
    OutputQuality {
        max_risk: f32,
        confidence: f32,
        tokens_per_output: u32,
    },
}

impl From<ThresholdMode> for sdk::ThresholdMode {
    fn from(m: ThresholdMode) -> Self {
        match m {
            ThresholdMode::Fixed { u_th } => sdk::ThresholdMode::Fixed { u_th },
            ThresholdMode::RiskAverse => sdk::ThresholdMode::RiskAverse,
            ThresholdMode::RiskProne => sdk::ThresholdMode::RiskProne,
            ThresholdMode::TargetRisk { epsilon } => sdk::ThresholdMode::TargetRisk { epsilon },
            ThresholdMode::Quality {
                max_risk,
                confidence,
            } => sdk::ThresholdMode::Quality {
                max_risk,
                confidence,
            },
            ThresholdMode::OutputQuality {
                max_risk,
                confidence,
                tokens_per_output,
            } => sdk::ThresholdMode::OutputQuality {
                max_risk,
                confidence,
                tokens_per_output,
            },
        }
    }
}

/// The threshold policy (see [`sdk::PolicyConfig`]).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct PolicyConfig {
    pub mode: ThresholdMode,
    pub initial_threshold: f32,
    pub online: bool,
    pub probe_rate: f32,
    pub forgetting: f32,
    pub window: u32,
    pub min_samples: u32,
    pub refit_every: u32,
    pub seed: u64,
}

impl From<PolicyConfig> for sdk::PolicyConfig {
    fn from(p: PolicyConfig) -> Self {
        sdk::PolicyConfig {
            mode: p.mode.into(),
            initial_threshold: p.initial_threshold,
            online: p.online,
            probe_rate: p.probe_rate,
            forgetting: p.forgetting,
            window: p.window as usize,
            min_samples: p.min_samples as usize,
            refit_every: p.refit_every as usize,
            seed: p.seed,
            // Bindings choose a combined predictor through a calibration file; its weights are
            // refitted online as in the SDK's default.
            ..sdk::PolicyConfig::default()
        }
    }
}

/// What a [`HybridEngine`](crate::HybridEngine) is built from. Every `None` means "the SDK's
/// default" (see [`sdk::EngineConfig`] for each field's meaning).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct EngineConfig {
    /// The on-device model (GGUF).
    pub slm_path: String,
    /// Server address `host:port`; `None` only with [`Mode::Slm`].
    #[uniffi(default = None)]
    pub server: Option<String>,
    /// Lowercase hex SHA-256 of the server's DER certificate; `None` trusts the system roots.
    #[uniffi(default = None)]
    pub pin: Option<String>,
    #[uniffi(default = "")]
    pub api_key: String,
    #[uniffi(default = None)]
    pub mode: Option<Mode>,
    #[uniffi(default = None)]
    pub uncertainty: Option<Uncertainty>,
    #[uniffi(default = None)]
    pub policy: Option<PolicyConfig>,
    /// A calibration JSON from `uhlm calibrate`.
    #[uniffi(default = None)]
    pub calibration_path: Option<String>,
    /// Uplink codec in the CLI spelling, e.g. `topk:32` or `dense-f16`.
    #[uniffi(default = None)]
    pub codec: Option<String>,
    #[uniffi(default = None)]
    pub threads: Option<u32>,
    #[uniffi(default = None)]
    pub connect_timeout_ms: Option<u64>,
    #[uniffi(default = None)]
    pub request_timeout_ms: Option<u64>,
    #[uniffi(default = None)]
    pub keep_alive_ms: Option<u64>,
    #[uniffi(default = None)]
    pub idle_timeout_ms: Option<u64>,
    #[uniffi(default = None)]
    pub reconnect_backoff_ms: Option<u64>,
    #[uniffi(default = None)]
    pub reconnect_backoff_max_ms: Option<u64>,
    #[uniffi(default = None)]
    pub client_name: Option<String>,
    /// Most tokens drafted ahead while drafts are being verified; 0 turns pipelining off (one
    /// draft at a time, the device idle while it is verified).
    #[uniffi(default = None)]
    pub max_lookahead: Option<u32>,
}

impl TryFrom<EngineConfig> for sdk::EngineConfig {
    type Error = UhlmError;

    fn try_from(c: EngineConfig) -> Result<Self, UhlmError> {
        let d = sdk::EngineConfig::default();
        let codec = match c.codec {
            Some(spec) => spec.parse().map_err(|e| UhlmError::InvalidConfig {
                reason: format!("codec: {e}"),
            })?,
            None => d.codec,
        };
        Ok(sdk::EngineConfig {
            slm_path: PathBuf::from(c.slm_path),
            server: c.server,
            pin: c.pin,
            api_key: c.api_key,
            mode: c.mode.map_or(d.mode, Into::into),
            uncertainty: c.uncertainty.map_or(d.uncertainty, Into::into),
            policy: c.policy.map_or(d.policy, Into::into),
            calibration: c.calibration_path.map(PathBuf::from),
            codec,
            threads: c.threads.map(|t| t as usize).or(d.threads),
            connect_timeout_ms: c.connect_timeout_ms.unwrap_or(d.connect_timeout_ms),
            request_timeout_ms: c.request_timeout_ms.unwrap_or(d.request_timeout_ms),
            prefill_ms_per_token: d.prefill_ms_per_token,
            keep_alive_ms: c.keep_alive_ms.unwrap_or(d.keep_alive_ms),
            idle_timeout_ms: c.idle_timeout_ms.unwrap_or(d.idle_timeout_ms),
            reconnect_backoff_ms: c.reconnect_backoff_ms.unwrap_or(d.reconnect_backoff_ms),
            reconnect_backoff_max_ms: c
                .reconnect_backoff_max_ms
                .unwrap_or(d.reconnect_backoff_max_ms),
            client_name: c.client_name.unwrap_or(d.client_name),
            max_lookahead: c.max_lookahead.map_or(d.max_lookahead, |n| n as usize),
            extend_after: d.extend_after,
        })
    }
}

/// One turn of a conversation (`system`, `user`, `assistant`).
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl From<ChatMessage> for sdk::ChatMessage {
    fn from(m: ChatMessage) -> Self {
        sdk::ChatMessage::new(m.role, m.content)
    }
}

/// Options of one generation; `None` fields take the SDK's defaults (temperature 0.8, 128
/// tokens, a random seed).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerationOptions {
    /// Softmax temperature; `0.0` is greedy.
    #[uniffi(default = None)]
    pub temperature: Option<f32>,
    #[uniffi(default = None)]
    pub top_k: Option<u32>,
    #[uniffi(default = None)]
    pub top_p: Option<f32>,
    #[uniffi(default = None)]
    pub max_tokens: Option<u32>,
    #[uniffi(default = None)]
    pub seed: Option<u64>,
    /// Generation stops once the text ends with one of these.
    #[uniffi(default = [])]
    pub stop: Vec<String>,
    /// Treat a text prompt as one user message and apply the model's chat template.
    #[uniffi(default = false)]
    pub chat_template: bool,
}

impl From<GenerationOptions> for sdk::GenerationOptions {
    fn from(o: GenerationOptions) -> Self {
        let d = sdk::SamplingOptions::default();
        sdk::GenerationOptions {
            sampling: sdk::SamplingOptions {
                temperature: o.temperature.unwrap_or(d.temperature),
                top_k: o.top_k.or(d.top_k),
                top_p: o.top_p.or(d.top_p),
                max_tokens: o.max_tokens.unwrap_or(d.max_tokens),
                seed: o.seed.or(d.seed),
                stop: o.stop,
            },
            chat_template: o.chat_template,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> EngineConfig {
        EngineConfig {
            slm_path: "draft.gguf".into(),
            server: None,
            pin: None,
            api_key: String::new(),
            mode: None,
            uncertainty: None,
            policy: None,
            calibration_path: None,
            codec: None,
            threads: None,
            connect_timeout_ms: None,
            request_timeout_ms: None,
            keep_alive_ms: None,
            idle_timeout_ms: None,
            reconnect_backoff_ms: None,
            reconnect_backoff_max_ms: None,
            client_name: None,
            max_lookahead: None,
        }
    }

    #[test]
    fn empty_fields_take_the_sdk_defaults() {
        let c = sdk::EngineConfig::try_from(minimal()).unwrap();
        let d = sdk::EngineConfig {
            slm_path: "draft.gguf".into(),
            ..sdk::EngineConfig::default()
        };
        assert_eq!(c, d);
    }

    #[test]
    fn set_fields_are_carried_over() {
        let c = sdk::EngineConfig::try_from(EngineConfig {
            server: Some("127.0.0.1:4433".into()),
            mode: Some(Mode::Hlm),
            codec: Some("topk:8".into()),
            uncertainty: Some(Uncertainty::Entropy),
            request_timeout_ms: Some(77),
            max_lookahead: Some(0),
            ..minimal()
        })
        .unwrap();
        assert_eq!(c.server.as_deref(), Some("127.0.0.1:4433"));
        assert_eq!(c.mode, sdk::Mode::Hlm);
        assert_eq!(c.codec, "topk:8".parse().unwrap());
        assert_eq!(c.uncertainty, sdk::UncertaintyKind::Entropy);
        assert_eq!(c.request_timeout_ms, 77);
        assert_eq!(c.max_lookahead, 0);
    }

    #[test]
    fn a_bad_codec_is_an_invalid_config() {
        let e = sdk::EngineConfig::try_from(EngineConfig {
            codec: Some("nonsense".into()),
            ..minimal()
        })
        .unwrap_err();
        assert!(matches!(e, UhlmError::InvalidConfig { .. }), "{e:?}");
    }
}
