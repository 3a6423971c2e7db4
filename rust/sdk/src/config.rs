//! What an engine is built from and what one generation asks for. Serde structs that mirror the
//! `uhlm run` flags, so a TOML/JSON file, the CLI and the bindings all say the same thing.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uhlm_core::chat::ChatMessage;
use uhlm_core::codec::Codec;
use uhlm_core::sampling::SamplingOptions;
use uhlm_core::threshold::PolicyConfig;
use uhlm_core::uncertainty::UncertaintyKind;

use crate::error::SdkError;

/// Who decides each token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Send only uncertain tokens for verification (U-HLM).
    #[default]
    Uhlm,
    /// Send every token for verification (the papers' HLM baseline).
    Hlm,
    /// Never contact the server.
    Slm,
    /// Every token is sampled by the server, without a draft (remote-only baseline); the SLM
    /// still follows along so it can take over offline.
    Llm,
}

impl Mode {
    /// Whether this mode talks to a server at all.
    pub fn uses_server(self) -> bool {
        self != Mode::Slm
    }
}

impl FromStr for Mode {
    type Err = SdkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "uhlm" => Ok(Mode::Uhlm),
            "hlm" => Ok(Mode::Hlm),
            "slm" => Ok(Mode::Slm),
            "llm" => Ok(Mode::Llm),
            other => Err(SdkError::InvalidConfig(format!(
                "unknown mode {other:?}; expected uhlm, hlm, slm or llm"
            ))),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Uhlm => "uhlm",
            Mode::Hlm => "hlm",
            Mode::Slm => "slm",
            Mode::Llm => "llm",
        })
    }
}

/// Everything a [`HybridEngine`](crate::HybridEngine) needs. Durations are plain milliseconds so
/// the struct crosses the FFI unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// The on-device model (GGUF).
    pub slm_path: PathBuf,
    /// Server address `host:port`; `None` only makes sense with [`Mode::Slm`].
    pub server: Option<String>,
    /// Lowercase hex SHA-256 of the server's DER certificate; `None` trusts the system roots
    /// (webpki roots) and checks the host name instead.
    pub pin: Option<String>,
    pub api_key: String,
    pub mode: Mode,
    pub uncertainty: UncertaintyKind,
    /// Threshold policy; ignored by modes that do not skip.
    pub policy: PolicyConfig,
    /// A calibration JSON (from `uhlm calibrate`); when set, its estimator and threshold win
    /// over `uncertainty` and `policy.initial_threshold`.
    pub calibration: Option<PathBuf>,
    /// Compression of the distribution sent uplink.
    pub codec: Codec,
    /// CPU threads for the SLM's kernels (`None`: candle's default).
    pub threads: Option<usize>,
    /// Handshake plus `Hello`/`Welcome` must finish within this time.
    pub connect_timeout_ms: u64,
    /// A `Verdict` (or `Started`) must arrive within this time, else the link counts as down
    /// and the token is decided locally.
    pub request_timeout_ms: u64,
    /// More time an answer may take per context token the server has not scored yet (the
    /// whole context after `Start` or `Resync`, then each `Verify`'s skipped tokens): a long
    /// prompt's first answer waits for the server's prefill instead of timing out and sending
    /// the prompt again.
    pub prefill_ms_per_token: u64,
    /// QUIC keep-alive interval (keeps NAT bindings and detects dead links).
    pub keep_alive_ms: u64,
    /// QUIC idle timeout.
    pub idle_timeout_ms: u64,
    /// First delay before reconnecting after a failure; doubles up to `reconnect_backoff_max_ms`.
    pub reconnect_backoff_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Sent in `Hello` for the server's logs.
    pub client_name: String,
    /// Most tokens drafted ahead of the final ones while drafts are being verified
    /// (pipelining; the device adapts below it to the round trip, the rejection rate and the
    /// window the server asks for when it is busy),
    /// and most drafts verified in one request beyond the first. 0: one draft at a time, and
    /// no drafting while it is verified.
    pub max_lookahead: usize,
    /// Tokens committed on the device (confident, not verified) that are given to the server
    /// before the next `Verify` once this many wait and no request is in flight (an `Extend`
    /// message), so that the server scores them while the device drafts and the `Verify` then
    /// waits for its own few rows instead of every token since the last one. 0: never; they
    /// ride in the next `Verify`, one message fewer per this many tokens.
    pub extend_after: usize,
}

