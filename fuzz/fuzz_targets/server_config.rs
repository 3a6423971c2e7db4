//! `uhlm_fuzz_checks::server_config` says what this target checks (`cargo xtask fuzz`).

#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| uhlm_fuzz_checks::server_config::check(text));
