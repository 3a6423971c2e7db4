//! The `uhlm` binary end to end: output formats, determinism, and error messages.
//! Tests that need a cached model skip with a note when it is absent.

use std::process::{Command, Output};

fn uhlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uhlm"))
        .args(args)
        .output()
        .expect("run uhlm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn have(name: &str) -> bool {
    let ok = uhlm_model::fetch::resolve_model(name).is_ok();
    if !ok {
        assert!(
            std::env::var_os("UHLM_REQUIRE_MODELS").is_none(),
            "model `{name}` is not in the cache and UHLM_REQUIRE_MODELS is set"
        );
        eprintln!("skipping: model `{name}` is not in the cache");
    }
    ok
}

fn parse_ids(line: &str) -> Vec<u32> {
    line.trim()
        .split(',')
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("not an id list: {line:?}"))
        })
        .collect()
}

#[test]
fn tokenize_prints_comma_separated_ids_only() {
    if !have("smollm2") {
        return;
    }
    let o = uhlm(&["tokenize", "--model", "smollm2", "Hello world"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "19556,905\n");
}

#[test]
fn tokenize_json_pairs_ids_with_pieces() {
    if !have("smollm2") {
        return;
    }
    let o = uhlm(&["tokenize", "--json", "--model", "smollm2", "Hello world"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{"id": 19556, "piece": "Hello"}, {"id": 905, "piece": "Ġworld"}])
    );
}

#[test]
fn tokenize_add_special_prepends_gemma_bos() {
    if !have("gemma3") {
        return;
    }
    let plain = uhlm(&["tokenize", "--model", "gemma3", "Hello world"]);
    let with_bos = uhlm(&[
        "tokenize",
        "--add-special",
        "--model",
        "gemma3",
        "Hello world",
    ]);
    assert_eq!(stdout(&plain), "9259,1902\n");
    assert_eq!(stdout(&with_bos), "2,9259,1902\n");
}

#[test]
fn greedy_generation_is_deterministic() {
    if !have("smollm2") {
        return;
    }
    let args = [
        "generate",
        "--model",
        "smollm2",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--ids",
        "The capital of France is",
    ];
    let a = uhlm(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = uhlm(&args);
    let ids = parse_ids(&stdout(&a));
    assert!(!ids.is_empty() && ids.len() <= 8);
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn seeded_sampling_is_reproducible_and_text_matches_ids() {
    if !have("smollm2") {
        return;
    }
    let base = [
        "generate",
        "--model",
        "smollm2",
        "--temperature",
        "0.9",
        "--seed",
        "7",
        "--max-tokens",
        "12",
        "--chat",
        "Name a fruit.",
    ];
    let ids_a = uhlm(&[&base[..], &["--ids"]].concat());
    let ids_b = uhlm(&[&base[..], &["--ids"]].concat());
    assert!(ids_a.status.success(), "{}", stderr(&ids_a));
    assert_eq!(stdout(&ids_a), stdout(&ids_b));
    let text = uhlm(&base);
    assert!(text.status.success(), "{}", stderr(&text));
    // The streamed text is the decode of the same ids.
    let list = stdout(&ids_a).trim().replace(',', " ");
    let decoded = {
        let path = uhlm_model::fetch::resolve_model("smollm2").unwrap();
        let tok = uhlm_model::tokenizer::Tokenizer::from_gguf_path(path).unwrap();
        let ids: Vec<u32> = list
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        tok.decode(&ids, true).unwrap()
    };
    assert_eq!(stdout(&text), format!("{decoded}\n"));
}

#[test]
fn missing_model_file_names_the_file() {
    let o = uhlm(&["generate", "--model", "/nonexistent/dir/model.gguf", "hi"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/dir/model.gguf"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn empty_prompt_is_an_error() {
    let o = uhlm(&["generate", "--model", "smollm2", ""]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("empty prompt"), "{}", stderr(&o));
}

#[test]
fn chat_on_a_model_without_template_is_an_error() {
    if !have("gemma3") {
        return;
    }
    let o = uhlm(&[
        "generate",
        "--model",
        "gemma3",
        "--chat",
        "--max-tokens",
        "1",
        "hi",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no chat template"), "{}", stderr(&o));
}

#[test]
fn bench_paper_rejects_an_unknown_link_profile_before_any_work() {
    let out = uhlm(&[
        "bench",
        "paper",
        "--links",
        "good,wifi",
        "--slm",
        "nope.gguf",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("unknown link profile \"wifi\"") && err.contains("cell-edge"),
        "{err}"
    );
}

#[test]
fn unknown_quantization_is_rejected_by_the_parser() {
    let o = uhlm(&["models", "derive-draft", "--quant", "q9_9"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q9_9"), "{}", stderr(&o));
}

#[test]
fn models_list_reports_the_cache() {
    let o = uhlm(&["models", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("smollm2") && out.contains("gemma3"), "{out}");
    if have("smollm2") {
        let line = out.lines().find(|l| l.starts_with("smollm2 ")).unwrap();
        assert!(line.contains("yes"), "{line}");
        assert!(!line.contains("NO"), "{line}");
    }
}

#[test]
fn models_fetch_is_idempotent_on_a_populated_cache() {
    if !have("smollm2") {
        return;
    }
    let o = uhlm(&["models", "fetch", "smollm2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("already present"), "{}", stdout(&o));
}
