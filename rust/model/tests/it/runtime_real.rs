//! The runtime on the real cached models: SmolLM2-135M (llama), gemma-3-270m and
//! Qwen2.5-Coder-0.5B (qwen2).

use crate::support;

use std::sync::Arc;

use support::{GEMMA3, QWEN_CODER_05B, SMOLLM2, argmax, cached_model, correlation, max_abs_diff};
use uhlm_model::{
    BatchItem, DeriveOptions, Kernels, LoadOptions, Model, Outputs, Session, derive_draft,
};

fn load(name: &str) -> Option<Arc<Model>> {
    let path = cached_model(name)?;
    Some(Model::load(&path, &LoadOptions::default()).unwrap())
}

fn encode(model: &Model, text: &str) -> Vec<u32> {
    model.tokenizer().encode(text, true).unwrap()
}

/// One `score` over the text versus stepping token by token: the same logits, bit for bit.
/// The matmul kernels compute each row the same way whatever the batch, and the attention
/// too, so how a context was split into forward passes never changes a distribution.
fn check_incremental(model: &Arc<Model>, text: &str) {
    let tokens = encode(model, text);
    assert!(tokens.len() >= 8, "{tokens:?}");
    let full = model.session().score(&tokens).unwrap();
    let mut s = model.session();
    for (i, &t) in tokens.iter().enumerate() {
        let row = s.step(t).unwrap();
        assert_eq!(row, full.row(i), "position {i}");
    }
}

/// Greedy continuation of `prompt`.
fn greedy(model: &Arc<Model>, prompt: &str, n: usize) -> (Vec<u32>, String) {
    let mut s = model.session();
    let mut next = argmax(s.score(&encode(model, prompt)).unwrap().last());
    let mut out = vec![next];
    for _ in 1..n {
        next = argmax(&s.step(next).unwrap());
        out.push(next);
    }
    let text = model.tokenizer().decode(&out, true).unwrap();
    (out, text)
}

#[test]
fn smollm2_incremental_equals_one_pass() {
    let Some(model) = load(SMOLLM2) else { return };
    check_incremental(
        &model,
        "The quick brown fox jumps over the lazy dog, then naps.",
    );
}

#[test]
fn gemma3_incremental_equals_one_pass() {
    let Some(model) = load(GEMMA3) else { return };
    check_incremental(
        &model,
        "The quick brown fox jumps over the lazy dog, then naps.",
    );
}

#[test]
fn qwen2_incremental_equals_one_pass() {
    let Some(model) = load(QWEN_CODER_05B) else {
        return;
    };
    check_incremental(
        &model,
        "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return",
    );
}

