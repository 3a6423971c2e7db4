//! Gemma 3 decoder: per-head q/k RMS norms, norms before and after both attention and MLP,
//! GELU(tanh)-gated MLP, embeddings scaled by sqrt(d), local sliding-window layers (rope base
//! 10 000) interleaved with global layers (rope base from metadata), optional final logit
//! soft-capping.
//!
//! Unlike candle-transformers' `quantized_gemma3`, this applies the sliding window during
//! decoding too, uses GELU rather than SiLU, and keeps the 262k-row embedding quantized.

use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Result, Tensor};

use crate::architecture::Dims;
use crate::attention::{AttnConfig, attend};
use crate::error::ModelError;
use crate::forward_pass::{Part, PassCost, concat_rows, output_rows, row_spans, split_rows};
use crate::gguf::GgufFile;
use crate::kv_cache::KvShape;
use crate::layers::{Embedding, LayerOptions, Linear, RmsNorm, Rope};

/// Every n-th layer is global when the file does not say otherwise (llama.cpp's default).
const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;
const DEFAULT_LOCAL_ROPE_BASE: f32 = 10_000.0;
const DEFAULT_GLOBAL_ROPE_BASE: f32 = 1_000_000.0;
/// Metadata key listing, per layer, whether it uses the sliding window. Written by
/// [`crate::derive::derive_draft`] when it drops layers, since the position-based default
/// pattern would then misclassify the survivors.
pub(crate) const SLIDING_PATTERN_KEY: &str = "gemma3.attention.sliding_window_pattern";

struct Block {
    attn: AttnConfig,
    /// Index into `Gemma3::ropes`: 0 local, 1 global.
    rope: usize,
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    wo: Linear,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: RmsNorm,
}

/// Weights and hyper-parameters of a gemma3 model.
pub(crate) struct Gemma3 {
    dims: Dims,
    head_dim: usize,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    output: Linear,
    ropes: [Rope; 2],
    softcap: Option<f64>,
    device: Device,
}

