//! [`HybridEngine`]: the on-device model, the threshold policy and the server link, shared by
//! every generation of an app.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;
use uhlm_core::lookahead::LookaheadLimit;
use uhlm_core::threshold::{Calibration, ThresholdPolicy};
use uhlm_model::{LoadOptions, LoadProgress, Model, ModelInfo};

use crate::cancel::{CancelToken, Running};
use crate::config::{EngineConfig, GenerationOptions, Prompt};
use crate::draft_model::DraftModel;
use crate::drafter::Drafter;
use crate::error::SdkError;
use crate::events::{GenerationSummary, TokenListener};
use crate::link::Link;
use crate::shared::Inner;
use crate::stats::{Stats, StatsAccumulator};
use crate::transport::Target;

/// The device-side engine: drafts with the SLM and verifies uncertain tokens on the server.
///
/// Build it once per app; it is `Send + Sync`, reuses one QUIC connection across generations
/// and runs one generation at a time (concurrent calls queue).
pub struct HybridEngine {
    inner: Arc<Inner>,
    /// The runtime the engine created, if it was not given one.
    runtime: Option<Runtime>,
}

impl HybridEngine {
    /// Loads the SLM and prepares (but does not open) the server connection, on a runtime of
    /// its own.
    pub fn new(config: EngineConfig) -> Result<Self, SdkError> {
        Self::with_progress(config, None)
    }

