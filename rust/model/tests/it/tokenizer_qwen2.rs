//! The Qwen2.5-Coder tokenizer rebuilt from its GGUF (`gpt2` model, `qwen2` pre-tokenizer)
//! against llama.cpp's own tokenizer on the same file.
//!
//! `tests/data/qwen2_llamacpp_tokens.json` holds the ids `llama-tokenize` (the llama.cpp build
//! named in the file, on the GGUF whose SHA-256 it names) printed for each text, with
//! `--stdin --no-escape --ids --no-bos`; `llama-tokenize` parses special tokens written in the
//! text by default, as uhlm's `encode` always does. The texts stress the pre-tokenizer:
//! code and indentation, digits, contractions, punctuation runs, Unicode (combining marks, ZWJ
//! emoji, scripts without spaces), whitespace-only text, HumanEval prompts and chat specials.
//!
//! The model files live in the model cache (`uhlm models fetch`); the tests skip with a note
//! when a file is absent, and fail instead when `UHLM_REQUIRE_MODELS` is set.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;
use uhlm_model::tokenizer::Tokenizer;

const QWEN_05B: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const QWEN_15B: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";

const GOLDEN: &str = include_str!("../data/qwen2_llamacpp_tokens.json");

#[derive(Deserialize)]
struct Golden {
    llama_cpp: String,
    model_sha256: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn golden() -> Golden {
    serde_json::from_str(GOLDEN).expect("golden file parses")
}

/// A model from the uhlm cache, or `None` (with a note) when it is not there.
fn cached_model(name: &str) -> Option<PathBuf> {
    let dir = uhlm_model::fetch::models_dir().ok()?;
    let path = dir.join(name);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("UHLM_REQUIRE_MODELS").is_none(),
        "{} is missing and UHLM_REQUIRE_MODELS is set",
        path.display()
    );
    eprintln!("skipping: {} is not in the model cache", path.display());
    None
}

fn qwen(name: &str) -> Option<Tokenizer> {
    let path = cached_model(name)?;
    Some(Tokenizer::from_gguf_path(&path).expect("tokenizer from gguf"))
}

fn qwen_05b() -> Option<&'static Tokenizer> {
    static T: OnceLock<Option<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| qwen(QWEN_05B)).as_ref()
}

#[test]
fn golden_file_is_well_formed() {
    let g = golden();
    assert!(!g.llama_cpp.is_empty());
    assert_eq!(g.model_sha256.len(), 64);
    assert!(g.cases.len() >= 40, "{} cases", g.cases.len());
    for case in &g.cases {
        assert!(case.ids.iter().all(|&id| id < 151_936), "{:?}", case.text);
    }
}

#[test]
fn qwen2_matches_llama_cpp_ids() {
    let Some(t) = qwen_05b() else { return };
    assert_eq!(t.vocab_size(), 151_936);
    assert!(!t.adds_bos());
    let g = golden();
    let mut mismatches = Vec::new();
    for case in &g.cases {
        let ids = t.encode(&case.text, false).unwrap();
        // No BOS for Qwen: adding special tokens changes nothing.
        assert_eq!(t.encode(&case.text, true).unwrap(), ids, "{:?}", case.text);
        if ids != case.ids {
            let pieces = |ids: &[u32]| -> Vec<String> {
                ids.iter()
                    .map(|&i| t.token_piece(i).unwrap_or("?").to_string())
                    .collect()
            };
            mismatches.push(format!(
                "{:?}\n  llama.cpp {:?}\n            {:?}\n  uhlm      {:?}\n            {:?}",
                case.text,
                case.ids,
                pieces(&case.ids),
                ids,
                pieces(&ids)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ from llama.cpp ({}):\n{}",
        mismatches.len(),
        g.cases.len(),
        g.llama_cpp,
        mismatches.join("\n")
    );
}

#[test]
fn qwen2_decode_round_trips() {
    let Some(t) = qwen_05b() else { return };
    for case in &golden().cases {
        assert_eq!(t.decode(&case.ids, false).unwrap(), case.text);
        let ids = t.encode(&case.text, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), case.text);
    }
}

#[test]
fn qwen2_specials_are_single_tokens() {
    let Some(t) = qwen_05b() else { return };
    for special in [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|fim_prefix|>",
    ] {
        let ids = t.encode(special, false).unwrap();
        assert_eq!(ids.len(), 1, "{special}");
        assert_eq!(t.token_piece(ids[0]), Some(special));
    }
    let im_end = t.piece_id("<|im_end|>").unwrap();
    assert!(t.is_special(im_end));
    assert!(t.eos_ids().contains(&im_end));
    let ids = t.encode("<|im_start|>user\nhi<|im_end|>\n", false).unwrap();
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nhi\n");
}

#[test]
fn qwen2_sizes_share_one_vocabulary() {
    let Some(small) = qwen_05b() else { return };
    let Some(large) = qwen(QWEN_15B) else { return };
    assert_eq!(small.fingerprint(), large.fingerprint());
    for case in &golden().cases {
        assert_eq!(
            small.encode(&case.text, false).unwrap(),
            large.encode(&case.text, false).unwrap()
        );
    }
}
