//! One batched forward pass: each sequence's share of it ([`Part`]), which rows get logits
//! ([`Outputs`]), what it allocates ([`PassCost`]), and the row bookkeeping every architecture
//! uses to gather and split them.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::kv_cache::KvCache;

/// One sequence's share of a forward pass.
pub(crate) struct Part<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`.
    pub pos0: usize,
    pub cache: &'a mut KvCache,
    pub outputs: Outputs<'a>,
}

/// Where each part's rows sit in the batch: `(first row, rows)`.
pub(crate) fn row_spans(parts: &[Part<'_>]) -> Vec<(usize, usize)> {
    let mut r = 0;
    parts
        .iter()
        .map(|p| {
            let span = (r, p.tokens.len());
            r += p.tokens.len();
            span
        })
        .collect()
}

/// What one forward pass allocates beyond the weights and the sessions' caches, as a bound
/// linear in its rows: every token row's activations through a block (a pass holds one block's
/// at a time) and every row it returns logits for. A server counts it against its memory
/// budget: a pass of thousands of rows once took ten times the memory its caches did.
/// (Attention is streamed on the CPU; on an accelerator the scores of a part add
/// `heads · rows · context` floats, which the server's chunk sizes bound.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassCost {
    pub bytes_per_token: u64,
    pub bytes_per_output: u64,
}

impl PassCost {
    /// The bound for a block of these widths (the widest layer's), in f32 activations: the
    /// residual stream and its norms, q/k/v with their rotated and per-head copies, the
    /// attention output gathered and projected, the gated feed-forward's four `n_ff` rows, and
    /// rope tables; an output row's hidden state, logits, and the caller's copy of them as
    /// probabilities.
    pub(crate) fn of(
        n_embd: usize,
        q: usize,
        kv: usize,
        n_ff: usize,
        head_dim: usize,
        vocab: usize,
    ) -> Self {
        let token_floats = 10 * n_embd + 4 * q + 4 * kv + 5 * n_ff + 2 * head_dim;
        let output_floats = 2 * n_embd + 3 * vocab;
        Self {
            bytes_per_token: 4 * token_floats as u64,
            bytes_per_output: 4 * output_floats as u64,
        }
    }

    /// Bytes of a pass over `tokens` rows returning logits for `outputs` of them.
    pub fn bytes(&self, tokens: usize, outputs: usize) -> u64 {
        self.bytes_per_token * tokens as u64 + self.bytes_per_output * outputs as u64
    }
}

/// Rows `(rows, ..)` gathered per part, one tensor (no copy for a single part).
pub(crate) fn concat_rows(pieces: &[Tensor]) -> candle_core::Result<Tensor> {
    match pieces {
        [one] => Ok(one.clone()),
        many => Tensor::cat(many, 0),
    }
}

/// The hidden states whose logits the parts want, in one tensor, and how many rows each
/// part contributes.
pub(crate) fn output_rows(
    x: &Tensor,
    parts: &[Part<'_>],
) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let spans = row_spans(parts);
    let mut pieces = Vec::with_capacity(parts.len());
    let mut counts = Vec::with_capacity(parts.len());
    for (p, &(r0, seq)) in parts.iter().zip(&spans) {
        let rows = p.outputs.select(&x.narrow(0, r0, seq)?)?;
        counts.push(rows.dim(0)?);
        pieces.push(rows);
    }
    Ok((concat_rows(&pieces)?, counts))
}

/// Splits `(rows, vocab)` logits back into the parts' shares.
pub(crate) fn split_rows(logits: &Tensor, counts: &[usize]) -> candle_core::Result<Vec<Tensor>> {
    let mut r = 0;
    counts
        .iter()
        .map(|&n| {
            let t = logits.narrow(0, r, n);
            r += n;
            t
        })
        .collect()
}

/// Which positions of a forward pass get logits. The output projection over a 150k-262k
/// vocabulary costs as much as several blocks and its result is `rows x vocab` floats, so a
/// prefill that needs only the next token's distribution computes only that row, and a
/// verification only the rows it decides at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs<'a> {
    /// Every position (evaluation).
    All,
    /// The last position only (prefill, decode).
    Last,
    /// These positions of the new tokens, in this order (verifying a chain of drafts: the
    /// rows before each draft). Each must be below the number of new tokens.
    Rows(&'a [usize]),
}

impl Outputs<'_> {
    /// The hidden states `(seq, d)` whose logits are wanted.
    pub(crate) fn select(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Outputs::All => Ok(xs.clone()),
            Outputs::Last => {
                let seq = xs.dim(0)?;
                xs.narrow(0, seq - 1, 1)
            }
            Outputs::Rows(rows) => {
                let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                let ids = Tensor::from_vec(ids, rows.len(), xs.device())?;
                xs.index_select(&ids, 0)
            }
        }
    }
}