impl Gemma3 {
    pub fn load(
        g: &mut GgufFile,
        device: &Device,
        opts: LayerOptions,
    ) -> std::result::Result<Self, ModelError> {
        let p = "gemma3";
        let n_layer = g.block_count(p)?;
        let n_embd = g.usize(&format!("{p}.embedding_length"))?;
        let n_head = g.usize(&format!("{p}.attention.head_count"))?;
        let n_kv_head = g.usize(&format!("{p}.attention.head_count_kv"))?;
        let head_dim = g.usize(&format!("{p}.attention.key_length"))?;
        let context_length = g.usize(&format!("{p}.context_length"))?;
        let eps = g.f32(&format!("{p}.attention.layer_norm_rms_epsilon"))?;
        let window = g.usize(&format!("{p}.attention.sliding_window"))?;
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || window == 0 {
            return Err(ModelError::corrupt(
                &g.path,
                format!("inconsistent attention: {n_head} heads, {n_kv_head} kv, window {window}"),
            ));
        }
        let global_base = g
            .opt_f32(&format!("{p}.rope.freq_base"))?
            .unwrap_or(DEFAULT_GLOBAL_ROPE_BASE);
        let local_base = g
            .opt_f32(&format!("{p}.rope.local_freq_base"))?
            .unwrap_or(DEFAULT_LOCAL_ROPE_BASE);
        // Larger gemma3 models stretch global-layer positions linearly; local layers never.
        let global_scale = match g.opt_string(&format!("{p}.rope.scaling.type")) {
            Some("linear") => g
                .opt_f32(&format!("{p}.rope.scaling.factor"))?
                .unwrap_or(1.0),
            _ => 1.0,
        };
        // llama.cpp scales queries by 1/sqrt(head_dim) for every released size but 27B, whose
        // query_pre_attn_scalar differs; honour the key when a converter writes it.
        let scale = match g.opt_f32(&format!("{p}.attention.query_pre_attn_scalar"))? {
            Some(s) if s > 0.0 => 1.0 / (s as f64).sqrt(),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        let softcap = g
            .opt_f32(&format!("{p}.final_logit_softcapping"))?
            .filter(|c| *c > 0.0)
            .map(f64::from);
        let sliding = sliding_layers(g, n_layer)?;

        let vocab = g.tensor_dims("token_embd.weight")?[0];
        let embd = Arc::new(g.tensor("token_embd.weight", Some(&[vocab, n_embd]), device)?);
        let output = if g.has_tensor("output.weight") {
            Linear::load(
                opts,
                g.tensor("output.weight", Some(&[vocab, n_embd]), device)?,
            )?
        } else {
            Linear::from_arc(opts, embd.clone())?
        };
        let q_dim = n_head * head_dim;
        let kv_dim = n_kv_head * head_dim;
        let mut blocks = Vec::with_capacity(n_layer);
        let mut widest_ff = 0;
        for (i, &is_sliding) in sliding.iter().enumerate() {
            let n_ff = g.tensor_dims(&format!("blk.{i}.ffn_up.weight"))?[0];
            widest_ff = widest_ff.max(n_ff);
            let mut t = |name: &str, dims: &[usize]| {
                g.tensor(&format!("blk.{i}.{name}"), Some(dims), device)
            };
            let norm = |t: candle_core::quantized::QTensor| RmsNorm::new(t, eps, device);
            blocks.push(Block {
                attn: AttnConfig {
                    n_head,
                    n_kv_head,
                    head_dim,
                    scale,
                    window: is_sliding.then_some(window),
                },
                rope: usize::from(!is_sliding),
                attn_norm: norm(t("attn_norm.weight", &[n_embd])?)?,
                wq: Linear::load(opts, t("attn_q.weight", &[q_dim, n_embd])?)?,
                wk: Linear::load(opts, t("attn_k.weight", &[kv_dim, n_embd])?)?,
                wv: Linear::load(opts, t("attn_v.weight", &[kv_dim, n_embd])?)?,
                q_norm: norm(t("attn_q_norm.weight", &[head_dim])?)?,
                k_norm: norm(t("attn_k_norm.weight", &[head_dim])?)?,
                wo: Linear::load(opts, t("attn_output.weight", &[n_embd, q_dim])?)?,
                post_attn_norm: norm(t("post_attention_norm.weight", &[n_embd])?)?,
                ffn_norm: norm(t("ffn_norm.weight", &[n_embd])?)?,
                gate: Linear::load(opts, t("ffn_gate.weight", &[n_ff, n_embd])?)?,
                up: Linear::load(opts, t("ffn_up.weight", &[n_ff, n_embd])?)?,
                down: Linear::load(opts, t("ffn_down.weight", &[n_embd, n_ff])?)?,
                post_ffn_norm: norm(t("post_ffw_norm.weight", &[n_embd])?)?,
            });
        }
        let norm = RmsNorm::new(
            g.tensor("output_norm.weight", Some(&[n_embd]), device)?,
            eps,
            device,
        )?;
        Ok(Self {
            dims: Dims {
                vocab_size: vocab,
                context_length,
                n_layers: n_layer,
                n_embd,
                n_heads: n_head,
                n_kv_heads: n_kv_head,
                pass_cost: PassCost::of(n_embd, q_dim, kv_dim, widest_ff, head_dim, vocab),
            },
            head_dim,
            embed: Embedding::new(embd, Some((n_embd as f64).sqrt()))?,
            blocks,
            norm,
            output,
            ropes: [
                Rope::new(head_dim, local_base, 1.0, false),
                Rope::new(head_dim, global_base, global_scale, false),
            ],
            softcap,
            device: device.clone(),
        })
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    pub fn kv_shapes(&self) -> Vec<KvShape> {
        self.blocks
            .iter()
            .map(|b| KvShape {
                n_kv_head: b.attn.n_kv_head,
                head_dim: self.head_dim,
            })
            .collect()
    }

    /// One forward pass over `parts` (see [`crate::model::Model`]'s `forward`).
    pub fn forward(&self, parts: &mut [Part<'_>]) -> Result<Vec<Tensor>> {
        let dev = &self.device;
        let spans = row_spans(parts);
        let mut tables = Vec::with_capacity(parts.len());
        let mut tokens = Vec::with_capacity(spans.iter().map(|s| s.1).sum());
        for p in parts.iter_mut() {
            let seq = p.tokens.len();
            p.cache.reserve(p.pos0 + seq)?;
            tables.push([
                self.ropes[0].tables(p.pos0, seq, dev)?,
                self.ropes[1].tables(p.pos0, seq, dev)?,
            ]);
            tokens.extend_from_slice(p.tokens);
        }
        let mut x = self.embed.forward(&tokens, dev)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let a = &b.attn;
            let h = b.attn_norm.forward(&x)?;
            let (q, k, v) = (b.wq.forward(&h)?, b.wk.forward(&h)?, b.wv.forward(&h)?);
            let rope = &self.ropes[b.rope];
            let mut att = Vec::with_capacity(parts.len());
            for ((p, &(r0, seq)), tables) in parts.iter_mut().zip(&spans).zip(&tables) {
                // (seq, heads, head_dim) -> per-head norm -> (heads, seq, head_dim)
                let heads = |t: &Tensor, n: usize, norm: Option<&RmsNorm>| {
                    let t = t.narrow(0, r0, seq)?.reshape((seq, n, a.head_dim))?;
                    let t = match norm {
                        Some(norm) => norm.forward(&t)?,
                        None => t,
                    };
                    t.transpose(0, 1)
                };
                let q = rope.apply(&heads(&q, a.n_head, Some(&b.q_norm))?, &tables[b.rope])?;
                let k = rope.apply(&heads(&k, a.n_kv_head, Some(&b.k_norm))?, &tables[b.rope])?;
                p.cache
                    .write(i, p.pos0, &k, &heads(&v, a.n_kv_head, None)?)?;
                att.push(attend(a, &q, p.cache, i, p.pos0, seq, dev)?);
            }
            let att = b
                .post_attn_norm
                .forward(&b.wo.forward(&concat_rows(&att)?)?)?;
            x = (x + att)?;
            let h = b.ffn_norm.forward(&x)?;
            let gated = (b.gate.forward(&h)?.gelu()? * b.up.forward(&h)?)?;
            let ffn = b.post_ffn_norm.forward(&b.down.forward(&gated)?)?;
            x = (x + ffn)?;
        }
        let (rows, counts) = output_rows(&x, parts)?;
        let logits = self.output.forward(&self.norm.forward(&rows)?)?;
        let logits = match self.softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        };
        split_rows(&logits, &counts)
    }
}

/// Which layers use the sliding window: an explicit per-layer list when present, otherwise
/// all but every `DEFAULT_SLIDING_WINDOW_PATTERN`-th layer.
pub(crate) fn sliding_layers(
    g: &GgufFile,
    n_layer: usize,
) -> std::result::Result<Vec<bool>, ModelError> {
    match g.content.metadata.get(SLIDING_PATTERN_KEY) {
        Some(Value::Array(flags)) => {
            let flags: Vec<bool> = flags
                .iter()
                .map(|f| f.to_bool())
                .collect::<Result<_>>()
                .map_err(|e| ModelError::corrupt(&g.path, format!("{SLIDING_PATTERN_KEY}: {e}")))?;
            if flags.len() != n_layer {
                return Err(ModelError::corrupt(
                    &g.path,
                    format!(
                        "{SLIDING_PATTERN_KEY} lists {} layers, the model has {n_layer}",
                        flags.len()
                    ),
                ));
            }
            Ok(flags)
        }
        Some(v) => {
            let every = v
                .to_u32()
                .map_err(|e| ModelError::corrupt(&g.path, format!("{SLIDING_PATTERN_KEY}: {e}")))?
                as usize;
            Ok((0..n_layer)
                .map(|i| every == 0 || (i + 1) % every != 0)
                .collect())
        }
        None => Ok((0..n_layer)
            .map(|i| (i + 1) % DEFAULT_SLIDING_WINDOW_PATTERN != 0)
            .collect()),
    }
}
