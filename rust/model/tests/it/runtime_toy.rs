//! Runtime behaviour on tiny random-weight models written by the test: loading, errors,
//! incremental decoding, rollback, session isolation and draft derivation.

use crate::support;

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use support::{Toy, max_abs_diff, write_toy};
use uhlm_model::{
    Architecture, BatchItem, DeriveOptions, LoadOptions, LoadProgress, Model, ModelError, Outputs,
    Session, derive_draft,
};

fn load_toy(toy: &Toy) -> (tempfile::TempDir, Arc<Model>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.gguf");
    write_toy(&path, toy, &[]);
    let model = Model::load(&path, &LoadOptions::default()).unwrap();
    (dir, model)
}

const PROMPT: [u32; 12] = [104, 101, 108, 108, 111, 32, 119, 256, 114, 108, 100, 33];

/// Logits from one `score` over `tokens` versus stepping them one at a time.
fn full_vs_incremental(model: &Arc<Model>, tokens: &[u32]) -> f32 {
    let mut full = model.session();
    let logits = full.score(tokens).unwrap();
    assert_eq!(logits.rows(), tokens.len());
    let mut inc = model.session();
    let mut worst = 0f32;
    for (i, &t) in tokens.iter().enumerate() {
        let row = inc.step(t).unwrap();
        worst = worst.max(max_abs_diff(&row, logits.row(i)));
    }
    assert_eq!(inc.tokens(), full.tokens());
    worst
}

/// What a server budgets per context token is what a session's cache takes, for every
/// architecture: Gemma 3's head size is its own (`attention.key_length`), not `n_embd / n_heads`.
#[test]
fn kv_bytes_per_token_is_what_the_cache_allocates() {
    for toy in [Toy::llama(), Toy::gemma3()] {
        let (_dir, model) = load_toy(&toy);
        let per_token = model.info().kv_bytes_per_token as usize;
        assert_eq!(
            per_token,
            2 * toy.n_layer * toy.n_kv_head * toy.head_dim() * 4,
            "{}",
            toy.arch
        );
        let mut session = model.session();
        session.score(&PROMPT).unwrap();
        let bytes = session.kv_cache_bytes();
        // Whole tokens of capacity, at least the context scored.
        assert_eq!(bytes % per_token, 0, "{}", toy.arch);
        assert!(bytes >= PROMPT.len() * per_token, "{}", toy.arch);
    }
    assert_ne!(
        Toy::gemma3().head_dim(),
        Toy::gemma3().n_embd / Toy::gemma3().n_head
    );
}

#[test]
fn toy_llama_loads_with_its_shape() {
    let toy = Toy::llama();
    let (_dir, model) = load_toy(&toy);
    let info = model.info();
    assert_eq!(info.architecture, Architecture::Llama);
    assert_eq!(info.name, "toy-llama");
    assert_eq!(info.vocab_size, 258);
    assert_eq!(info.context_length, toy.context);
    assert_eq!(info.n_layers, 3);
    assert_eq!(info.n_embd, 64);
    assert_eq!((info.n_heads, info.n_kv_heads), (4, 2));
    assert!(info.dtypes.contains("Q8_0"), "{}", info.dtypes);
    assert_eq!(model.tokenizer().vocab_size(), 258);
    let logits = model.session().score(&PROMPT).unwrap();
    assert_eq!((logits.rows(), logits.vocab()), (PROMPT.len(), 258));
    assert!(logits.iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn incremental_decoding_matches_one_pass_llama() {
    let (_dir, model) = load_toy(&Toy::llama());
    let diff = full_vs_incremental(&model, &PROMPT);
    assert!(diff < 1e-3, "max abs diff {diff}");
}

#[test]
fn incremental_decoding_matches_one_pass_gemma3_across_the_window() {
    let (_dir, model) = load_toy(&Toy::gemma3());
    assert_eq!(model.info().architecture, Architecture::Gemma3);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 250) as u32).collect();
    let diff = full_vs_incremental(&model, &tokens);
    assert!(diff < 1e-3, "max abs diff {diff}");
    // Chunked scoring starting mid-window agrees too.
    let mut chunked = model.session();
    chunked.score(&tokens[..7]).unwrap();
    let tail = chunked.score(&tokens[7..]).unwrap();
    let full = model.session().score(&tokens).unwrap();
    for i in 0..tail.rows() {
        let d = max_abs_diff(tail.row(i), full.row(7 + i));
        assert!(d < 1e-3, "row {i}: {d}");
    }
}

