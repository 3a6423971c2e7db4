//! What a model file says about itself without its weights: name, vocabulary, context window,
//! tokenizer and chat template.
//!
//! A server that delegates the forward passes to another inference engine still owns the
//! protocol's text side (vocabulary checks, chat prompts, token ids), so it reads these from
//! the same GGUF the engine serves, in milliseconds and a few MiB, instead of loading gigabytes
//! of weights it would never use.

use std::path::{Path, PathBuf};

use crate::architecture::Architecture;
use crate::chat_template::ChatTemplate;
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::model::STAND_IN_KEY;
use crate::tokenizer::Tokenizer;

/// A model's metadata, tokenizer and chat template, read from its GGUF header.
pub struct ModelCard {
    pub path: PathBuf,
    pub architecture: Architecture,
    /// `general.name`, or the file stem when absent.
    pub name: String,
    /// Rows of the embedding table: the width of the model's logits.
    pub vocab_size: usize,
    pub context_length: usize,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// See [`crate::ModelInfo::stand_in_for`].
    pub stand_in_for: Option<String>,
}

impl std::fmt::Debug for ModelCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCard")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl ModelCard {
    /// Reads the header of the GGUF at `path` (no tensor data).
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let g = GgufFile::open(path)?;
        let arch_name = g.architecture()?;
        let architecture = Architecture::from_gguf_name(&arch_name).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.clone(),
            }
        })?;
        let p = architecture.gguf_name();
        let tokenizer = Tokenizer::from_gguf(&g.content)
            .map_err(|e| ModelError::corrupt(path, format!("tokenizer metadata: {e}")))?;
        let chat_template = ChatTemplate::from_gguf(&g.content)
            .map_err(|e| ModelError::corrupt(path, format!("chat template: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            architecture,
            name: g.model_name(),
            vocab_size: g.tensor_dims("token_embd.weight")?[0],
            context_length: g.usize(&format!("{p}.context_length"))?,
            tokenizer,
            chat_template,
            stand_in_for: g.opt_string(STAND_IN_KEY).map(str::to_string),
        })
    }

    /// See [`Tokenizer::fingerprint`].
    pub fn fingerprint(&self) -> [u8; 32] {
        self.tokenizer.fingerprint()
    }
}
