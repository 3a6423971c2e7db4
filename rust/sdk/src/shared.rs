//! What an engine and its running generations share: the configuration, the on-device model
//! and its drafter, the threshold policy, the lookahead learned so far, the server link, the
//! runtime, the counters and the generations' cancel tokens; and rendering a prompt to token
//! ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use uhlm_core::chat::ChatMessage;
use uhlm_core::lookahead::LookaheadLimit;
use uhlm_core::threshold::ThresholdPolicy;
use uhlm_model::Model;

use crate::cancel::Running;
use crate::config::{EngineConfig, Prompt};
use crate::drafter::Drafter;
use crate::error::SdkError;
use crate::link::Link;
use crate::stats::StatsAccumulator;

/// State shared by the engine and its running generation.
pub(crate) struct Inner {
    pub config: EngineConfig,
    pub model: Arc<Model>,
    pub drafter: Arc<Mutex<Drafter>>,
    pub policy: Mutex<ThresholdPolicy>,
    /// The lookahead learned so far (round trip, draft time, rejections): properties of the
    /// link and the device, carried from one generation to the next.
    pub lookahead: Mutex<LookaheadLimit>,
    pub link: Link,
    pub rt: Handle,
    pub stats: Mutex<StatsAccumulator>,
    /// One generation at a time: they share the SLM session.
    pub busy: tokio::sync::Mutex<()>,
    /// The next `Start.session_id`.
    pub session_ids: AtomicU64,
    /// The generations running, for [`HybridEngine::cancel_all`](crate::HybridEngine::cancel_all).
    pub running: Running,
}

impl Inner {
    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Token ids of a prompt, as the on-device model (and the server, same vocabulary) sees it.
    pub fn render(&self, prompt: &Prompt, chat_template: bool) -> Result<Vec<u32>, SdkError> {
        let tokenizer = self.model.tokenizer();
        let bad = |e: &dyn std::fmt::Display| SdkError::InvalidConfig(format!("prompt: {e}"));
        let ids = match prompt {
            Prompt::Text(t) if !chat_template => tokenizer.encode(t, true).map_err(|e| bad(&e))?,
            Prompt::Text(t) => self.render_chat(&[ChatMessage::user(t.clone())])?,
            Prompt::Chat(messages) => self.render_chat(messages)?,
        };
        if ids.is_empty() {
            return Err(SdkError::InvalidConfig("the prompt is empty".into()));
        }
        Ok(ids)
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, SdkError> {
        let template = self.model.chat_template().ok_or_else(|| {
            SdkError::InvalidConfig("the on-device model has no chat template".into())
        })?;
        let text = template
            .render(messages, true)
            .map_err(|e| SdkError::InvalidConfig(format!("chat template: {e}")))?;
        let tokenizer = self.model.tokenizer();
        let mut ids = tokenizer
            .encode(&text, false)
            .map_err(|e| SdkError::InvalidConfig(format!("prompt: {e}")))?;
        if let Some(bos) = tokenizer.bos_id().filter(|_| tokenizer.adds_bos())
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }
}
