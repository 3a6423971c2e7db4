//! One batched forward pass: each sequence's share of it ([`Part`]), which rows get logits
//! ([`Outputs`]), and the row bookkeeping every architecture uses to gather and split them.

use candle_core::Tensor;

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
