//! Every kept fuzz input through its target's check, on the stable toolchain: the seeds in
//! `fuzz/seeds/TARGET` (committed; a crash a fuzzing run finds goes there once fixed) and the
//! working corpus in `fuzz/corpus/TARGET` where `cargo xtask fuzz` has left one. One test per
//! target, so a failure names it; the panic message names the input file.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use uhlm_fuzz_checks::{TARGETS, replay};

/// The runtime tests' helpers: a cached model, or a skip (a failure with `UHLM_REQUIRE_MODELS`).
#[path = "../../model/tests/runtime_support/mod.rs"]
mod support;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `fuzz/KIND/target`, sorted (none where the directory does not exist).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Replays every kept input of `target`; returns how many seeds it ran.
fn replay_target(target: &str) -> usize {
    let seeds = inputs("seeds", target);
    let corpus = inputs("corpus", target);
    for file in seeds.iter().chain(&corpus) {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let outcome = catch_unwind(AssertUnwindSafe(|| replay(target, &bytes)));
        match outcome {
            Ok(result) => result.expect("a known target"),
            Err(_) => panic!(
                "fuzz target `{target}` fails on {} (reproduce: cargo +nightly fuzz run {target} {})",
                file.display(),
                file.display()
            ),
        }
    }
    seeds.len()
}

#[test]
fn every_target_is_replayed_here_and_has_seeds() {
    let here = include_str!("replay.rs");
    for target in TARGETS {
        assert!(
            here.contains(&format!("fn {target}()")),
            "no replay test for `{target}`"
        );
        assert!(
            !inputs("seeds", target).is_empty(),
            "fuzz/seeds/{target} holds no input"
        );
    }
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let bins = manifest.matches("[[bin]]").count();
    assert_eq!(
        bins,
        TARGETS.len(),
        "fuzz/Cargo.toml's targets and TARGETS differ"
    );
    for target in TARGETS {
        assert!(manifest.contains(&format!("name = \"{target}\"")));
    }
    assert!(replay("no_such_target", b"").is_err());
}

#[test]
fn chat_prompt() {
    // The target reads SmolLM2's tokenizer and template from the model cache.
    if support::cached_model(uhlm_fuzz_checks::chat_prompt::MODEL).is_none() {
        return;
    }
    assert!(replay_target("chat_prompt") > 0);
}

#[test]
fn codec_decode() {
    assert!(replay_target("codec_decode") > 0);
}

#[test]
fn decode_frame() {
    assert!(replay_target("decode_frame") > 0);
}

#[test]
fn device_replies() {
    assert!(replay_target("device_replies") > 0);
}

#[test]
fn gguf() {
    assert!(replay_target("gguf") > 0);
}

#[test]
fn server_config() {
    assert!(replay_target("server_config") > 0);
}

#[test]
fn verify_request() {
    assert!(replay_target("verify_request") > 0);
}
