//! `uhlm demo`: the whole system on one machine. Fetches the default pair (Qwen2.5-Coder 0.5B
//! on the device, 1.5B on the server; `--pair smollm2` for the small one), starts a server
//! in-process on loopback (fresh self-signed certificate, random API key), runs one hybrid
//! generation with each token coloured by who decided it, and prints what the hybrid loop saved.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use uhlm_core::codec::{self, Codec};
use uhlm_core::protocol::{Draft, Message, Verify, encode_frame};
use uhlm_sdk::{
    CancelToken, EngineConfig, GenerationOptions, GenerationSummary, HybridEngine, Mode, Prompt,
    SamplingOptions, TokenSource,
};
use uhlm_server::LoopbackServer;

use crate::pair_args::ModelPairArgs;
use crate::run::{Printer, ansi};

/// A coding request, the default pair's trade.
const DEFAULT_PROMPT: &str =
    "Write a Python function `is_palindrome(s)` that ignores case and punctuation. Code only.";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// What to ask the model.
    prompt: Option<String>,
    #[command(flatten)]
    models: ModelPairArgs,
    #[arg(long, default_value_t = 96)]
    max_tokens: u32,
    /// 0 is greedy decoding, the setting the default pair's shipped calibration was measured at.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let (draft, llm) = args.models.paths()?;
    let calibration = args.models.calibration()?;
    let server =
        LoopbackServer::start(llm.clone(), None).context("starting the in-process server")?;
    eprintln!(
        "server: {} on {} (certificate {})",
        llm.display(),
        server.local_addr(),
        server.cert_fingerprint()
    );
    eprintln!("device: {}", draft.display());
    match &calibration {
        Some(path) => eprintln!(
            "policy: at most {:.0}% of outputs may differ from the server model's, calibration {}",
            uhlm_core::threshold::DEFAULT_MAX_OUTPUT_RISK * 100.0,
            path.display()
        ),
        None => eprintln!(
            "policy: no calibration for these models (`uhlm calibrate` makes one): the device \
             sends every token once its first verdicts arrive"
        ),
    }
    let engine = HybridEngine::new(EngineConfig {
        slm_path: draft,
        server: Some(server.local_addr().to_string()),
        pin: Some(server.cert_fingerprint().to_string()),
        api_key: server.api_key().to_string(),
        mode: Mode::Uhlm,
        calibration,
        ..EngineConfig::default()
    })
    .context("starting the engine")?;
    let color = std::io::stdout().is_terminal();
    if color {
        eprintln!(
            "legend: {}local\x1b[0m {}accepted\x1b[0m {}resampled\x1b[0m {}offline\x1b[0m\n",
            ansi(TokenSource::Local),
            ansi(TokenSource::Accepted),
            ansi(TokenSource::Resampled),
            ansi(TokenSource::Offline)
        );
    }
    let prompt = args.prompt.unwrap_or_else(|| DEFAULT_PROMPT.to_string());
    println!("> {prompt}\n");
    let summary = engine.generate_blocking(
        Prompt::Text(prompt),
        GenerationOptions {
            sampling: SamplingOptions {
                temperature: args.temperature,
                max_tokens: args.max_tokens,
                seed: args.seed,
                ..SamplingOptions::default()
            },
            chat_template: true,
        },
        Arc::new(Printer::new(color)),
        CancelToken::new(),
    )?;
    println!("\n");
    print_summary(&summary, engine.model_info().vocab_size)?;
    drop(engine);
    server.stop();
    Ok(())
}

/// Bytes of one `Verify` carrying a dense-f32 distribution: the HLM baseline's per-token cost.
fn dense_verify_bytes(vocab: usize) -> Result<u64> {
    let q = vec![1.0 / vocab as f32; vocab];
    let bytes = codec::encode(&Codec::DenseF32, &q)?.bytes;
    let msg = Message::Verify(Verify {
        seq: 0,
        position: 0,
        skipped: Vec::new(),
        draft: Some(Draft { token: 0, q: bytes }),
        uncertainty: 0.0,
        chain: Vec::new(),
    });
    Ok(encode_frame(&msg, u32::MAX)?.len() as u64)
}

fn print_summary(summary: &GenerationSummary, vocab: usize) -> Result<()> {
    let s = &summary.stats;
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let baseline = dense_verify_bytes(vocab)? * s.decisions;
    let saved = pct(baseline.saturating_sub(s.uplink_bytes), baseline);
    let rows = [
        ("tokens", format!("{}", summary.token_ids.len())),
        (
            "skipped (decided on device)",
            format!("{} ({:.1}%)", s.skipped, pct(s.skipped, s.decisions)),
        ),
        (
            "sent for verification",
            format!("{} ({:.1}%)", s.sent, pct(s.sent, s.decisions)),
        ),
        (
            "accepted / resampled",
            format!(
                "{} / {} (acceptance {:.1}%)",
                s.accepted,
                s.resampled,
                pct(s.accepted, s.sent)
            ),
        ),
        ("offline", format!("{}", s.offline)),
        (
            "uplink bytes",
            format!("{} (dense-f32 HLM baseline {baseline})", s.uplink_bytes),
        ),
        ("bytes saved vs baseline", format!("{saved:.2}%")),
        ("downlink bytes", format!("{}", s.downlink_bytes)),
        (
            "round-trip time",
            format!("mean {:.1} ms, p95 {:.1} ms", s.rtt_mean_ms, s.rtt_p95_ms),
        ),
        ("tokens/s", format!("{:.1}", s.tokens_per_second)),
        (
            "device time",
            format!(
                "{:.0} ms: prefill {:.0}, drafting {:.0} ({} drafts discarded), waiting {:.0}",
                s.elapsed_ms, s.prefill_ms, s.draft_ms, s.discarded, s.wait_ms
            ),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
    Ok(())
}