#[test]
fn score_last_is_the_last_row_of_score_for_both_architectures() {
    for toy in [Toy::llama(), Toy::gemma3()] {
        let (_dir, model) = load_toy(&toy);
        let all = model.session().score(&PROMPT).unwrap();
        let mut s = model.session();
        let last = s.score_last(&PROMPT).unwrap();
        assert_eq!(last.len(), all.vocab());
        let d = max_abs_diff(&last, all.last());
        assert!(d < 1e-4, "{}: max abs diff {d}", model.info().name);
        // The cache advanced as with `score`: the next step sees the whole prompt.
        assert_eq!(s.tokens(), &PROMPT);
        let mut reference = model.session();
        reference.score(&PROMPT).unwrap();
        let d = max_abs_diff(&s.step(7).unwrap(), &reference.step(7).unwrap());
        assert!(d < 1e-4, "next step: {d}");
    }
}

/// Three sessions at different lengths (one rolled back by a "rejection" first) in one
/// batched pass: each gets exactly what scoring it alone gives, for both architectures and
/// for last-row and all-row outputs.
#[test]
fn a_batched_pass_equals_each_session_alone() {
    for toy in [Toy::llama(), Toy::gemma3()] {
        let (_dir, model) = load_toy(&toy);
        let prefixes: [&[u32]; 3] = [&PROMPT[..5], &PROMPT, &PROMPT[2..9]];
        let new: [&[u32]; 3] = [&[7, 8, 9], &[42], &[100, 101, 102, 103, 104, 105, 106]];
        let fresh = |i: usize| {
            let mut s = model.session();
            s.score(prefixes[i]).unwrap();
            if i == 1 {
                // Rolled back over positions whose keys stay in the cache buffers.
                s.score(&[11, 12, 13]).unwrap();
                s.truncate(PROMPT.len());
            }
            s
        };
        let mut batched: Vec<Session> = (0..3).map(fresh).collect();
        // Session 2 asks for chosen rows, out of order (a chain verification's).
        let picked = [new[2].len() - 1, 0];
        let outputs = [Outputs::All, Outputs::Last, Outputs::Rows(&picked)];
        let mut items: Vec<BatchItem<'_>> = batched
            .iter_mut()
            .enumerate()
            .map(|(i, session)| BatchItem {
                session,
                tokens: new[i],
                outputs: outputs[i],
            })
            .collect();
        let got = Session::score_batch(&mut items).unwrap();
        for i in 0..3 {
            let mut alone = fresh(i);
            let expect = match i {
                1 => alone.score_last(new[i]).unwrap(),
                2 => {
                    let all = alone.score(new[i]).unwrap();
                    picked.iter().flat_map(|&r| all.row(r).to_vec()).collect()
                }
                _ => alone.score(new[i]).unwrap().into_vec(),
            };
            assert_eq!(
                got[i].clone().into_vec(),
                expect,
                "{} session {i}",
                model.info().name
            );
            assert_eq!(batched[i].tokens(), alone.tokens());
            // The caches continue identically too.
            let next = batched[i].step(3).unwrap();
            assert_eq!(next, alone.step(3).unwrap());
        }
    }
}

#[test]
fn a_bad_batch_changes_no_session() {
    let (_dir, model) = load_toy(&Toy::llama());
    let (_dir2, other) = load_toy(&Toy::llama());
    let mut a = model.session();
    a.score(&PROMPT[..3]).unwrap();
    let mut b = other.session();
    fn last<'a>(session: &'a mut Session, tokens: &'a [u32]) -> BatchItem<'a> {
        BatchItem {
            session,
            tokens,
            outputs: Outputs::Last,
        }
    }
    let mut items = [last(&mut a, &[5]), last(&mut b, &[6])];
    assert!(matches!(
        Session::score_batch(&mut items),
        Err(ModelError::MixedBatch)
    ));
    let mut c = model.session();
    let mut items = [last(&mut a, &[5]), last(&mut c, &[1, 999])];
    assert!(matches!(
        Session::score_batch(&mut items),
        Err(ModelError::InvalidToken { id: 999, .. })
    ));
    let mut items = [
        last(&mut a, &[5]),
        BatchItem {
            session: &mut c,
            tokens: &[1, 2],
            outputs: Outputs::Rows(&[0, 2]),
        },
    ];
    assert!(matches!(
        Session::score_batch(&mut items),
        Err(ModelError::NoSuchRow { row: 2, rows: 2 })
    ));
    assert_eq!(a.tokens(), &PROMPT[..3]);
    assert!(c.is_empty());
    assert!(Session::score_batch(&mut []).unwrap().is_empty());
}

