//! `uhlm-server`: hosts the LLM for many devices behind QUIC (TLS 1.3, ALPN `uhlm/5`).
//!
//! Devices send only their uncertain tokens; for each, the server catches its KV cache up on
//! the tokens the device committed locally and verifies the draft with speculative-sampling
//! rules (`uhlm_core::verify`). A device in LLM-only mode instead sends `Generate` once and the
//! server streams the tokens it samples. Model compute runs on dedicated worker threads; tokio
//! only moves bytes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), uhlm_server::ServerError> {
//! use uhlm_server::{Server, ServerConfig};
//! let handle = Server::start(ServerConfig::local("smollm2", ["secret-key"])).await?;
//! println!("listening on {} pin {}", handle.local_addr(), handle.cert_fingerprint());
//! handle.shutdown().await;
//! # Ok(()) }
//! ```

#[cfg(feature = "cli")]
mod args;
mod auth;
pub mod config;
mod connection;
mod engine;
mod error;
mod framed;
mod http;
mod key_quota;
mod llm_card;
mod loopback;
mod metrics;
mod rate_limit;
#[cfg(feature = "cli")]
pub mod serve;
mod server;
mod session;
mod shared;
mod tls;
mod worker;

#[cfg(feature = "cli")]
pub use args::ServerArgs;
pub use config::{EngineChoice, PassTarget, ServerConfig};
pub use engine::{EngineCheck, EngineError, RemoteKind, check_engine};
pub use error::ServerError;
pub use loopback::LoopbackServer;
pub use server::{Server, ServerHandle};
pub use tls::{SELF_SIGNED_CERT_FILE, SELF_SIGNED_KEY_FILE, cert_fingerprint};
pub use worker::kv_bytes_per_token;
