//! The LLM's text side, which the server keeps whichever engine runs the model: the vocabulary
//! devices must share, the tokenizer and chat template for prompts sent as text, the name and
//! context window announced to devices.

use std::sync::Arc;

use uhlm_model::chat_template::ChatTemplate;
use uhlm_model::tokenizer::Tokenizer;
use uhlm_model::{Model, ModelCard};

/// The model loaded in this process (embedded engine), or only its GGUF header (a remote
/// engine runs the weights).
#[derive(Clone)]
pub(crate) enum LlmCard {
    Loaded(Arc<Model>),
    Header(Arc<ModelCard>),
}

impl LlmCard {
    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            LlmCard::Loaded(m) => m.tokenizer(),
            LlmCard::Header(c) => &c.tokenizer,
        }
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match self {
            LlmCard::Loaded(m) => m.chat_template(),
            LlmCard::Header(c) => c.chat_template.as_ref(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            LlmCard::Loaded(m) => &m.info().name,
            LlmCard::Header(c) => &c.name,
        }
    }

    pub fn context_length(&self) -> usize {
        match self {
            LlmCard::Loaded(m) => m.info().context_length,
            LlmCard::Header(c) => c.context_length,
        }
    }

    pub fn stand_in_for(&self) -> Option<&str> {
        match self {
            LlmCard::Loaded(m) => m.info().stand_in_for.as_deref(),
            LlmCard::Header(c) => c.stand_in_for.as_deref(),
        }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.tokenizer().fingerprint()
    }
}