/// The runtime's own kernels against candle's (the path they replaced), on every real
/// model. Both quantize activations to 8 bits, candle with f16 block scales and these
/// kernels with f32, so one rounding in a thousand lands on the other side and the
/// difference grows over the layers: logits agree to within that (measured: worst row
/// correlation 0.995-0.999, top token equal at 51/52, 48/50 and 53/54 positions), and
/// greedy decoding starts the same way (the continuations part later, at near-ties).
#[test]
fn own_kernels_match_candles_on_the_real_models() {
    let prompts = [
        (SMOLLM2, "The capital of France is"),
        (GEMMA3, "The capital of France is"),
        (QWEN_CODER_05B, "def fibonacci(n):\n    "),
    ];
    for (name, prompt) in prompts {
        let Some(path) = cached_model(name) else {
            continue;
        };
        let own = Model::load(&path, &LoadOptions::default()).unwrap();
        let reference = Model::load(
            &path,
            &LoadOptions {
                kernels: Kernels::Candle,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let tokens = encode(&own, EIFFEL);
        let a = own.session().score(&tokens).unwrap();
        let b = reference.session().score(&tokens).unwrap();
        let mut worst = 1f64;
        let mut agree = 0;
        for i in 0..a.rows() {
            worst = worst.min(correlation(a.row(i), b.row(i)));
            agree += usize::from(argmax(a.row(i)) == argmax(b.row(i)));
        }
        assert!(worst > 0.99, "{name}: worst row correlation {worst}");
        assert!(
            agree * 10 >= a.rows() * 9,
            "{name}: same top token at only {agree} of {} positions",
            a.rows()
        );
        let (ids_own, text) = greedy(&own, prompt, 16);
        let (ids_ref, text_ref) = greedy(&reference, prompt, 16);
        assert_eq!(
            ids_own[..4],
            ids_ref[..4],
            "{name}: {text:?} vs {text_ref:?}"
        );
    }
}

/// Mean next-token negative log-likelihood of `text`, in nats.
fn mean_nll(model: &Arc<Model>, text: &str) -> f64 {
    let toks = encode(model, text);
    let logits = model.session().score(&toks).unwrap();
    let mut nll = 0.0;
    for i in 0..toks.len() - 1 {
        let row = logits.row(i);
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = row
            .iter()
            .map(|x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln()
            + max as f64;
        nll += lse - row[toks[i + 1] as usize] as f64;
    }
    nll / (toks.len() - 1) as f64
}

const EIFFEL: &str = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in \
    Paris, France. It is named after the engineer Gustave Eiffel, whose company designed and \
    built the tower from 1887 to 1889.";

/// A broken layer (wrong rope, norm or mask) sends perplexity on plain English far up; both
/// models sit near 1.9 nats.
#[test]
fn real_models_predict_english_well() {
    for name in [SMOLLM2, GEMMA3] {
        let Some(model) = load(name) else { continue };
        let nll = mean_nll(&model, EIFFEL);
        assert!(nll < 2.6, "{name}: mean NLL {nll}");
    }
}

#[test]
fn smollm2_greedy_is_coherent_and_deterministic() {
    let Some(model) = load(SMOLLM2) else { return };
    let (ids_a, text) = greedy(&model, "The capital of France is", 8);
    assert!(text.contains("Paris"), "{text:?}");
    let (ids_b, _) = greedy(&model, "The capital of France is", 8);
    assert_eq!(ids_a, ids_b);
}

#[test]
fn gemma3_knows_the_capital_of_france() {
    // gemma-3-270m's greedy pick is " the" (as in "the capital of the country"), with
    // " Paris" a close third.
    let Some(model) = load(GEMMA3) else { return };
    let logits = model
        .session()
        .score(&encode(&model, "The capital of France is"))
        .unwrap();
    let mut ids: Vec<usize> = (0..logits.vocab()).collect();
    ids.sort_by(|&a, &b| logits.last()[b].total_cmp(&logits.last()[a]));
    let top: Vec<String> = ids[..5]
        .iter()
        .map(|&i| model.tokenizer().decode(&[i as u32], false).unwrap())
        .collect();
    assert!(top.iter().any(|t| t.trim() == "Paris"), "{top:?}");
}

#[test]
fn smollm2_rollback_and_interleaving() {
    let Some(model) = load(SMOLLM2) else { return };
    let a = encode(
        &model,
        "Water boils at one hundred degrees Celsius at sea level.",
    );
    let b = encode(&model, "def fibonacci(n):\n    return n if n < 2 else");
    // Rollback: score all of `a`, roll back to 4 tokens, continue with `b`.
    let mut s = model.session();
    s.score(&a).unwrap();
    s.truncate(4);
    let rolled = s.score(&b).unwrap();
    let mut fresh = model.session();
    fresh.score(&a[..4]).unwrap();
    let expect = fresh.score(&b).unwrap();
    assert!(max_abs_diff(rolled.last(), expect.last()) < 1e-3);
    // Interleaving two sessions step by step matches each alone.
    let n = a.len().min(b.len());
    let solo_a = model.session().score(&a[..n]).unwrap();
    let solo_b = model.session().score(&b[..n]).unwrap();
    let (mut sa, mut sb) = (model.session(), model.session());
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    for i in 0..n {
        la = sa.step(a[i]).unwrap();
        lb = sb.step(b[i]).unwrap();
    }
    assert!(max_abs_diff(&la, solo_a.last()) < 1e-3);
    assert!(max_abs_diff(&lb, solo_b.last()) < 1e-3);
}

#[test]
fn smollm2_default_draft_round_trip() {
    let Some(src) = cached_model(SMOLLM2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(uhlm_model::DEFAULT_DRAFT_FILE_NAME);
    let opts = DeriveOptions::default_draft();
    let report = derive_draft(&src, &out, &opts).unwrap();
    let source = Model::load(&src, &LoadOptions::default()).unwrap();
    let kept = opts
        .keep_layers
        .as_ref()
        .map_or(source.info().n_layers, Vec::len);
    assert_eq!(report.kept_layers.len(), kept);
    let draft = Model::load(&out, &LoadOptions::default()).unwrap();
    assert_eq!(draft.info().n_layers, kept);
    assert_eq!(draft.fingerprint(), source.fingerprint());
    assert!(draft.info().file_bytes < source.info().file_bytes);
    let tokens = encode(&source, EIFFEL);
    let a = source.session().score(&tokens).unwrap();
    let b = draft.session().score(&tokens).unwrap();
    assert!(
        max_abs_diff(a.last(), b.last()) > 0.1,
        "the draft must differ"
    );
    // Mean logit correlation per position: high, but not identity.
    let r: f64 = (0..a.rows())
        .map(|i| correlation(a.row(i), b.row(i)))
        .sum::<f64>()
        / a.rows() as f64;
    assert!(
        r > 0.5 && r < 0.9999,
        "the draft must track the source: correlation {r}"
    );
}

/// A stand-in rebuilt from the header alone loads as the real model does: the same
/// hyper-parameters, tensor types and tokenizer (so a device's fingerprint matches), random
/// weights whose logits are finite and have nothing to do with the real ones. The header
/// alone is refused as a truncated model, with a typed error.
#[test]
fn a_stand_in_from_the_header_alone_loads_like_the_model() {
    let Some(src) = cached_model(SMOLLM2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (header, stand_in) = (dir.path().join("h.gguf"), dir.path().join("s.gguf"));
    let header_bytes = uhlm_model::stand_in::strip_weights(&src, &header).unwrap();
    let source = Model::load(&src, &LoadOptions::default()).unwrap();
    assert!(
        header_bytes < source.info().file_bytes / 20,
        "{header_bytes} bytes"
    );
    match Model::load(&header, &LoadOptions::default()) {
        Err(uhlm_model::ModelError::CorruptModel { reason, .. }) => {
            assert!(reason.contains("truncated"), "{reason}")
        }
        other => panic!(
            "the header alone loaded: {:?}",
            other.map(|m| m.info().clone())
        ),
    }
    uhlm_model::stand_in::random_weights(&header, &stand_in, 7).unwrap();
    let fake = Model::load(&stand_in, &LoadOptions::default()).unwrap();
    let (a, b) = (source.info(), fake.info());
    assert_eq!(
        (a.architecture, a.vocab_size, a.n_layers, a.context_length),
        (b.architecture, b.vocab_size, b.n_layers, b.context_length)
    );
    assert_eq!(a.dtypes, b.dtypes);
    assert_eq!(
        (a.stand_in_for.as_deref(), b.stand_in_for.as_deref()),
        (None, Some("h.gguf"))
    );
    assert_eq!(fake.fingerprint(), source.fingerprint());
    // Within a few KiB: the same tensors in the same types, metadata reordered.
    assert!(
        b.file_bytes.abs_diff(a.file_bytes) < 64 << 10,
        "{a:?} / {b:?}"
    );
    let tokens = encode(&source, EIFFEL);
    let real = source.session().score(&tokens).unwrap();
    let random = fake.session().score(&tokens).unwrap();
    assert!(random.last().iter().all(|x| x.is_finite()));
    let r = correlation(real.last(), random.last());
    assert!(
        r.abs() < 0.2,
        "random weights track the model: correlation {r}"
    );
}

/// The server's batched verification on the real models: sessions of different lengths
/// (one rolled back as after a rejection), each catching up on a different number of tokens,
/// in one forward pass, get bit for bit the logits they get alone.
#[test]
fn batched_sessions_equal_each_alone_on_the_real_models() {
    for name in [SMOLLM2, GEMMA3, QWEN_CODER_05B] {
        let Some(model) = load(name) else { continue };
        let texts = [
            "def add(a, b):\n    return a + b\n",
            EIFFEL,
            "The quick brown fox jumps over the lazy dog, then naps.",
        ];
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| encode(&model, t)).collect();
        let split = [ids[0].len() - 1, ids[1].len() - 6, 4];
        let prime = |i: usize| {
            let mut s = model.session();
            s.score(&ids[i][..split[i]]).unwrap();
            if i == 0 {
                // As after a rejection: drafted positions scored, then rolled back.
                s.score(&ids[2][..3]).unwrap();
                s.truncate(split[0]);
            }
            s
        };
        let mut batched: Vec<Session> = (0..3).map(prime).collect();
        let mut items: Vec<BatchItem<'_>> = batched
            .iter_mut()
            .enumerate()
            .map(|(i, session)| BatchItem {
                session,
                tokens: &ids[i][split[i]..],
                outputs: if i == 1 { Outputs::All } else { Outputs::Last },
            })
            .collect();
        let got = Session::score_batch(&mut items).unwrap();
        for i in 0..3 {
            let mut alone = prime(i);
            let expect = if i == 1 {
                alone.score(&ids[i][split[i]..]).unwrap().into_vec()
            } else {
                alone.score_last(&ids[i][split[i]..]).unwrap()
            };
            assert_eq!(got[i].clone().into_vec(), expect, "{name} session {i}");
        }
    }
}
