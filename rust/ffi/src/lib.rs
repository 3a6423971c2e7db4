//! `uhlm-ffi`: the device SDK ([`uhlm_sdk`]) for Kotlin, Swift and Python, through uniffi.
//!
//! This crate only converts types at the boundary: every behaviour lives in `uhlm-sdk`,
//! `uhlm-server` and `uhlm-model`. Generation streams through a [`TokenListener`] the app
//! implements and stops through [`HybridEngine::cancel`] or by dropping (cancelling) the
//! foreign future. `cargo xtask bindgen` regenerates `bindings/` from the built library.

mod config;
mod engine;
mod error;
mod events;
mod models;
mod server;

pub use config::{
    ChatMessage, EngineConfig, GenerationOptions, Mode, PolicyConfig, ThresholdMode, Uncertainty,
};
pub use engine::HybridEngine;
pub use error::{UhlmError, describe_error};
pub use events::{
    EngineStats, GenerationSummary, LoadProgressListener, StopReason, TokenEvent, TokenListener,
    TokenSource,
};
pub use models::{DefaultModels, ensure_default_models};
pub use server::EmbeddedServer;

uniffi::setup_scaffolding!();
