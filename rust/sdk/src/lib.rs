//! `uhlm-sdk`: the device side of uncertainty-aware hybrid language models.
//!
//! A [`HybridEngine`] runs a small on-device model (SLM) that drafts every token and sends only
//! the tokens it is unsure about, as a compressed next-token distribution, to a `uhlm-server`
//! over QUIC; the server's large model verifies them with speculative-sampling rules. When the
//! server is unreachable the engine keeps generating on the device and comes back to hybrid
//! decoding as soon as the server answers again.
//!
//! The API is shaped for the Kotlin/Swift/Python bindings: owned types, one error enum
//! ([`SdkError`]), events through a listener trait ([`TokenListener`]) and cancellation through
//! a token ([`CancelToken`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use uhlm_sdk::{CancelToken, EngineConfig, GenerationOptions, HybridEngine, NoopListener, Prompt};
//!
//! let engine = HybridEngine::new(EngineConfig {
//!     slm_path: "draft.gguf".into(),
//!     server: Some("127.0.0.1:4433".into()),
//!     pin: Some("ab12...".into()),
//!     api_key: "secret".into(),
//!     ..EngineConfig::default()
//! })?;
//! let summary = engine.generate_blocking(
//!     Prompt::Text("The capital of France is".into()),
//!     GenerationOptions::default(),
//!     Arc::new(NoopListener),
//!     CancelToken::new(),
//! )?;
//! println!("{} ({} tokens sent of {})", summary.text, summary.stats.sent, summary.stats.decisions);
//! # Ok::<(), uhlm_sdk::SdkError>(())
//! ```

#![forbid(unsafe_code)]

mod cancel;
mod config;
mod draft_model;
mod drafter;
mod engine;
mod error;
mod events;
mod generation;
mod link;
pub mod raw;
mod shared;
mod stats;
mod text;
mod tls;
mod transport;

pub use cancel::CancelToken;
pub use config::{EngineConfig, GenerationOptions, Mode, Prompt};
pub use draft_model::DraftModel;
pub use engine::{GenerationHandle, HybridEngine};
pub use error::SdkError;
pub use events::{
    GenerationSummary, NoopListener, StopReason, TokenEvent, TokenListener, TokenSource,
};
pub use stats::Stats;

// The core types that appear in this API, so apps need only this crate.
pub use uhlm_core::chat::ChatMessage;
pub use uhlm_core::codec::Codec;
pub use uhlm_core::sampling::SamplingOptions;
pub use uhlm_core::threshold::{PolicyConfig, ThresholdMode};
pub use uhlm_core::uncertainty::UncertaintyKind;
pub use uhlm_model::{LoadProgress, Model};
