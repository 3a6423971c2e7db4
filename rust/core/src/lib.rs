//! `uhlm-core`: everything the hybrid loop decides, with no I/O.
//!
//! Like `quinn-proto`, this crate is plain data and functions. The device SDK and the server
//! drive it with real models and sockets; the tests here drive it with synthetic distributions,
//! so the exactness guarantees are checked in milliseconds.
//!
//! - [`chat`]: chat messages shared by templates, protocol and bindings.
//! - [`sampling`]: logits → the distribution a system samples from (temperature, top-k, top-p).
//! - [`verify`]: speculative-sampling verification of one draft token.
//! - [`verify_partial`]: the same, exact, against an LLM known only by a sampling engine's report.
//! - [`uncertainty`]: how unsure the SLM is about its draft, from one forward pass.
//! - [`sample`]: calibration samples, `(u, beta)` with or without a weight.
//! - [`threshold`]: when an uncertain token is worth sending (fit, thresholds, recalibration).
//! - [`risk_control`]: a threshold whose quality cost is bounded with confidence (Learn-then-Test).
//! - [`lookahead`]: the device's drafting window while a chain of drafts is being verified.
//! - [`codec`]: the compressed distribution sent uplink, and the exact `q'` the server sees.
//! - [`protocol`]: the messages and framing on the wire.
//! - [`fast_exp`]: a vectorisable `exp` for the per-token passes over the vocabulary.

#![forbid(unsafe_code)]

pub mod chat;
pub mod codec;
pub mod fast_exp;
pub mod lookahead;
pub mod protocol;
pub mod risk_control;
pub mod sample;
pub mod sampling;
pub mod threshold;
pub mod uncertainty;
pub mod verify;
pub mod verify_partial;
