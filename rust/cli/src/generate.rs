//! `uhlm generate`: local generation with one model, streamed to stdout.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use uhlm_core::chat::ChatMessage;
use uhlm_core::sampling::SamplingOptions;
use uhlm_model::generate::generate;
use uhlm_model::{LoadOptions, Model, fetch};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: path to a GGUF or a registry name.
    #[arg(long, short)]
    model: String,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed of the sampler [default: random].
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f32>,
    /// Stop once the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Print the generated token ids, comma-separated, instead of the text.
    #[arg(long)]
    ids: bool,
    /// CPU threads for the kernels.
    #[arg(long)]
    threads: Option<usize>,
    prompt: String,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.prompt.is_empty() {
        bail!("empty prompt: give the text to continue");
    }
    let path = fetch::resolve_model(&args.model)?;
    let model = Model::load(
        &path,
        &LoadOptions {
            threads: args.threads,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = model.tokenizer();
    let prompt_ids = if args.chat {
        let template = model
            .chat_template()
            .with_context(|| format!("{} has no chat template; drop --chat", path.display()))?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        let text = template.render(&messages, true)?;
        // Chat templates write their own special tokens (as transformers does).
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    tracing::info!(seed, prompt_tokens = prompt_ids.len(), "generating");
    let opts = SamplingOptions {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_tokens: args.max_tokens,
        seed: Some(seed),
        stop: args.stop.clone(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut session = model.session();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let start = Instant::now();
    let generation = generate(&mut session, &prompt_ids, &opts, &mut rng, |_, text| {
        if args.ids || text.is_empty() {
            return ControlFlow::Continue(());
        }
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                // A closed pipe (`| head`) ends generation instead of failing it.
                write_error = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(());
    }
    if args.ids {
        let list: Vec<String> = generation.tokens.iter().map(u32::to_string).collect();
        writeln!(out, "{}", list.join(","))?;
    } else {
        writeln!(out)?;
    }
    tracing::info!(
        tokens = generation.tokens.len(),
        stop = ?generation.stop,
        tok_s = generation.tokens.len() as f64 / elapsed.max(1e-9),
        "done"
    );
    Ok(())
}