    /// Like [`new`](Self::new), telling `progress` the fraction of the SLM's weights loaded.
    pub fn with_progress(
        config: EngineConfig,
        progress: Option<LoadProgress>,
    ) -> Result<Self, SdkError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("uhlm-sdk")
            .enable_all()
            .build()
            .map_err(|e| SdkError::InvalidConfig(format!("cannot start a runtime: {e}")))?;
        let mut engine = Self::load(config, runtime.handle().clone(), progress, own_session)?;
        engine.runtime = Some(runtime);
        Ok(engine)
    }

    /// Like [`new`](Self::new), on the caller's tokio runtime.
    pub fn with_runtime(config: EngineConfig, rt: Handle) -> Result<Self, SdkError> {
        Self::load(config, rt, None, own_session)
    }

    /// Like [`with_runtime`](Self::with_runtime), drafting with the model `draft` makes from the
    /// loaded SLM instead of a session of it: another runtime for the same vocabulary, or a
    /// load generator's stand-in. The loaded SLM still provides the tokenizer, the chat
    /// template and the vocabulary fingerprint.
    pub fn with_draft_model(
        config: EngineConfig,
        rt: Handle,
        draft: impl FnOnce(&Arc<Model>) -> Result<Box<dyn DraftModel>, SdkError>,
    ) -> Result<Self, SdkError> {
        Self::load(config, rt, None, draft)
    }

    fn load(
        config: EngineConfig,
        rt: Handle,
        progress: Option<LoadProgress>,
        draft: impl FnOnce(&Arc<Model>) -> Result<Box<dyn DraftModel>, SdkError>,
    ) -> Result<Self, SdkError> {
        config.validate()?;
        let calibration = match &config.calibration {
            Some(path) => {
                let json = std::fs::read_to_string(path).map_err(|e| {
                    SdkError::InvalidConfig(format!("calibration {}: {e}", path.display()))
                })?;
                Some(Calibration::from_json(&json).map_err(|e| {
                    SdkError::InvalidConfig(format!("calibration {}: {e}", path.display()))
                })?)
            }
            None => None,
        };
        let kind = calibration
            .as_ref()
            .map_or(&config.uncertainty, |c| &c.estimator);
        let estimator = kind.build();
        let policy = match &calibration {
            Some(c) => ThresholdPolicy::with_calibration(config.policy.clone(), c),
            None => ThresholdPolicy::new(config.policy.clone()).map(|p| p.for_estimator(kind)),
        }
        .map_err(|e| SdkError::InvalidConfig(format!("policy: {e}")))?;
        let opts = LoadOptions {
            threads: config.threads,
            progress,
            ..LoadOptions::default()
        };
        let model = Model::load(&config.slm_path, &opts)?;
        let target = Target::from_config(&config, model.fingerprint())?;
        let link = Link::new(
            target,
            Duration::from_millis(config.reconnect_backoff_ms),
            Duration::from_millis(config.reconnect_backoff_max_ms),
        );
        let drafter = Drafter::new(draft(&model)?, model.info().vocab_size, estimator);
        let lookahead = Mutex::new(LookaheadLimit::new(config.max_lookahead));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                model,
                drafter: Arc::new(Mutex::new(drafter)),
                policy: Mutex::new(policy),
                lookahead,
                link,
                rt,
                stats: Mutex::new(StatsAccumulator::default()),
                busy: tokio::sync::Mutex::new(()),
                session_ids: AtomicU64::new(1),
                running: Running::default(),
            }),
            runtime: None,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// What the on-device model is.
    pub fn model_info(&self) -> ModelInfo {
        self.inner.model.info().clone()
    }

    /// The vocabulary fingerprint sent in `Hello` (the server's model must have the same).
    pub fn model_fingerprint(&self) -> [u8; 32] {
        self.inner.model.fingerprint()
    }

    /// Token ids the engine would generate from for `prompt`.
    pub fn tokenize_prompt(
        &self,
        prompt: &Prompt,
        chat_template: bool,
    ) -> Result<Vec<u32>, SdkError> {
        self.inner.render(prompt, chat_template)
    }

    /// Generates, streaming each final token to `listener`. Runs on the engine's runtime
    /// whatever runtime awaits it.
    pub async fn generate(
        &self,
        prompt: Prompt,
        options: GenerationOptions,
        listener: Arc<dyn TokenListener>,
        cancel: CancelToken,
    ) -> Result<GenerationSummary, SdkError> {
        self.start(prompt, options, listener, cancel).wait().await
    }

    /// [`generate`](Self::generate) for synchronous callers. Must not be called from inside
    /// an async task.
    pub fn generate_blocking(
        &self,
        prompt: Prompt,
        options: GenerationOptions,
        listener: Arc<dyn TokenListener>,
        cancel: CancelToken,
    ) -> Result<GenerationSummary, SdkError> {
        self.start(prompt, options, listener, cancel)
            .wait_blocking()
    }

    /// Starts a generation in the background.
    pub fn start(
        &self,
        prompt: Prompt,
        options: GenerationOptions,
        listener: Arc<dyn TokenListener>,
        cancel: CancelToken,
    ) -> GenerationHandle {
        // Moved into the task, so it unregisters however the task ends: finished, aborted, or
        // dropped unpolled with its runtime.
        let running = Unregister(self.inner.clone(), self.inner.running.start(cancel.clone()));
        let generation = crate::generation::run(
            self.inner.clone(),
            prompt,
            options,
            listener,
            cancel.clone(),
        );
        let task = async move {
            let _running = running;
            generation.await
        };
        GenerationHandle {
            cancel,
            join: self.inner.rt.spawn(task),
            rt: self.inner.rt.clone(),
        }
    }

    /// Stops every generation of this engine that is running; each returns
    /// [`SdkError::Cancelled`] soon after. It cancels each one's own [`CancelToken`], so a
    /// token shared with a later generation stays cancelled.
    pub fn cancel_all(&self) {
        self.inner.running.cancel_all();
    }

    /// Counters over every generation so far.
    pub fn stats(&self) -> Stats {
        self.inner
            .stats
            .lock()
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    /// The threshold policy's current `u_th` (it moves as verdicts arrive).
    pub fn threshold(&self) -> f32 {
        self.inner
            .policy
            .lock()
            .map(|p| p.threshold())
            .unwrap_or(f32::NAN)
    }

    /// Call when the device's network changed: the endpoint moves to a new socket so the QUIC
    /// connection migrates; if it cannot, the engine reconnects on the next uplink.
    pub fn network_changed(&self) {
        let _enter = self.inner.rt.enter();
        self.inner.link.network_changed();
    }
}

impl Drop for HybridEngine {
    fn drop(&mut self) {
        self.inner.link.close();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A running generation.
pub struct GenerationHandle {
    cancel: CancelToken,
    join: JoinHandle<Result<GenerationSummary, SdkError>>,
    rt: Handle,
}

impl GenerationHandle {
    /// Stops the generation; [`wait`](Self::wait) then returns [`SdkError::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    pub async fn wait(self) -> Result<GenerationSummary, SdkError> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(SdkError::Model(format!("the generation task failed: {e}"))),
        }
    }

    /// Blocks the calling (non-async) thread until the generation ends.
    pub fn wait_blocking(self) -> Result<GenerationSummary, SdkError> {
        let rt = self.rt.clone();
        rt.block_on(self.wait())
    }
}

/// Takes a generation off its engine's running list when its task ends.
struct Unregister(Arc<Inner>, u64);

impl Drop for Unregister {
    fn drop(&mut self) {
        self.0.running.finish(self.1);
    }
}

/// The default draft model: a session of the loaded SLM.
fn own_session(model: &Arc<Model>) -> Result<Box<dyn DraftModel>, SdkError> {
    Ok(Box::new(model.session()))
}
