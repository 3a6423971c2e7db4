//! One prompt every compared system answers: plain text to continue, or a question wrapped in
//! the model's chat template.

use serde::{Deserialize, Serialize};

/// One prompt: plain text to continue, or a question wrapped in the model's chat template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPrompt {
    pub prompt: String,
    #[serde(default)]
    pub chat: bool,
}
