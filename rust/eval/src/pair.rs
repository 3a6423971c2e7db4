//! The SLM/LLM pair under evaluation and the prompt tokens both models see.

use std::path::Path;
use std::sync::Arc;

use uhlm_core::chat::ChatMessage;
use uhlm_model::{LoadOptions, Model};

use crate::EvalError;
use crate::prompts::EvalPrompt;

/// A draft model and the model that verifies it; their vocabularies are the same.
pub struct Pair {
    pub slm: Arc<Model>,
    pub llm: Arc<Model>,
}

impl Pair {
    /// Loads both models and checks that they share a vocabulary.
    pub fn load(slm: &Path, llm: &Path, opts: &LoadOptions) -> Result<Self, EvalError> {
        Self::new(Model::load(slm, opts)?, Model::load(llm, opts)?)
    }

    pub fn new(slm: Arc<Model>, llm: Arc<Model>) -> Result<Self, EvalError> {
        if slm.fingerprint() != llm.fingerprint() {
            return Err(EvalError::VocabularyMismatch {
                slm: slm.path().display().to_string(),
                llm: llm.path().display().to_string(),
            });
        }
        Ok(Self { slm, llm })
    }

    /// The token ids of `prompt`, chat prompts rendered with the LLM's template.
    pub fn prompt_ids(&self, prompt: &EvalPrompt) -> Result<Vec<u32>, EvalError> {
        prompt_ids(&self.llm, prompt)
    }
}

/// The token ids `model` sees for `prompt`.
pub fn prompt_ids(model: &Model, prompt: &EvalPrompt) -> Result<Vec<u32>, EvalError> {
    let tokenizer = model.tokenizer();
    if !prompt.chat {
        return Ok(tokenizer.encode(&prompt.prompt, true)?);
    }
    let template = model
        .chat_template()
        .ok_or_else(|| EvalError::NoChatTemplate {
            model: model.path().display().to_string(),
        })?;
    let text = template.render(&[ChatMessage::user(prompt.prompt.clone())], true)?;
    // Chat templates write their own special tokens.
    Ok(tokenizer.encode(&text, false)?)
}
