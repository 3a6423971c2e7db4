//! `uhlm_fuzz_checks::chat_prompt` says what this target checks (`cargo xtask fuzz`).

#![no_main]

use uhlm_fuzz_checks::chat_prompt::{Input, check};

libfuzzer_sys::fuzz_target!(|input: Input| check(input));
