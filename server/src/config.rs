//! The server's configuration: one serde struct, read from TOML, overridden by CLI flags
//! (`ServerArgs`, with the `cli` feature) and built in code for in-process servers (tests,
//! demos, the FFI).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uhlm_core::protocol::DEFAULT_MAX_FRAME_BYTES;
use uhlm_model::Device;

use crate::engine::RemoteKind;
use crate::error::ServerError;

/// Everything a server needs to start. Field names are the TOML keys and, kebab-cased, the CLI
/// flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The LLM: a GGUF path or a default model's name (`smollm2`) from the model cache.
    pub model: PathBuf,
    /// UDP address of the QUIC endpoint; port 0 picks a free one (see `ServerHandle::local_addr`).
    pub listen: SocketAddr,
    /// PEM certificate chain; needs `key`. Mutually exclusive with `self_signed`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Use a self-signed certificate for `localhost`, 127.0.0.1 and ::1 (clients pin it).
    pub self_signed: bool,
    /// Where the self-signed certificate and key are kept (`uhlm-server-cert.pem`,
    /// `uhlm-server-key.pem`): reused when present, so the pin survives restarts. `None` keeps
    /// a fresh pair in memory only.
    pub cert_dir: Option<PathBuf>,
    /// File of API keys, one per line; blank lines and `#` comments are ignored.
    pub api_keys: Option<PathBuf>,
    /// API keys given directly (tests, demos, embedded servers); never written to TOML.
    #[serde(skip)]
    pub api_key_list: Vec<String>,
    /// Most concurrent sessions over all connections.
    pub max_sessions: usize,
    /// Most open QUIC connections, authenticated or not; more are refused at the handshake, so
    /// a flood of connections cannot make the server hold their state.
    pub max_connections: usize,
    /// Most concurrent sessions one API key may hold. `None`: half of `max_sessions` when the
    /// server has several keys (one tenant cannot take every slot), all of them with one key.
    pub max_sessions_per_key: Option<usize>,
    /// Most connections one API key may hold, with the same default rule as
    /// `max_sessions_per_key` (half of `max_connections` with several keys).
    pub max_connections_per_key: Option<usize>,
    /// Most tokens in one session's context (also capped by the model's context window).
    pub max_context_tokens: u32,
    /// Most tokens one `Generate` request may ask for (announced in `Welcome`); a device that
    /// wants more sends another request, so no single request holds a model worker unboundedly.
    pub max_generate_tokens: u32,
    /// Most links one chain `Verify` may carry (announced in `Welcome`): the drafts a device
    /// verifies in one request beyond the first, each a row of logits in the forward pass.
    pub max_chain_links: u32,
    /// Memory for all sessions' KV caches and the forward pass running over them (the
    /// embedded engine's activations and logits, planned within half of it and cut into more
    /// passes if need be, and the caches a pass grows); beyond it idle sessions are evicted,
    /// least recently used first, and must `Resync`.
    pub kv_memory_budget_bytes: u64,
    /// A session with no request for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest frame payload accepted (and announced in `Welcome`).
    pub max_frame_bytes: u32,
    /// Requests (`Start`, `Verify`, `Resync`, `Generate`) per second per API key; 0 = unlimited.
    /// Bursts of one second's worth are allowed. The default is far above what one model
    /// serves (one `Verify` is a forward pass), so it only stops a flood.
    pub rate_limit: f64,
    /// How long an idle worker waits for more requests after the first one arrives before its
    /// forward pass. Zero by default: the worker batches continuously, taking whatever is
    /// queued whenever it is free, so requests group up exactly when the server is busy.
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
    /// Most sessions one forward pass serves.
    pub max_batch: usize,
    /// Most tokens one forward pass scores over all its sessions (verified positions, their
    /// skipped tokens, generation steps, catch-up chunks); the rest waits for the next pass.
    /// Catching up always gets a chunk per pass on top (cut to `pass_target`), so it cannot
    /// starve.
    pub max_batch_tokens: usize,
    /// Most context tokens one forward pass scores when catching a session up (a new prompt, a
    /// resync): longer contexts are scored a chunk per turn of the worker, between other
    /// sessions' requests, so a long prompt delays them by at most one chunk.
    pub prefill_chunk_tokens: usize,
    /// How long a forward pass that catches a session up may take: its chunk is cut to fit,
    /// from the measured cost of recent passes (at least 16 tokens, so catching up never
    /// stops). Every `Verify` waits for the pass in progress, so this, not the chunk's token
    /// count, is what a long prompt costs the other devices. `auto` (the default): twice what
    /// a pass of one token costs on this model and this machine, as measured (see
    /// [`PassTarget::Auto`]); a duration: that; `0s`: chunks of `prefill_chunk_tokens`
    /// whatever they cost (throughput first).
    pub pass_target: PassTarget,
    /// Model worker threads; sessions are spread over them and stay on theirs.
    pub workers: usize,
    /// Threads for candle's matmul kernels (process-wide; `None`: candle's default).
    pub kernel_threads: Option<usize>,
    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` in builds with the `cuda` feature.
    pub device: Device,
    /// Address of the HTTP endpoint serving `/healthz` and `/metrics`; `None`: no endpoint.
    pub metrics: Option<SocketAddr>,
    /// What runs the LLM's forward passes: `"embedded"` (this process, the default),
    /// `"llama-server URL"` (a llama.cpp server serving the same GGUF as `model`) or
    /// `"vllm URL"` (a vLLM server serving the same model); with a remote engine `model` only
    /// provides the tokenizer and the vocabulary.
    pub engine: EngineChoice,
    /// Longest wait for one request to a remote engine; past it the request fails and the
    /// device goes on alone.
    #[serde(with = "humantime_serde")]
    pub engine_timeout: Duration,
}

/// What a forward pass carrying catch-up chunks is sized to (see [`ServerConfig::pass_target`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PassTarget {
    /// [`AUTO_PASS_MULTIPLE`] times the measured cost of a one-token pass (a decode step):
    /// catch-up at most doubles the pass a waiting `Verify` or stream token sits behind. Where
    /// a pass's cost is mostly fixed (a GPU, or a CPU shared with other work) that still holds
    /// large chunks, and cutting them would save the others little; where every token costs
    /// its share (a CPU running the model alone) chunks become short.
    #[default]
    Auto,
    /// This long.
    Fixed(Duration),
    /// Chunks of `prefill_chunk_tokens`, whatever they cost: throughput first.
    Off,
}

/// How many one-token passes' worth of time an automatic pass target allows.
pub const AUTO_PASS_MULTIPLE: f64 = 2.0;

impl std::str::FromStr for PassTarget {
    type Err = String;

    /// `auto`, `0s` (or `0`, `off`), or a duration such as `150ms`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "0" | "off" => Ok(Self::Off),
            d => match humantime::parse_duration(d) {
                Ok(d) if d.is_zero() => Ok(Self::Off),
                Ok(d) => Ok(Self::Fixed(d)),
                Err(e) => Err(format!(
                    "pass target {d:?}: {e} (use auto, 0s or a duration such as 150ms)"
                )),
            },
        }
    }
}

impl std::fmt::Display for PassTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            Self::Off => f.write_str("0s"),
        }
    }
}

impl TryFrom<String> for PassTarget {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PassTarget> for String {
    fn from(t: PassTarget) -> String {
        t.to_string()
    }
}

/// Which engine runs the LLM (see [`ServerConfig::engine`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum EngineChoice {
    /// uhlm's own runtime, in this process.
    #[default]
    Embedded,
    /// An engine behind HTTP at this base URL (`http://host:port`).
    Remote { kind: RemoteKind, url: String },
}

