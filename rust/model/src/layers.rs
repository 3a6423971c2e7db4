//! Building blocks shared by the architectures: quantized linear layers, RMS norms, rotary
//! position embeddings and the token embedding table.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

use crate::load_options::{Kernels, LoadOptions};
use crate::qmatmul::QuantMatmul;
use candle_core::{Device, Result, Tensor};

/// A bias-free linear layer whose weight stays quantized: the kernels read its GGUF blocks
/// directly ([`QuantMatmul`]).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: QuantMatmul,
    bias: Option<Tensor>,
}

/// Storage types for which candle 0.11 has only scalar CPU dot products (3-10x slower than its
/// AVX2/NEON kernels for Q4_0, Q8_0 and the k-quants).
const SCALAR_ONLY: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// How the linear layers of a model hold and run their weights.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerOptions {
    /// Requantize [`SCALAR_ONLY`] CPU weights to Q8_0 where no fast kernel reads them.
    pub widen: bool,
    pub kernels: Kernels,
}

impl From<&LoadOptions> for LayerOptions {
    fn from(o: &LoadOptions) -> Self {
        Self {
            widen: !o.keep_weight_types,
            kernels: o.kernels,
        }
    }
}

impl Linear {
    /// A layer for `weight`; with `widen`, CPU weights of a [`SCALAR_ONLY`] type are
    /// requantized to Q8_0 (whose 8 bits hold their 4-5 bit values almost exactly) where
    /// the kernels in use have no fast path for them.
    pub fn load(opts: LayerOptions, weight: QTensor) -> Result<Self> {
        let dtype = weight.dtype();
        let fast =
            opts.kernels == Kernels::Own && QuantMatmul::has_fast_kernel(dtype, &weight.device());
        let weight =
            if opts.widen && SCALAR_ONLY.contains(&dtype) && !fast && weight.device().is_cpu() {
                QTensor::quantize(&weight.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
            } else {
                weight
            };
        Self::from_arc(opts, Arc::new(weight))
    }

    pub fn from_arc(opts: LayerOptions, weight: Arc<QTensor>) -> Result<Self> {
        Ok(Self {
            weight: QuantMatmul::new(weight, opts.kernels)?,
            bias: None,
        })
    }

    /// Adds a bias (qwen2's q/k/v projections have one).
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.weight.forward(xs)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// Root-mean-square norm over the last dimension, with a learned per-channel scale.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: QTensor, eps: f32, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: weight.dequantize(device)?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps)
    }
}

/// The token embedding table, kept quantized: rows are dequantized only for the tokens
/// looked up, which matters for gemma3's 262k-row table.
#[derive(Debug, Clone)]
pub(crate) struct Embedding {
    table: QMatMul,
    /// Gemma multiplies embeddings by sqrt(d); llama does not.
    scale: Option<f64>,
}

impl Embedding {
    pub fn new(table: Arc<QTensor>, scale: Option<f64>) -> Result<Self> {
        Ok(Self {
            table: QMatMul::from_arc(table)?,
            scale,
        })
    }

    /// `(seq, n_embd)` hidden states for `tokens`.
    pub fn forward(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        let ids = Tensor::new(tokens, device)?;
        let xs = self.table.embedding(&ids)?;
        match self.scale {
            Some(s) => xs * s,
            None => Ok(xs),
        }
    }
}

/// Rotary position embedding for one frequency base. Tables are computed per call for just
/// the positions in flight, so long contexts cost no memory up front.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
    /// GGUF llama weights are permuted for the interleaved (GPT-J) layout; gemma and qwen2
    /// use the split-halves (NeoX) layout.
    interleaved: bool,
}

/// cos/sin tables for one contiguous run of positions.
pub(crate) struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `scale` divides positions (linear rope scaling); 1.0 for none.
    pub fn new(head_dim: usize, base: f32, scale: f32, interleaved: bool) -> Self {
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32) / scale)
            .collect();
        Self {
            inv_freq,
            interleaved,
        }
    }

    pub fn tables(&self, pos0: usize, seq: usize, device: &Device) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in pos0..pos0 + seq {
            for f in &self.inv_freq {
                let theta = p as f32 * f;
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (seq, half), device)?,
            sin: Tensor::from_vec(sin, (seq, half), device)?,
        })
    }

    /// Rotates `xs` of shape `(heads, seq, head_dim)`.
    pub fn apply(&self, xs: &Tensor, t: &RopeTables) -> Result<Tensor> {
        let xs = xs.unsqueeze(0)?.contiguous()?;
        let ys = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&xs, &t.cos, &t.sin)?
        } else {
            candle_nn::rotary_emb::rope(&xs, &t.cos, &t.sin)?
        };
        ys.squeeze(0)
    }
}
