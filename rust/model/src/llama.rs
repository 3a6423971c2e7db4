//! Llama-family decoder (SmolLM2, TinyLlama, Llama, Mistral; qwen2 adds q/k/v biases and
//! NeoX rope): grouped-query attention, RoPE, RMSNorm, SiLU-gated MLP, and tied embeddings
//! when `output.weight` is absent.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

use crate::architecture::{Architecture, Dims};
use crate::attention::{AttnConfig, attend};
use crate::error::ModelError;
use crate::forward_pass::{Part, PassCost, concat_rows, output_rows, row_spans, split_rows};
use crate::gguf::GgufFile;
use crate::kv_cache::KvShape;
use crate::layers::{Embedding, LayerOptions, Linear, RmsNorm, Rope};

struct Block {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Weights and hyper-parameters of a llama-family model.
pub(crate) struct Llama {
    dims: Dims,
    attn: AttnConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    output: Linear,
    rope: Rope,
    device: Device,
}

impl Llama {
    pub fn load(
        g: &mut GgufFile,
        arch: Architecture,
        device: &Device,
        opts: LayerOptions,
    ) -> Result2<Self> {
        let p = arch.gguf_name();
        let n_layer = g.block_count(p)?;
        let n_embd = g.usize(&format!("{p}.embedding_length"))?;
        let n_head = g.usize(&format!("{p}.attention.head_count"))?;
        let n_kv_head = g
            .opt_usize(&format!("{p}.attention.head_count_kv"))?
            .unwrap_or(n_head);
        let context_length = g.usize(&format!("{p}.context_length"))?;
        let eps = g.f32(&format!("{p}.attention.layer_norm_rms_epsilon"))?;
        let rope_base = g
            .opt_f32(&format!("{p}.rope.freq_base"))?
            .unwrap_or(10_000.0);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || n_embd % n_head != 0 {
            return Err(ModelError::corrupt(
                &g.path,
                format!("inconsistent heads: {n_head} query, {n_kv_head} kv, width {n_embd}"),
            ));
        }
        let head_dim = g
            .opt_usize(&format!("{p}.attention.key_length"))?
            .unwrap_or(n_embd / n_head);
        if let Some(rope_dim) = g.opt_usize(&format!("{p}.rope.dimension_count"))?
            && rope_dim != head_dim
        {
            return Err(ModelError::corrupt(
                &g.path,
                format!("partial rotary ({rope_dim} of {head_dim}) is not supported"),
            ));
        }
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
        for i in 0..n_layer {
            let mut t = |name: &str, dims: &[usize]| {
                g.tensor(&format!("blk.{i}.{name}"), Some(dims), device)
            };
            let norm = |t: candle_core::quantized::QTensor| RmsNorm::new(t, eps, device);
            let attn_norm = norm(t("attn_norm.weight", &[n_embd])?)?;
            let ffn_norm = norm(t("ffn_norm.weight", &[n_embd])?)?;
            let n_ff = g.tensor_dims(&format!("blk.{i}.ffn_up.weight"))?[0];
            widest_ff = widest_ff.max(n_ff);
            let mut t = |name: &str, dims: &[usize]| {
                g.tensor(&format!("blk.{i}.{name}"), Some(dims), device)
            };
            let wq = Linear::load(opts, t("attn_q.weight", &[q_dim, n_embd])?)?;
            let wk = Linear::load(opts, t("attn_k.weight", &[kv_dim, n_embd])?)?;
            let wv = Linear::load(opts, t("attn_v.weight", &[kv_dim, n_embd])?)?;
            let wo = Linear::load(opts, t("attn_output.weight", &[n_embd, q_dim])?)?;
            let gate = Linear::load(opts, t("ffn_gate.weight", &[n_ff, n_embd])?)?;
            let up = Linear::load(opts, t("ffn_up.weight", &[n_ff, n_embd])?)?;
            let down = Linear::load(opts, t("ffn_down.weight", &[n_embd, n_ff])?)?;
            let mut bias = |name: &str, n: usize| -> Result2<Option<Tensor>> {
                let full = format!("blk.{i}.{name}");
                if g.has_tensor(&full) {
                    Ok(Some(
                        g.tensor(&full, Some(&[n]), device)?.dequantize(device)?,
                    ))
                } else {
                    Ok(None)
                }
            };
            let (bq, bk, bv) = (
                bias("attn_q.bias", q_dim)?,
                bias("attn_k.bias", kv_dim)?,
                bias("attn_v.bias", kv_dim)?,
            );
            blocks.push(Block {
                attn_norm,
                wq: wq.with_bias(bq),
                wk: wk.with_bias(bk),
                wv: wv.with_bias(bv),
                wo,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        let norm = RmsNorm::new(
            g.tensor("output_norm.weight", Some(&[n_embd]), device)?,
            eps,
            device,
        )?;
        // llama.cpp's converter permutes llama q/k weights for interleaved rope; qwen2 keeps
        // the NeoX layout.
        let interleaved = arch == Architecture::Llama;
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
            attn: AttnConfig {
                n_head,
                n_kv_head,
                head_dim,
                scale: 1.0 / (head_dim as f64).sqrt(),
                window: None,
            },
            embed: Embedding::new(embd, None)?,
            blocks,
            norm,
            output,
            rope: Rope::new(head_dim, rope_base, 1.0, interleaved),
            device: device.clone(),
        })
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    pub fn kv_shapes(&self) -> Vec<KvShape> {
        let s = KvShape {
            n_kv_head: self.attn.n_kv_head,
            head_dim: self.attn.head_dim,
        };
        vec![s; self.blocks.len()]
    }

    /// One forward pass over `parts` (see [`crate::model::Model`]'s `forward`).
    pub fn forward(&self, parts: &mut [Part<'_>]) -> Result<Vec<Tensor>> {
        let dev = &self.device;
        let a = &self.attn;
        let spans = row_spans(parts);
        let mut tables = Vec::with_capacity(parts.len());
        let mut tokens = Vec::with_capacity(spans.iter().map(|s| s.1).sum());
        for p in parts.iter_mut() {
            p.cache.reserve(p.pos0 + p.tokens.len())?;
            tables.push(self.rope.tables(p.pos0, p.tokens.len(), dev)?);
            tokens.extend_from_slice(p.tokens);
        }
        let mut x = self.embed.forward(&tokens, dev)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.attn_norm.forward(&x)?;
            let (q, k, v) = (b.wq.forward(&h)?, b.wk.forward(&h)?, b.wv.forward(&h)?);
            let mut att = Vec::with_capacity(parts.len());
            for ((p, &(r0, seq)), rt) in parts.iter_mut().zip(&spans).zip(&tables) {
                let heads = |t: &Tensor, n: usize| {
                    t.narrow(0, r0, seq)?
                        .reshape((seq, n, a.head_dim))?
                        .transpose(0, 1)
                };
                let q = self.rope.apply(&heads(&q, a.n_head)?, rt)?;
                let k = self.rope.apply(&heads(&k, a.n_kv_head)?, rt)?;
                p.cache.write(i, p.pos0, &k, &heads(&v, a.n_kv_head)?)?;
                att.push(attend(a, &q, p.cache, i, p.pos0, seq, dev)?);
            }
            x = (x + b.wo.forward(&concat_rows(&att)?)?)?;
            let h = b.ffn_norm.forward(&x)?;
            let gated = (b.gate.forward(&h)?.silu()? * b.up.forward(&h)?)?;
            x = (x + b.down.forward(&gated)?)?;
        }
        let (rows, counts) = output_rows(&x, parts)?;
        split_rows(&self.output.forward(&self.norm.forward(&rows)?)?, &counts)
    }
}

type Result2<T> = std::result::Result<T, ModelError>;