impl EngineChoice {
    /// The remote engine's kind and URL; `None` for the embedded one.
    pub fn remote(&self) -> Option<(RemoteKind, &str)> {
        match self {
            Self::Embedded => None,
            Self::Remote { kind, url } => Some((*kind, url)),
        }
    }
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    /// `embedded`, `llama-server URL` or `vllm URL` (also `KIND=URL`).
    fn from_str(s: &str) -> Result<Self, String> {
        const USE: &str = "use embedded, llama-server http://HOST:PORT or vllm http://HOST:PORT";
        let s = s.trim();
        let (name, url) = match s.split_once(|c: char| c == '=' || c.is_whitespace()) {
            Some((k, u)) => (k, Some(u.trim())),
            None => (s, None),
        };
        let kind = match name {
            "embedded" if url.is_none() => return Ok(Self::Embedded),
            "llama-server" => RemoteKind::LlamaServer,
            "vllm" => RemoteKind::Vllm,
            _ => return Err(format!("unknown engine {s:?}: {USE}")),
        };
        match url {
            // Plain HTTP: the engine sits on the gateway's private network.
            Some(url) if url.starts_with("http://") => Ok(Self::Remote {
                kind,
                url: url.trim_end_matches('/').to_string(),
            }),
            Some(url) => Err(format!(
                "the {name} URL must start with http:// (got {url:?})"
            )),
            None => Err(format!("{name} needs its URL: {name} http://HOST:PORT")),
        }
    }
}

impl std::fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("embedded"),
            Self::Remote { kind, url } => write!(f, "{} {url}", kind.name()),
        }
    }
}

