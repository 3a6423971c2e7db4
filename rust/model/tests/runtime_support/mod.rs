//! Shared helpers for the runtime tests: tiny random-weight GGUF models written on the fly, and
//! the paths of the real cached models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
pub const QWEN_CODER_05B: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// A real model from the uhlm cache, or `None` (with a note) when it is not there. Set
/// `UHLM_REQUIRE_MODELS=1` to turn a missing model into a failure.
pub fn cached_model(name: &str) -> Option<PathBuf> {
    let dir = uhlm_model::fetch::models_dir().ok()?;
    let path = dir.join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("UHLM_REQUIRE_MODELS").is_none(),
        "{} is missing and UHLM_REQUIRE_MODELS is set",
        path.display()
    );
    eprintln!("skipping: {} not cached", path.display());
    None
}

/// Shape of a toy model.
#[derive(Debug, Clone)]
pub struct Toy {
    pub arch: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_ff: usize,
    pub context: usize,
    /// gemma3 only.
    pub window: usize,
    pub quant: GgmlDType,
    pub seed: u64,
}

impl Toy {
    pub fn llama() -> Self {
        Self {
            arch: "llama",
            n_layer: 3,
            n_embd: 64,
            n_head: 4,
            n_kv_head: 2,
            n_ff: 128,
            context: 48,
            window: 0,
            quant: GgmlDType::Q8_0,
            seed: 7,
        }
    }

    /// Seven layers so that one (the sixth) is global; a window of 5 so short sequences
    /// cross it.
    pub fn gemma3() -> Self {
        Self {
            arch: "gemma3",
            n_layer: 7,
            n_embd: 64,
            n_head: 4,
            n_kv_head: 1,
            n_ff: 128,
            context: 48,
            window: 5,
            quant: GgmlDType::Q8_0,
            seed: 11,
        }
    }

    pub fn head_dim(&self) -> usize {
        // gemma3 decouples head size from width; use that freedom in its toy.
        if self.arch == "gemma3" {
            32
        } else {
            self.n_embd / self.n_head
        }
    }
}

/// GPT-2's printable spelling of a byte.
fn byte_char(b: u8) -> char {
    let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable {
        char::from(b)
    } else {
        let n = (0..b)
            .filter(|&c| !((b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || c >= 0xAE))
            .count() as u32;
        char::from_u32(256 + n).unwrap()
    }
}

/// Byte-level BPE vocabulary: the 256 bytes, one merge ("he") and an end-of-text token.
pub fn toy_vocab() -> Vec<String> {
    let mut v: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    v.push("he".into());
    v.push("<|endoftext|>".into());
    v
}

/// Deterministic pseudo-random values in [-scale, scale).
fn noise(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Writes a random-weight model of shape `toy` to `path`, with extra metadata overrides.
pub fn write_toy(path: &Path, toy: &Toy, overrides: &[(&str, Value)]) {
    let dev = Device::Cpu;
    let mut seed = toy.seed;
    let vocab = toy_vocab();
    let hd = toy.head_dim();
    let (d, ff) = (toy.n_embd, toy.n_ff);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |name: String, rows: usize, cols: usize, seed: &mut u64| {
        let scale = 1.0 / (cols as f32).sqrt() * 1.7;
        let t = Tensor::from_vec(noise(rows * cols, seed, scale), (rows, cols), &dev).unwrap();
        tensors.push((name, QTensor::quantize(&t, toy.quant).unwrap()));
    };
    matrix("token_embd.weight".into(), vocab.len(), d, &mut seed);
    for i in 0..toy.n_layer {
        matrix(
            format!("blk.{i}.attn_q.weight"),
            toy.n_head * hd,
            d,
            &mut seed,
        );
        matrix(
            format!("blk.{i}.attn_k.weight"),
            toy.n_kv_head * hd,
            d,
            &mut seed,
        );
        matrix(
            format!("blk.{i}.attn_v.weight"),
            toy.n_kv_head * hd,
            d,
            &mut seed,
        );
        matrix(
            format!("blk.{i}.attn_output.weight"),
            d,
            toy.n_head * hd,
            &mut seed,
        );
        matrix(format!("blk.{i}.ffn_gate.weight"), ff, d, &mut seed);
        matrix(format!("blk.{i}.ffn_up.weight"), ff, d, &mut seed);
        matrix(format!("blk.{i}.ffn_down.weight"), d, ff, &mut seed);
    }
    let mut norms: Vec<(String, usize)> = vec![("output_norm.weight".into(), d)];
    for i in 0..toy.n_layer {
        norms.push((format!("blk.{i}.attn_norm.weight"), d));
        norms.push((format!("blk.{i}.ffn_norm.weight"), d));
        if toy.arch == "gemma3" {
            norms.push((format!("blk.{i}.attn_q_norm.weight"), hd));
            norms.push((format!("blk.{i}.attn_k_norm.weight"), hd));
            norms.push((format!("blk.{i}.post_attention_norm.weight"), d));
            norms.push((format!("blk.{i}.post_ffw_norm.weight"), d));
        }
    }
    for (name, n) in norms {
        let w: Vec<f32> = noise(n, &mut seed, 0.2).iter().map(|x| 1.0 + x).collect();
        let t = Tensor::from_vec(w, n, &dev).unwrap();
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }

    let a = toy.arch;
    let n_tokens = vocab.len();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(format!("toy-{a}"))),
        (format!("{a}.block_count"), Value::U32(toy.n_layer as u32)),
        (
            format!("{a}.context_length"),
            Value::U32(toy.context as u32),
        ),
        (format!("{a}.embedding_length"), Value::U32(d as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(ff as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(toy.n_head as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(toy.n_kv_head as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..n_tokens)
                    .map(|i| Value::I32(if i + 1 == n_tokens { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("h e".into())]),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(n_tokens as u32 - 1),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if a == "gemma3" {
        md.push((format!("{a}.attention.key_length"), Value::U32(hd as u32)));
        md.push((format!("{a}.attention.value_length"), Value::U32(hd as u32)));
        md.push((
            format!("{a}.attention.sliding_window"),
            Value::U32(toy.window as u32),
        ));
    } else {
        md.push((format!("{a}.rope.dimension_count"), Value::U32(hd as u32)));
    }
    for (k, v) in overrides {
        match md.iter_mut().find(|(mk, _)| mk == k) {
            Some(e) => e.1 = v.clone(),
            None => md.push((k.to_string(), v.clone())),
        }
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Pearson correlation.
pub fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

pub fn argmax(xs: &[f32]) -> u32 {
    uhlm_core::sampling::argmax(xs).unwrap()
}
