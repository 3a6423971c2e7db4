//! [`HybridEngine`]: the SDK engine behind an object foreign code holds.

use std::sync::Arc;

use uhlm_sdk as sdk;

use crate::config::{ChatMessage, EngineConfig, GenerationOptions};
use crate::error::UhlmError;
use crate::events::{
    EngineStats, GenerationSummary, ListenerAdapter, LoadProgressListener, TokenListener,
};

/// The device-side engine: loads the SLM once, then generates with the server verifying the
/// uncertain tokens. One generation runs at a time; concurrent calls queue.
#[derive(uniffi::Object)]
pub struct HybridEngine {
    engine: sdk::HybridEngine,
}

/// Cancels its generation when dropped: foreign runtimes drop the Rust future when the caller's
/// coroutine/task is cancelled, and the SDK's generation runs on its own runtime, so without
/// this it would go on. After a normal end, cancelling the spent token does nothing.
struct CancelOnDrop(sdk::CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl HybridEngine {
    async fn run(
        &self,
        prompt: sdk::Prompt,
        options: GenerationOptions,
        listener: Arc<dyn TokenListener>,
    ) -> Result<GenerationSummary, UhlmError> {
        let cancel = CancelOnDrop(sdk::CancelToken::new());
        let summary = self
            .engine
            .generate(
                prompt,
                options.into(),
                Arc::new(ListenerAdapter(listener)),
                cancel.0.clone(),
            )
            .await?;
        Ok(summary.into())
    }
}

#[uniffi::export]
impl HybridEngine {
    /// Loads the on-device model (blocking: call it off the UI thread) and prepares the server
    /// connection, which opens on the first generation.
    #[uniffi::constructor]
    pub fn new(config: EngineConfig) -> Result<Arc<Self>, UhlmError> {
        Self::with_progress(config, None)
    }

    /// Like the constructor, telling `progress` how much of the model has been read (0 to 1),
    /// for a progress bar while the weights load.
    #[uniffi::constructor]
    pub fn with_progress(
        config: EngineConfig,
        progress: Option<Arc<dyn LoadProgressListener>>,
    ) -> Result<Arc<Self>, UhlmError> {
        let progress =
            progress.map(|p| sdk::LoadProgress::new(move |fraction| p.on_progress(fraction)));
        let engine = sdk::HybridEngine::with_progress(config.try_into()?, progress)?;
        Ok(Arc::new(Self { engine }))
    }

    /// Continues `prompt`, streaming each final token to `listener`; ends with the summary.
    /// Cancelling the awaiting coroutine/task cancels the generation.
    pub async fn generate(
        &self,
        prompt: String,
        options: GenerationOptions,
        listener: Arc<dyn TokenListener>,
    ) -> Result<GenerationSummary, UhlmError> {
        self.run(sdk::Prompt::Text(prompt), options, listener).await
    }

    /// Like [`generate`](Self::generate) for a conversation, rendered with the model's chat
    /// template.
    pub async fn generate_chat(
        &self,
        messages: Vec<ChatMessage>,
        options: GenerationOptions,
        listener: Arc<dyn TokenListener>,
    ) -> Result<GenerationSummary, UhlmError> {
        let messages = messages.into_iter().map(Into::into).collect();
        self.run(sdk::Prompt::Chat(messages), options, listener)
            .await
    }

    /// Cancels every generation in flight; each ends with [`UhlmError::Cancelled`].
    pub fn cancel(&self) {
        self.engine.cancel_all();
    }

    /// Counters over every generation so far.
    pub fn stats(&self) -> EngineStats {
        self.engine.stats().into()
    }

    /// Call when the device's network changed (Wi-Fi ↔ cellular): the QUIC connection migrates
    /// to a new socket, or reconnects on the next uplink.
    pub fn network_changed(&self) {
        self.engine.network_changed();
    }

    /// The threshold policy's current uncertainty threshold.
    pub fn threshold(&self) -> f32 {
        self.engine.threshold()
    }

    /// The on-device model's vocabulary size. Sending each token's dense f32 distribution (the
    /// papers' HLM baseline) costs 4 bytes times this: the reference for "uplink bytes saved".
    pub fn vocab_size(&self) -> u32 {
        u32::try_from(self.engine.model_info().vocab_size).unwrap_or(u32::MAX)
    }
}
