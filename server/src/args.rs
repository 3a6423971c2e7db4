//! The server's command-line flags (the `cli` feature): each one given overrides the same field
//! of the TOML configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use uhlm_model::Device;

use crate::config::{PassTarget, ServerConfig};
use crate::error::ServerError;

/// CLI flags; every one that is given overrides the same field of the config file.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServerArgs {
    /// LLM GGUF path or default model name (e.g. `smollm2`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// UDP address to listen on (port 0: any free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Generate (or reuse) a self-signed certificate for localhost and print its fingerprint.
    #[arg(long)]
    pub self_signed: bool,
    /// Directory for the self-signed certificate and key (default: the config file's
    /// directory, or `~/.config/uhlm`).
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// File of API keys, one per line.
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    #[arg(long)]
    pub max_sessions: Option<usize>,
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most sessions per API key (default: half of --max-sessions with several keys).
    #[arg(long)]
    pub max_sessions_per_key: Option<usize>,
    /// Most connections per API key (default: half of --max-connections with several keys).
    #[arg(long)]
    pub max_connections_per_key: Option<usize>,
    #[arg(long)]
    pub max_context_tokens: Option<u32>,
    /// Most tokens one Generate request (LLM-only streaming) may ask for.
    #[arg(long)]
    pub max_generate_tokens: Option<u32>,
    /// Most drafts a chain Verify may carry beyond the first (pipelined devices).
    #[arg(long)]
    pub max_chain_links: Option<u32>,
    /// Memory for the sessions' KV caches and the running forward pass (default 4 GiB).
    #[arg(long)]
    pub kv_memory_budget_bytes: Option<u64>,
    /// e.g. `5m`, `30s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    #[arg(long)]
    pub max_frame_bytes: Option<u32>,
    /// Requests per second per API key (0: unlimited).
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// e.g. `2ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub batch_wait: Option<Duration>,
    /// Most sessions per forward pass.
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Most tokens per forward pass.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Most context tokens per forward pass when catching a session up.
    #[arg(long)]
    pub prefill_chunk_tokens: Option<usize>,
    /// Duration a catching-up forward pass is sized to: `auto` (default: twice a one-token
    /// pass, measured), a duration such as `150ms`, or `0s` (chunks by tokens only).
    #[arg(long)]
    pub pass_target: Option<PassTarget>,
    /// Model worker threads.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Threads for the matmul kernels.
    #[arg(long)]
    pub kernel_threads: Option<usize>,
    /// Where the model runs: cpu, cuda or cuda:N (GPU builds: `cargo xtask cuda`).
    #[arg(long)]
    pub device: Option<Device>,
    /// HTTP address for /healthz and /metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// What runs the LLM: `embedded` (default), `llama-server URL` or `vllm URL`.
    #[arg(long, num_args = 1..=2, value_names = ["KIND", "URL"])]
    pub engine: Vec<String>,
    /// Longest wait for one request to a remote engine, e.g. `30s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub engine_timeout: Option<Duration>,
}

impl ServerArgs {
    /// Overrides `config` with every flag that was given.
    pub fn apply(self, config: &mut ServerConfig) -> Result<(), ServerError> {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut config.model, self.model);
        set(&mut config.listen, self.listen);
        if self.cert.is_some() || self.key.is_some() {
            config.cert = self.cert;
            config.key = self.key;
            config.self_signed = false;
        }
        if self.self_signed {
            config.self_signed = true;
            config.cert = None;
            config.key = None;
        }
        if self.cert_dir.is_some() {
            config.cert_dir = self.cert_dir;
        }
        if self.api_keys.is_some() {
            config.api_keys = self.api_keys;
        }
        set(&mut config.max_sessions, self.max_sessions);
        set(&mut config.max_connections, self.max_connections);
        set(
            &mut config.max_sessions_per_key,
            self.max_sessions_per_key.map(Some),
        );
        set(
            &mut config.max_connections_per_key,
            self.max_connections_per_key.map(Some),
        );
        set(&mut config.max_context_tokens, self.max_context_tokens);
        set(&mut config.max_generate_tokens, self.max_generate_tokens);
        set(&mut config.max_chain_links, self.max_chain_links);
        set(
            &mut config.kv_memory_budget_bytes,
            self.kv_memory_budget_bytes,
        );
        set(&mut config.idle_timeout, self.idle_timeout);
        set(&mut config.max_frame_bytes, self.max_frame_bytes);
        set(&mut config.rate_limit, self.rate_limit);
        set(&mut config.batch_wait, self.batch_wait);
        set(&mut config.max_batch, self.max_batch);
        set(&mut config.max_batch_tokens, self.max_batch_tokens);
        set(&mut config.prefill_chunk_tokens, self.prefill_chunk_tokens);
        set(&mut config.pass_target, self.pass_target);
        set(&mut config.workers, self.workers);
        if self.kernel_threads.is_some() {
            config.kernel_threads = self.kernel_threads;
        }
        set(&mut config.device, self.device);
        if self.metrics.is_some() {
            config.metrics = self.metrics;
        }
        if !self.engine.is_empty() {
            config.engine = self
                .engine
                .join(" ")
                .parse()
                .map_err(|e| ServerError::Config(format!("--engine: {e}")))?;
        }
        set(&mut config.engine_timeout, self.engine_timeout);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineChoice;
    use crate::engine::RemoteKind;