/// The default [`EngineConfig::extend_after`]: docs/BENCHMARKS.md ("Server capacity") measures
/// the `Verify` waits it buys against the messages it adds.
pub const EXTEND_AFTER: usize = 4;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            slm_path: PathBuf::new(),
            server: None,
            pin: None,
            api_key: String::new(),
            mode: Mode::default(),
            uncertainty: UncertaintyKind::default(),
            policy: PolicyConfig::default(),
            calibration: None,
            codec: Codec::default(),
            threads: None,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            // `uhlm bench model` measured the 1.5B server model prefilling 57 (one thread) to
            // 98 (two) tokens/s on a 2-core machine (docs/BENCHMARKS.md): 20 ms covers both.
            prefill_ms_per_token: 20,
            keep_alive_ms: 2_000,
            idle_timeout_ms: 15_000,
            reconnect_backoff_ms: 250,
            reconnect_backoff_max_ms: 10_000,
            client_name: format!("uhlm-sdk/{}", env!("CARGO_PKG_VERSION")),
            max_lookahead: 32,
            extend_after: EXTEND_AFTER,
        }
    }
}

impl EngineConfig {
    /// Checks what can be checked without touching files or the network.
    pub fn validate(&self) -> Result<(), SdkError> {
        let bad = |m: String| Err(SdkError::InvalidConfig(m));
        if self.slm_path.as_os_str().is_empty() {
            return bad("slm_path is empty".into());
        }
        if self.mode.uses_server() && self.server.as_deref().is_none_or(str::is_empty) {
            return bad(format!("mode {} needs a server address", self.mode));
        }
        // Checked here, not at connect time, where a bad address would only look like a server
        // that is down: the generation would run offline and report success.
        if let Some(addr) = self.server.as_deref().filter(|a| !a.is_empty()) {
            server_host(addr)?;
        }
        if let Some(pin) = &self.pin {
            crate::tls::parse_pin(pin)?;
        }
        self.uncertainty
            .validate()
            .map_err(SdkError::InvalidConfig)?;
        self.policy
            .validate()
            .map_err(|e| SdkError::InvalidConfig(format!("policy: {e}")))?;
        self.codec
            .validate()
            .map_err(|e| SdkError::InvalidConfig(format!("codec: {e}")))?;
        for (name, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("reconnect_backoff_ms", self.reconnect_backoff_ms),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.reconnect_backoff_max_ms < self.reconnect_backoff_ms {
            return bad("reconnect_backoff_max_ms must be >= reconnect_backoff_ms".into());
        }
        if self.threads == Some(0) {
            return bad("threads must be at least 1".into());
        }
        Ok(())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The wait for an answer that first has `unscored` context tokens to score.
    pub(crate) fn answer_timeout(&self, unscored: usize) -> Duration {
        self.request_timeout()
            + Duration::from_millis(self.prefill_ms_per_token.saturating_mul(unscored as u64))
    }
}

/// The host of a `host:port` server address with a numeric port (`[v6]:port` for IPv6
/// literals, brackets removed): the name TLS checks the certificate against.
pub(crate) fn server_host(addr: &str) -> Result<&str, SdkError> {
    match addr.rsplit_once(':') {
        // A bare IPv6 literal has colons but no port.
        Some((host, port))
            if !host.is_empty()
                && (!host.contains(':') || host.ends_with(']'))
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(host.trim_start_matches('[').trim_end_matches(']'))
        }
        _ => Err(SdkError::InvalidConfig(format!(
            "server address {addr:?} must be host:port (e.g. 127.0.0.1:4433, [::1]:4433)"
        ))),
    }
}

/// What the model continues from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized as is (with the model's BOS if it uses one).
    Text(String),
    /// A conversation, rendered with the on-device model's chat template and ending with the
    /// assistant's turn header.
    Chat(Vec<ChatMessage>),
}

/// Options of one generation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationOptions {
    /// Temperature, top-k, top-p, max tokens, seed and stop strings; the server applies the same.
    pub sampling: SamplingOptions,
    /// Treat a [`Prompt::Text`] as one user message and apply the chat template.
    pub chat_template: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_address_needs_a_port() {
        let with = |server: &str| EngineConfig {
            slm_path: "m.gguf".into(),
            server: Some(server.into()),
            ..EngineConfig::default()
        };
        assert_eq!(server_host("[::1]:4433").unwrap(), "::1");
        assert_eq!(server_host("localhost:4433").unwrap(), "localhost");
        for good in [
            "127.0.0.1:4433",
            "localhost:4433",
            "[::1]:4433",
            "example.com:443",
        ] {
            assert!(with(good).validate().is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1",
            "localhost",
            "::1",
            "[::1]",
            "host:",
            ":4433",
            "host:0",
            "host:x",
        ] {
            let err = with(bad).validate().unwrap_err();
            assert!(err.to_string().contains("host:port"), "{bad}: {err}");
        }
    }
}
