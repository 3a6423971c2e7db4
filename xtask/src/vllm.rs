//! `cargo xtask vllm-check`: the gateway on a real vLLM, where vLLM runs (it needs CUDA; not on
//! the project's CPU hosts). Starts `vllm serve` on the real LLM with the flags the gateway
//! needs, or uses one already running (`--url`), and runs the exactness test through it
//! (`server/tests/it/engine_vllm.rs`, `through_a_real_vllm_...`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::command::run_with_env;
use crate::soak::{free_port, http_get};

/// The model vLLM serves: the Hugging Face release of the real pair's server model, whose
/// vocabulary is the GGUF's the gateway reads.
const DEFAULT_MODEL: &str = "Qwen/Qwen2.5-Coder-1.5B-Instruct";

/// What `vllm serve` needs to be the gateway's engine (README, "The gateway on vLLM").
const VLLM_FLAGS: &[&str] = &[
    // The log-probabilities of the distribution it samples from (after temperature, top-k
    // and top-p), not of the raw logits.
    "--logprobs-mode",
    "processed_logprobs",
    // Whole-vocabulary answers, where the asked ones are not exact.
    "--max-logprobs",
    "-1",
    // Cached prompt tokens in each answer's usage (the gateway's engine_prompt_tokens).
    "--enable-prompt-tokens-details",
    // vLLM's neutral defaults, not the model's generation_config.json (the gateway sets every
    // sampling parameter anyway).
    "--generation-config",
    "vllm",
];

#[derive(clap::Args)]
pub struct VllmArgs {
    /// A vLLM already serving the model (`http://HOST:PORT`); otherwise `vllm serve` is
    /// started here.
    #[arg(long)]
    url: Option<String>,
    /// The model `vllm serve` loads (a Hugging Face name or a local directory).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
}

/// A `vllm serve` child; killed on drop.
struct VllmServe(Child);

impl Drop for VllmServe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn vllm_check(args: VllmArgs) -> Result<()> {
    let (_serve, url) = match args.url {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let port = free_port(false)?.to_string();
            let mut command = Command::new("vllm");
            command
                .args(["serve", &args.model, "--host", "127.0.0.1", "--port", &port])
                .args(VLLM_FLAGS)
                .stdin(Stdio::null());
            println!("\n==> {command:?}");
            let child = command
                .spawn()
                .context("cannot start `vllm serve`: is vLLM installed (pip install vllm)?")?;
            let serve = VllmServe(child);
            let url = format!("http://127.0.0.1:{port}");
            wait_healthy(&url, Duration::from_secs(900))?;
            (Some(serve), url)
        }
    };
    run_with_env(
        "cargo",
        &[
            "test",
            "--release",
            "-p",
            "uhlm-server",
            "--test",
            "it",
            "engine_vllm::through_a_real_vllm",
            "--",
            "--nocapture",
        ],
        &[("UHLM_VLLM_URL", &url), ("UHLM_REQUIRE_VLLM", "1")],
    )
}

/// Waits until vLLM's `/health` answers 200 (it loads and compiles for minutes).
fn wait_healthy(url: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let addr = url.trim_start_matches("http://");
    while Instant::now() < deadline {
        if http_get(addr, "/health").is_some_and(|a| a.starts_with("HTTP/1.1 200")) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    bail!("vLLM at {url} was not healthy within {} s", limit.as_secs())
}
