//! `uhlm-linkemu`: a userspace UDP link emulator, so uhlm can be measured through poor links on
//! machines without `netem` or root (CI included).
//!
//! Built like `quinn`: the link model is I/O-free and deterministic, and a thin tokio layer
//! moves real packets through it.
//!
//! - [`profile`]: what a link does per direction (rate, queue, delay, jitter, loss) and the
//!   named presets `ideal`, `good`, `cell-edge`, `poor`.
//! - [`link`]: one direction of the model: `offer(now, len)` → dropped or delivered at a time.
//! - [`relay`]: [`LinkEmulator`], a UDP relay on loopback between a client and a server.
//! - [`stats`]: the relay's counters per direction.
//! - [`units`]: parsing of `1mbit`, `32KiB`, `1%`, `30ms` in profile specs.

#![forbid(unsafe_code)]

pub mod link;
pub mod profile;
pub mod relay;
pub mod stats;
pub mod units;

pub use link::{DropReason, Fate, Link};
pub use profile::{DirectionProfile, GilbertElliott, LinkProfile, ProfileError};
pub use relay::{LinkEmulator, RelayOptions, StartError};
pub use stats::{Counter, DirectionStats, DropCounts, EmulatorStats};
