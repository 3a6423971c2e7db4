//! `uhlm_fuzz_checks::verify_request` says what this target checks (`cargo xtask fuzz`).

#![no_main]

use uhlm_fuzz_checks::verify_request::{Input, check};

libfuzzer_sys::fuzz_target!(|input: Input| check(input));
