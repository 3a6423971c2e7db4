//! What every fuzz target checks, as plain functions, so that two runners share them:
//!
//! - `fuzz/` (cargo-fuzz, nightly, libFuzzer with AddressSanitizer) searches for new inputs:
//!   `cargo xtask fuzz`, run by hand or on a schedule;
//! - [`replay`] runs kept inputs through the same checks on the stable toolchain, as an ordinary
//!   test of `cargo xtask test` (`tests/replay.rs`: every file of `fuzz/seeds/TARGET`, and of
//!   `fuzz/corpus/TARGET` where a fuzzing run left one), so that an input found once, a crash
//!   included once it is copied into the seeds, is checked on every run.
//!
//! Each module is one target: untrusted bytes into one of the project's parsers, with the
//! properties it must keep. A violated property panics, as libFuzzer expects.

#![forbid(unsafe_code)]

use arbitrary::{Arbitrary, Unstructured};

pub mod chat_prompt;
pub mod codec_decode;
pub mod decode_frame;
pub mod device_replies;
pub mod gguf;
pub mod server_config;
pub mod verify_request;

/// Every target, as `fuzz/Cargo.toml` and `cargo fuzz list` name them.
pub const TARGETS: [&str; 7] = [
    "chat_prompt",
    "codec_decode",
    "decode_frame",
    "device_replies",
    "gguf",
    "server_config",
    "verify_request",
];

/// A target name that [`TARGETS`] does not hold.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownTarget(pub String);

/// Runs one input file's bytes through `target`'s check, reading typed inputs exactly as
/// libfuzzer-sys's `fuzz_target!` does. Panics where the check finds a violated property.
pub fn replay(target: &str, bytes: &[u8]) -> Result<(), UnknownTarget> {
    match target {
        "chat_prompt" => typed(bytes, chat_prompt::check),
        "codec_decode" => codec_decode::check(bytes),
        "decode_frame" => decode_frame::check(bytes),
        "device_replies" => typed(bytes, device_replies::check),
        "gguf" => gguf::check(bytes),
        "server_config" => typed(bytes, server_config::check),
        "verify_request" => typed(bytes, verify_request::check),
        other => return Err(UnknownTarget(other.to_string())),
    }
    Ok(())
}

/// libfuzzer-sys's reading of a typed input (its `fuzz_target!` with `|input: T|`): inputs
/// shorter than the type's minimum size, or that do not build a `T`, are skipped.
fn typed<'a, T: Arbitrary<'a>>(bytes: &'a [u8], check: impl FnOnce(T)) {
    if bytes.len() < T::size_hint(0).0 {
        return;
    }
    if let Ok(input) = T::arbitrary_take_rest(Unstructured::new(bytes)) {
        check(input);
    }
}
