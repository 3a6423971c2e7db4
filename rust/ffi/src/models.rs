//! The default model pair, for demos and tests: the SmolLM2 LLM from the model cache and the
//! draft derived from it with the measured default recipe. Only with the `desktop` feature
//! (fetching and deriving stay off phones); without it the call answers
//! [`UhlmError::Unsupported`].

#[cfg(feature = "desktop")]
use uhlm_model::fetch::{models_dir, resolve_model};
#[cfg(feature = "desktop")]
use uhlm_model::{DEFAULT_DRAFT_FILE_NAME, ensure_default_draft};

use crate::error::UhlmError;

/// Paths of the default server model (LLM) and on-device draft (SLM).
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct DefaultModels {
    pub llm_path: String,
    pub slm_path: String,
}

/// Finds the default LLM in the model cache (`uhlm fetch smollm2` puts it there) and derives
/// the default draft next to it unless it already exists. Blocking; the first call takes a few
/// seconds.
#[uniffi::export]
pub fn ensure_default_models() -> Result<DefaultModels, UhlmError> {
    #[cfg(not(feature = "desktop"))]
    {
        Err(UhlmError::not_in_phone_build(
            "the default model cache; an app downloads its model itself",
        ))
    }
    #[cfg(feature = "desktop")]
    ensure_default_models_desktop()
}

#[cfg(feature = "desktop")]
fn ensure_default_models_desktop() -> Result<DefaultModels, UhlmError> {
    let llm = resolve_model("smollm2").map_err(|e| UhlmError::ModelNotFound {
        path: e.to_string(),
    })?;
    let dir = models_dir().map_err(|e| UhlmError::ModelNotFound {
        path: e.to_string(),
    })?;
    let slm = dir.join(DEFAULT_DRAFT_FILE_NAME);
    ensure_default_draft(&llm, &slm)?;
    Ok(DefaultModels {
        llm_path: llm.display().to_string(),
        slm_path: slm.display().to_string(),
    })
}