#[test]
fn sliding_window_changes_what_gemma3_sees() {
    // The same weights with a window wider than the sequence must give different late
    // logits: proves the window is applied, not just parsed.
    let dir = tempfile::tempdir().unwrap();
    let (narrow, wide) = (dir.path().join("narrow.gguf"), dir.path().join("wide.gguf"));
    let toy = Toy::gemma3();
    write_toy(&narrow, &toy, &[]);
    write_toy(
        &wide,
        &toy,
        &[("gemma3.attention.sliding_window", Value::U32(64))],
    );
    let tokens: Vec<u32> = (0..12).map(|i| (i * 53 % 250) as u32).collect();
    let a = Model::load(&narrow, &LoadOptions::default())
        .unwrap()
        .session()
        .score(&tokens)
        .unwrap();
    let b = Model::load(&wide, &LoadOptions::default())
        .unwrap()
        .session()
        .score(&tokens)
        .unwrap();
    assert!(
        max_abs_diff(a.row(2), b.row(2)) < 1e-4,
        "inside the window nothing changes"
    );
    assert!(
        max_abs_diff(a.row(11), b.row(11)) > 1e-3,
        "outside it, logits must change"
    );
}

#[test]
fn truncate_then_redecode_equals_fresh_session() {
    let (_dir, model) = load_toy(&Toy::llama());
    let mut s = model.session();
    s.score(&PROMPT).unwrap();
    s.truncate(5);
    assert_eq!(s.len(), 5);
    assert_eq!(s.tokens(), &PROMPT[..5]);
    let alt = [3u32, 200, 17];
    let rolled = s.score(&alt).unwrap();
    let mut fresh = model.session();
    fresh.score(&PROMPT[..5]).unwrap();
    let expect = fresh.score(&alt).unwrap();
    assert!(max_abs_diff(rolled.last(), expect.last()) < 1e-5);
    assert_eq!(s.tokens(), fresh.tokens());
    // Truncating past the end is a no-op, to zero empties.
    s.truncate(100);
    assert_eq!(s.len(), 8);
    s.reset();
    assert!(s.is_empty());
}

#[test]
fn interleaved_sessions_do_not_interfere() {
    let (_dir, model) = load_toy(&Toy::llama());
    let (a_toks, b_toks) = (&PROMPT[..6], &PROMPT[6..]);
    let solo_a = model.session().score(a_toks).unwrap();
    let solo_b = model.session().score(b_toks).unwrap();
    let (mut a, mut b) = (model.session(), model.session());
    let mut last_a = Vec::new();
    let mut last_b = Vec::new();
    for i in 0..6 {
        last_a = a.step(a_toks[i]).unwrap();
        last_b = b.step(b_toks[i]).unwrap();
    }
    assert!(max_abs_diff(&last_a, solo_a.last()) < 1e-3);
    assert!(max_abs_diff(&last_b, solo_b.last()) < 1e-3);
}

#[test]
fn loading_reports_monotone_progress_ending_at_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.gguf");
    write_toy(&path, &Toy::gemma3(), &[]);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let opts = LoadOptions {
        progress: Some(LoadProgress::new(move |f| sink.lock().unwrap().push(f))),
        ..LoadOptions::default()
    };
    Model::load(&path, &opts).unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 3, "one report per tensor: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen[..seen.len() - 1]
            .iter()
            .all(|f| (0.0..1.0).contains(f))
    );
    assert_eq!(*seen.last().unwrap(), 1.0);
}

