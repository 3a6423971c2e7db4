//! `uhlm run`: one hybrid generation against a uhlm server, streamed to stdout, or one JSON
//! object with `--json`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::Args;
use uhlm_model::fetch;
use uhlm_sdk::{
    CancelToken, ChatMessage, Codec, EngineConfig, GenerationOptions, GenerationSummary,
    HybridEngine, Mode, PolicyConfig, Prompt, SamplingOptions, TokenEvent, TokenListener,
    TokenSource,
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// On-device model: a GGUF path or a cached model name.
    #[arg(long)]
    slm: String,
    /// Server address, host:port.
    #[arg(long)]
    server: Option<String>,
    /// SHA-256 of the server certificate, as `uhlm-server` prints it [default: system roots].
    #[arg(long)]
    pin: Option<String>,
    /// The API key. On a shared machine prefer `UHLM_API_KEY` or `--api-key-file`: a command
    /// line is visible to every user in `ps`.
    #[arg(long, env = "UHLM_API_KEY", default_value = "", hide_env_values = true)]
    api_key: String,
    /// A file whose first line is the API key (wins over `--api-key`).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// uhlm (skip confident tokens), hlm (verify all), slm (local only), llm (server only).
    #[arg(long, default_value = "uhlm")]
    mode: Mode,
    /// Uplink codec: dense-f32, dense-f16, topk:32, topp:0.99, ... [default: core's default].
    #[arg(long)]
    codec: Option<Codec>,
    /// A fixed uncertainty threshold (no online recalibration).
    #[arg(long)]
    threshold: Option<f32>,
    /// Calibration JSON from a calibration run.
    #[arg(long)]
    calibration: Option<PathBuf>,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of every random draw [default: random].
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Stop once the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Print one JSON object (text, token_ids, sources, stats) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// CPU threads for the on-device model.
    #[arg(long)]
    threads: Option<usize>,
    /// Most tokens drafted ahead while drafts are verified (0: one draft at a time)
    /// [default: the SDK's].
    #[arg(long)]
    max_lookahead: Option<usize>,
    prompt: String,
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.prompt.is_empty() {
        bail!("empty prompt: give the text to continue");
    }
    let slm = fetch::resolve_model(&args.slm)?;
    let api_key = match &args.api_key_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the API key from {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        None => args.api_key.clone(),
    };
    let policy = match (args.mode, args.threshold) {
        (Mode::Hlm, _) => PolicyConfig::send_all(),
        (_, Some(u)) => PolicyConfig::fixed(u),
        (_, None) => PolicyConfig::default(),
    };
    let config = EngineConfig {
        slm_path: slm,
        server: args.server.clone(),
        pin: args.pin.clone(),
        api_key,
        mode: args.mode,
        policy,
        calibration: args.calibration.clone(),
        codec: args.codec.clone().unwrap_or_default(),
        threads: args.threads,
        max_lookahead: args
            .max_lookahead
            .unwrap_or(EngineConfig::default().max_lookahead),
        ..EngineConfig::default()
    };
    let engine = HybridEngine::new(config).context("starting the engine")?;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        Prompt::Chat(messages)
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let options = GenerationOptions {
        sampling: SamplingOptions {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            max_tokens: args.max_tokens,
            seed: args.seed,
            stop: args.stop.clone(),
        },
        chat_template: false,
    };
    let listener: Arc<dyn TokenListener> = if args.json {
        Arc::new(uhlm_sdk::NoopListener)
    } else {
        Arc::new(Printer::new(std::io::stdout().is_terminal()))
    };
    let summary = engine.generate_blocking(prompt, options, listener, CancelToken::new())?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!();
        eprintln!("{}", one_line_stats(&summary));
    }
    Ok(())
}

/// Streams token text to stdout, coloured by who decided each token when `color`.
pub struct Printer {
    color: bool,
    /// The first write error (a closed pipe); later text is dropped.
    failed: Mutex<bool>,
}

impl Printer {
    pub fn new(color: bool) -> Self {
        Self {
            color,
            failed: Mutex::new(false),
        }
    }

    fn write(&self, text: &str, source: Option<TokenSource>) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if *failed || text.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let r = match (self.color, source) {
            (true, Some(s)) => write!(out, "{}{text}\x1b[0m", ansi(s)),
            _ => write!(out, "{text}"),
        };
        *failed = r.and_then(|()| out.flush()).is_err();
    }
}

impl TokenListener for Printer {
    fn on_token(&self, event: TokenEvent) {
        self.write(&event.text, Some(event.source));
    }

    fn on_link_change(&self, online: bool, detail: String) {
        if online {
            tracing::info!("{detail}");
        } else {
            eprintln!("\n[offline: {detail}; continuing on the device]");
        }
    }

    fn on_tail_text(&self, text: String) {
        self.write(&text, None);
    }
}

/// The colour of a token's source.
pub fn ansi(source: TokenSource) -> &'static str {
    match source {
        TokenSource::Local => "\x1b[32m",
        TokenSource::Accepted => "\x1b[36m",
        TokenSource::Resampled => "\x1b[33m",
        TokenSource::Remote => "\x1b[34m",
        TokenSource::Offline => "\x1b[35m",
    }
}

fn one_line_stats(summary: &GenerationSummary) -> String {
    let s = &summary.stats;
    format!(
        "{} tokens ({:?}): {} local, {} sent ({} accepted, {} resampled), {} remote, {} offline; \
         {} B up, {} B down, {:.1} tokens/s, rtt p50 {:.1} ms; device {:.0} ms: prefill {:.0}, \
         drafting {:.0} ({} drafts discarded), waiting {:.0}",
        summary.token_ids.len(),
        summary.stop,
        s.skipped,
        s.sent,
        s.accepted,
        s.resampled,
        s.remote,
        s.offline,
        s.uplink_bytes,
        s.downlink_bytes,
        s.tokens_per_second,
        s.rtt_p50_ms,
        s.elapsed_ms,
        s.prefill_ms,
        s.draft_ms,
        s.discarded,
        s.wait_ms,
    )
}