    #[test]
    fn toml_round_trips_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "model = \"/m.gguf\"\nself_signed = true\napi_keys = \"keys.txt\"\n\
             batch_wait = \"5ms\"\nidle_timeout = \"1m\"\nmax_batch = 4\ndevice = \"cpu\"\n",
        )
        .unwrap();
        let mut config = ServerConfig::from_toml_file(&path).unwrap();
        assert_eq!(config.batch_wait, Duration::from_millis(5));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(
            config.api_keys.as_deref(),
            Some(dir.path().join("keys.txt").as_path())
        );
        assert_eq!(config.cert_dir.as_deref(), Some(dir.path()));
        config.validate().unwrap();
        let args = ServerArgs {
            max_batch: Some(8),
            batch_wait: Some(Duration::from_millis(1)),
            ..ServerArgs::default()
        };
        args.apply(&mut config).unwrap();
        assert_eq!(config.max_batch, 8);
        assert_eq!(config.batch_wait, Duration::from_millis(1));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_a_gpu_at_start() {
        let e = toml::from_str::<ServerConfig>("device = \"cuda:0\"").unwrap_err();
        assert!(e.to_string().contains("no CUDA support"), "{e}");
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServerArgs,
        }
        let e = <Serve as clap::Parser>::try_parse_from(["serve", "--device", "cuda"])
            .err()
            .expect("--device cuda was accepted");
        assert!(e.to_string().contains("no CUDA support"), "{e}");
    }

    #[test]
    fn the_engine_is_chosen_in_toml_or_on_the_command_line() {
        let c: ServerConfig =
            toml::from_str("engine = \"llama-server http://127.0.0.1:8080/\"").unwrap();
        let url = "http://127.0.0.1:8080".to_string();
        let llama = |url: &str| EngineChoice::Remote {
            kind: RemoteKind::LlamaServer,
            url: url.into(),
        };
        assert_eq!(c.engine, llama(&url));
        assert_eq!(
            toml::to_string(&c)
                .unwrap()
                .lines()
                .find(|l| l.starts_with("engine =")),
            Some("engine = \"llama-server http://127.0.0.1:8080\"")
        );
        for bad in [
            "engine = \"llama-server\"",
            "engine = \"vllm\"",
            "engine = \"tgi http://x\"",
            "engine = \"llama-server ftp://x\"",
        ] {
            assert!(toml::from_str::<ServerConfig>(bad).is_err(), "{bad}");
        }
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServerArgs,
        }
        let mut c = ServerConfig::local("/m.gguf", ["k"]);
        let serve = <Serve as clap::Parser>::try_parse_from([
            "serve",
            "--engine",
            "llama-server",
            "http://127.0.0.1:8080",
            "--max-batch",
            "2",
        ])
        .unwrap();
        serve.args.apply(&mut c).unwrap();
        assert_eq!(c.engine, llama(&url));
        let serve = <Serve as clap::Parser>::try_parse_from([
            "serve",
            "--engine",
            "vllm",
            "http://10.0.0.2:8000/",
        ])
        .unwrap();
        serve.args.apply(&mut c).unwrap();
        assert_eq!(
            c.engine,
            EngineChoice::Remote {
                kind: RemoteKind::Vllm,
                url: "http://10.0.0.2:8000".into()
            }
        );
        assert_eq!(c.engine.to_string(), "vllm http://10.0.0.2:8000");
        assert_eq!(c.max_batch, 2);
        let serve =
            <Serve as clap::Parser>::try_parse_from(["serve", "--engine", "embedded"]).unwrap();
        serve.args.apply(&mut c).unwrap();
        assert_eq!(c.engine, EngineChoice::Embedded);
        let serve = <Serve as clap::Parser>::try_parse_from(["serve", "--engine", "tgi"]).unwrap();
        assert!(serve.args.apply(&mut c).is_err());
    }
}
