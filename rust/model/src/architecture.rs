//! The architectures this runtime implements, and the shape facts each reports.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::forward_pass::PassCost;

/// Architectures this runtime implements, by their GGUF `general.architecture` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// `llama`: SmolLM2, TinyLlama, Llama 2/3, Mistral.
    Llama,
    /// `qwen2`: llama with q/k/v biases and NeoX rope.
    Qwen2,
    /// `gemma3`.
    Gemma3,
}

impl Architecture {
    /// Parses a GGUF `general.architecture` value.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The name GGUF uses, also the prefix of its hyper-parameter keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// Shape facts every architecture reports.
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    pub vocab_size: usize,
    pub context_length: usize,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub pass_cost: PassCost,
}