#[test]
fn sessions_are_send_and_run_on_other_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Session>();
    assert_send::<Arc<Model>>();
    let (_dir, model) = load_toy(&Toy::llama());
    let expect = model.session().score(&PROMPT).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let mut s = model.session();
            std::thread::spawn(move || s.score(&PROMPT).unwrap())
        })
        .collect();
    for h in handles {
        assert!(max_abs_diff(h.join().unwrap().last(), expect.last()) < 1e-5);
    }
}

#[test]
fn bad_inputs_are_typed_errors_and_leave_the_session_unchanged() {
    let (_dir, model) = load_toy(&Toy::llama());
    let mut s = model.session();
    s.score(&PROMPT[..3]).unwrap();
    assert!(matches!(s.score(&[]), Err(ModelError::EmptyPrompt)));
    match s.score(&[1, 258]) {
        Err(ModelError::InvalidToken {
            id: 258,
            vocab: 258,
        }) => {}
        other => panic!("expected InvalidToken, got {other:?}"),
    }
    let long = vec![5u32; 46];
    match s.score(&long) {
        Err(ModelError::ContextOverflow { len: 49, max: 48 }) => {}
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
    assert_eq!(s.tokens(), &PROMPT[..3]);
    // Filling the context exactly is fine; one more token is not.
    s.score(&long[..45]).unwrap();
    assert!(matches!(
        s.step(1),
        Err(ModelError::ContextOverflow { len: 49, max: 48 })
    ));
}

#[test]
fn missing_file_is_model_not_found() {
    let err = Model::load(
        "/nonexistent/uhlm/model.gguf".as_ref(),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::ModelNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/uhlm/model.gguf"));
}

#[test]
fn truncated_and_garbage_files_are_corrupt_model_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.gguf");
    write_toy(&path, &Toy::llama(), &[]);
    let bytes = std::fs::read(&path).unwrap();
    for (name, content) in [
        ("truncated.gguf", &bytes[..bytes.len() * 2 / 3]),
        ("header-only.gguf", &bytes[..100]),
        ("garbage.gguf", &b"definitely not a gguf file"[..]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let err = Model::load(&p, &LoadOptions::default()).unwrap_err();
        assert!(
            matches!(err, ModelError::CorruptModel { .. }),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
}

/// A tensor whose dimensions multiply past 2^64 (4 GiB x 4 GiB elements, in a 100-byte file):
/// refused as corrupt. The product used to overflow (a panic in debug builds, in release a
/// wrapped size that could pass the bounds check).
#[test]
fn a_tensor_shape_that_overflows_is_corrupt_model() {
    let mut gguf = Vec::new();
    gguf.extend_from_slice(b"GGUF");
    gguf.extend_from_slice(&3u32.to_le_bytes()); // version
    gguf.extend_from_slice(&1u64.to_le_bytes()); // tensors
    gguf.extend_from_slice(&0u64.to_le_bytes()); // metadata entries
    let name = b"token_embd.weight";
    gguf.extend_from_slice(&(name.len() as u64).to_le_bytes());
    gguf.extend_from_slice(name);
    gguf.extend_from_slice(&2u32.to_le_bytes()); // dimensions
    gguf.extend_from_slice(&(1u64 << 32).to_le_bytes());
    gguf.extend_from_slice(&(1u64 << 32).to_le_bytes());
    gguf.extend_from_slice(&0u32.to_le_bytes()); // F32
    gguf.extend_from_slice(&0u64.to_le_bytes()); // offset
    gguf.resize(gguf.len().next_multiple_of(32) + 32, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overflow.gguf");
    std::fs::write(&path, &gguf).unwrap();
    let err = Model::load(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::CorruptModel { .. }), "{err:?}");
    assert!(err.to_string().contains("impossible shape"), "{err}");
}

#[test]
fn missing_tensor_or_metadata_is_corrupt_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-heads.gguf");
    // A key the loader needs, replaced by the wrong type.
    write_toy(
        &path,
        &Toy::llama(),
        &[("llama.attention.head_count", Value::String("nine".into()))],
    );
    let err = Model::load(&path, &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("llama.attention.head_count"),
        "{err}"
    );
    // More blocks declared than present: blk.3 is missing.
    let path = dir.path().join("short.gguf");
    write_toy(
        &path,
        &Toy::llama(),
        &[("llama.block_count", Value::U32(4))],
    );
    let err = Model::load(&path, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::CorruptModel { .. }), "{err:?}");
    assert!(err.to_string().contains("blk.3."), "{err}");
    // A block count no file could hold sizes nothing (found by the `gguf` fuzz target: the
    // loader reserved room for 2^60 blocks and aborted).
    for (toy, key) in [
        (Toy::llama(), "llama.block_count"),
        (Toy::gemma3(), "gemma3.block_count"),
    ] {
        let path = dir.path().join("huge.gguf");
        write_toy(&path, &toy, &[(key, Value::U64(1 << 60))]);
        let err = Model::load(&path, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, ModelError::CorruptModel { .. }), "{err:?}");
        assert!(err.to_string().contains(key), "{err}");
    }
}

#[test]
fn unknown_architecture_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    write_toy(
        &path,
        &Toy::llama(),
        &[("general.architecture", Value::String("mamba".into()))],
    );
    match Model::load(&path, &LoadOptions::default()) {
        Err(ModelError::UnsupportedArchitecture { arch, path: p }) => {
            assert_eq!(arch, "mamba");
            assert_eq!(p, path);
        }
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
}

#[test]
fn derived_draft_keeps_vocabulary_and_approximates_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.gguf");
    let out = dir.path().join("draft.gguf");
    write_toy(&src, &Toy::llama(), &[]);
    let opts = DeriveOptions {
        keep_layers: Some(vec![0, 2]),
        quant: Some(GgmlDType::Q4_0),
    };
    let report = derive_draft(&src, &out, &opts).unwrap();
    assert_eq!(report.layers_before, 3);
    assert_eq!(report.kept_layers, vec![0, 2]);
    assert!(report.tensors_requantized > 0);
    assert!(report.bytes_after < report.bytes_before);
    let source = Model::load(&src, &LoadOptions::default()).unwrap();
    let draft = Model::load(&out, &LoadOptions::default()).unwrap();
    assert_eq!(draft.info().n_layers, 2);
    assert_eq!(draft.fingerprint(), source.fingerprint());
    assert!(
        draft.info().dtypes.contains("Q4_0"),
        "{}",
        draft.info().dtypes
    );
    let a = source.session().score(&PROMPT).unwrap();
    let b = draft.session().score(&PROMPT).unwrap();
    assert!(
        max_abs_diff(a.last(), b.last()) > 1e-2,
        "dropping a block must change logits"
    );

    // Bad options are typed errors and write nothing.
    let bad = dir.path().join("bad.gguf");
    for keep in [vec![], vec![0, 3], vec![2, 1]] {
        let opts = DeriveOptions {
            keep_layers: Some(keep),
            quant: None,
        };
        let err = derive_draft(&src, &bad, &opts).unwrap_err();
        assert!(matches!(err, ModelError::InvalidOptions(_)), "{err:?}");
        assert!(!bad.exists());
    }
}

#[test]
fn derived_gemma3_draft_keeps_each_blocks_window_kind() {
    // Dropping blocks 0..=2 moves the global block 5 to index 2, where the positional default
    // pattern would make it local; the draft must record it as global.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.gguf");
    let out = dir.path().join("draft.gguf");
    write_toy(&src, &Toy::gemma3(), &[]);
    let opts = DeriveOptions {
        keep_layers: Some(vec![3, 4, 5, 6]),
        quant: None,
    };
    derive_draft(&src, &out, &opts).unwrap();
    let mut f = std::fs::File::open(&out).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let flags: Vec<bool> = content.metadata["gemma3.attention.sliding_window_pattern"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_bool().unwrap())
        .collect();
    assert_eq!(flags, vec![true, true, false, true]);
    assert_eq!(content.metadata["gemma3.block_count"].to_u32().unwrap(), 4);
    let draft = Model::load(&out, &LoadOptions::default()).unwrap();
    let tokens: Vec<u32> = (0..14).map(|i| (i * 29 % 250) as u32).collect();
    let logits = draft.session().score(&tokens).unwrap();
    assert!(logits.iter().flatten().all(|x| x.is_finite()));
}