impl TryFrom<String> for EngineChoice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<EngineChoice> for String {
    fn from(e: EngineChoice) -> String {
        e.to_string()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 4433)),
            cert: None,
            key: None,
            self_signed: false,
            cert_dir: None,
            api_keys: None,
            api_key_list: Vec::new(),
            max_sessions: 256,
            max_connections: 1024,
            max_sessions_per_key: None,
            max_connections_per_key: None,
            max_context_tokens: 8192,
            max_generate_tokens: 4096,
            max_chain_links: 32,
            kv_memory_budget_bytes: 4 << 30,
            idle_timeout: Duration::from_secs(300),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            rate_limit: 1000.0,
            batch_wait: Duration::ZERO,
            max_batch: 64,
            max_batch_tokens: 256,
            prefill_chunk_tokens: 128,
            pass_target: PassTarget::Auto,
            workers: 1,
            kernel_threads: None,
            device: Device::Cpu,
            metrics: None,
            engine: EngineChoice::Embedded,
            engine_timeout: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    /// A loopback server on a free port with a fresh in-memory self-signed certificate and the
    /// given API keys: what tests, demos and embedded servers want.
    pub fn local(
        model: impl Into<PathBuf>,
        api_keys: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            model: model.into(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            self_signed: true,
            api_key_list: api_keys.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Reads a TOML file. Relative paths inside it are taken relative to the file's directory,
    /// and a self-signed certificate is kept next to it unless `cert_dir` says otherwise.
    pub fn from_toml_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::io(path, e))?;
        let mut config: Self = toml::from_str(&text).map_err(|source| ServerError::ConfigFile {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.cert,
            &mut config.key,
            &mut config.api_keys,
            &mut config.cert_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        if config.model.is_relative() && dir.join(&config.model).is_file() {
            config.model = dir.join(&config.model);
        }
        if config.cert_dir.is_none() {
            config.cert_dir = Some(dir.to_path_buf());
        }
        Ok(config)
    }

    /// The per-key caps on sessions and connections for a server with `keys` API keys.
    pub fn per_key_caps(&self, keys: usize) -> (usize, usize) {
        let default = |total: usize| if keys > 1 { total.div_ceil(2) } else { total };
        (
            self.max_sessions_per_key
                .unwrap_or_else(|| default(self.max_sessions)),
            self.max_connections_per_key
                .unwrap_or_else(|| default(self.max_connections)),
        )
    }

    /// Checks what can be checked without touching files.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: &str| Err(ServerError::Config(m.to_string()));
        if self.model.as_os_str().is_empty() {
            return bad("no model given (--model)");
        }
        match (&self.cert, &self.key, self.self_signed) {
            (Some(_), Some(_), false) | (None, None, true) => {}
            (Some(_), Some(_), true) => {
                return bad("--cert/--key and --self-signed exclude each other");
            }
            (Some(_), None, _) | (None, Some(_), _) => return bad("--cert and --key go together"),
            (None, None, false) => {
                return bad("no certificate: give --cert and --key, or --self-signed");
            }
        }
        if self.api_keys.is_none() && self.api_key_list.is_empty() {
            return bad("no API keys: give --api-keys FILE (unauthenticated mode does not exist)");
        }
        if self.max_sessions == 0
            || self.max_connections == 0
            || self.max_batch == 0
            || self.max_batch_tokens == 0
            || self.workers == 0
        {
            return bad(
                "max_sessions, max_connections, max_batch, max_batch_tokens and workers must be at least 1",
            );
        }
        if self.max_sessions_per_key == Some(0) || self.max_connections_per_key == Some(0) {
            return bad("max_sessions_per_key and max_connections_per_key must be at least 1");
        }
        if self.max_context_tokens < 2 {
            return bad("max_context_tokens must be at least 2");
        }
        if self.prefill_chunk_tokens == 0 {
            return bad("prefill_chunk_tokens must be at least 1");
        }
        if self.max_generate_tokens == 0 {
            return bad("max_generate_tokens must be at least 1");
        }
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes must be at least 1024");
        }
        if !self.rate_limit.is_finite() || self.rate_limit < 0.0 {
            return bad("rate_limit must be a finite number >= 0");
        }
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout must be positive");
        }
        if self.engine_timeout.is_zero() {
            return bad("engine_timeout must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pass_target_is_automatic_unless_set() {
        assert_eq!(ServerConfig::default().pass_target, PassTarget::Auto);
        for (text, target) in [
            ("auto", PassTarget::Auto),
            ("0s", PassTarget::Off),
            ("0", PassTarget::Off),
            ("150ms", PassTarget::Fixed(Duration::from_millis(150))),
        ] {
            let c: ServerConfig = toml::from_str(&format!("pass_target = \"{text}\"")).unwrap();
            assert_eq!(c.pass_target, target, "{text}");
            assert_eq!(target.to_string().parse::<PassTarget>(), Ok(target));
        }
        assert!(toml::from_str::<ServerConfig>("pass_target = \"soon\"").is_err());
    }

    #[test]
    fn unknown_keys_and_missing_credentials_are_rejected() {
        assert!(toml::from_str::<ServerConfig>("modle = \"x\"").is_err());
        let mut c = ServerConfig::local("/m.gguf", ["k"]);
        c.validate().unwrap();
        c.api_key_list.clear();
        assert!(matches!(c.validate(), Err(ServerError::Config(_))));
        let mut c = ServerConfig::local("/m.gguf", ["k"]);
        c.self_signed = false;
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_defaults_bound_what_one_peer_can_take() {
        let c = ServerConfig::default();
        assert!(c.rate_limit > 0.0, "rate limiting is on by default");
        assert!(c.max_connections > 0 && c.max_sessions > 0);
        assert!(c.prefill_chunk_tokens > 0 && c.idle_timeout > Duration::ZERO);
        let mut zero = ServerConfig::local("/m.gguf", ["k"]);
        zero.max_connections = 0;
        assert!(zero.validate().is_err());
    }
}
