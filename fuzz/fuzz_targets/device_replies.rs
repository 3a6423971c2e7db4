//! `uhlm_fuzz_checks::device_replies` says what this target checks (`cargo xtask fuzz`).

#![no_main]

use uhlm_fuzz_checks::device_replies::{Input, check};

libfuzzer_sys::fuzz_target!(|input: Input| check(input));
