//! `uhlm_fuzz_checks::codec_decode` says what this target checks (`cargo xtask fuzz`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| uhlm_fuzz_checks::codec_decode::check(data));
