//! The flags `uhlm calibrate` and `uhlm bench paper` share: which pair, which prompts.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use uhlm_eval::pair::Pair;
use uhlm_model::{LoadOptions, fetch};

#[derive(Debug, Args)]
pub struct PairArgs {
    /// Draft model (path or registry name).
    #[arg(long, default_value = fetch::DRAFT_NAME)]
    pub slm: String,
    /// Verifying model (path or registry name).
    #[arg(long, default_value = "smollm2")]
    pub llm: String,
    /// A packaged set (fortunes, riddles, mixed) or a JSONL file.
    #[arg(long, default_value = "mixed")]
    pub prompts: String,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// CPU threads for the models' kernels.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl PairArgs {
    /// The two model files (fetched names resolved) and the loaded pair.
    pub fn load(&self) -> Result<(PathBuf, PathBuf, Pair)> {
        let slm = fetch::resolve_model(&self.slm)?;
        let llm = fetch::resolve_model(&self.llm)?;
        let options = LoadOptions {
            threads: self.threads,
            ..LoadOptions::default()
        };
        let pair = Pair::load(&slm, &llm, &options)?;
        Ok((slm, llm, pair))
    }
}
