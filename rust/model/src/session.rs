//! A decoding session: one conversation's tokens and KV cache over a shared [`Model`].

use std::sync::Arc;

use crate::error::ModelError;
use crate::forward_pass::{Outputs, Part};
use crate::kv_cache::KvCache;
use crate::model::Model;

// Opening a session belongs to the session, not to the model it reads: the model never
// names the session type, so `model.rs` does not depend on this file.
impl Model {
    /// A fresh decoding session with its own KV cache.
    pub fn session(self: &Arc<Self>) -> Session {
        Session::new(self.clone())
    }
}

/// Next-token logits for consecutive positions, row-major `(rows, vocab)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    vocab: usize,
    rows: usize,
    data: Vec<f32>,
}

impl Logits {
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Logits predicting the token after input position `i` of the scored chunk.
    ///
    /// # Panics
    /// If `i >= rows()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Logits predicting the token after the last scored one.
    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[f32]> {
        self.data.chunks_exact(self.vocab)
    }

    /// The flat row-major buffer.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

/// One session's share of [`Session::score_batch`].
#[derive(Debug)]
pub struct BatchItem<'a> {
    pub session: &'a mut Session,
    /// New tokens to append (at least one).
    pub tokens: &'a [u32],
    /// Which new positions get logits.
    pub outputs: Outputs<'a>,
}

/// One sequence being decoded. Owns its KV cache; the weights are shared, so sessions are
/// cheap to create and independent of each other.
#[derive(Debug)]
pub struct Session {
    model: Arc<Model>,
    cache: KvCache,
    tokens: Vec<u32>,
}

impl Session {
    pub(crate) fn new(model: Arc<Model>) -> Self {
        let cache = model.new_cache();
        Self {
            model,
            cache,
            tokens: Vec::new(),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokens in the context.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The tokens in the context, oldest first.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Bytes held by this session's KV cache.
    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.allocated_bytes()
    }

    /// Bytes the KV cache allocates to take `more` tokens: its whole new capacity when it must
    /// grow (the old buffers live until copied), nothing when the room is there.
    pub fn kv_growth_bytes(&self, more: usize) -> usize {
        self.cache.growth_bytes(self.len() + more)
    }

    /// Most tokens the session can hold.
    pub fn context_length(&self) -> usize {
        self.model.info().context_length
    }

    /// Rolls back to the first `n` tokens (e.g. after rejected draft tokens). Costs nothing:
    /// the cached keys and values of the kept prefix stay valid.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.cache.truncate(n);
    }

    /// Forgets every token and frees the KV cache's buffers.
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.cache.release();
    }

    /// Appends `tokens` with one forward pass and returns the logits at every new position:
    /// row `i` predicts the token following `tokens[i]`. On error the session is unchanged.
    pub fn score(&mut self, tokens: &[u32]) -> Result<Logits, ModelError> {
        self.append(tokens, Outputs::All)
    }

    /// Appends `tokens` with one forward pass and returns only the logits that predict the
    /// token after the last of them: a prefill that needs nothing else skips the output
    /// projection (and the `rows x vocab` buffer) for every other position.
    pub fn score_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        Ok(self.append(tokens, Outputs::Last)?.into_vec())
    }

    /// Appends one token and returns the logits for the next.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>, ModelError> {
        self.score_last(&[token])
    }

    fn append(&mut self, tokens: &[u32], outputs: Outputs<'_>) -> Result<Logits, ModelError> {
        let mut item = [BatchItem {
            session: self,
            tokens,
            outputs,
        }];
        Ok(Session::score_batch(&mut item)?.remove(0))
    }

    /// Appends each item's tokens to its session in one forward pass over all of them: every
    /// weight matmul runs once over the rows of every session (the server verifies many
    /// devices at once this way), attention per session against its own cache. Returns each
    /// item's logits at the positions its `outputs` names (row `i` of the result is the `i`-th
    /// of them); they are bit for
    /// bit what [`Session::score`] / [`Session::score_last`] would return for that session
    /// alone. The sessions must share one model and be distinct. On error no session changes.
    pub fn score_batch(items: &mut [BatchItem<'_>]) -> Result<Vec<Logits>, ModelError> {
        let Some(first) = items.first() else {
            return Ok(Vec::new());
        };
        let model = first.session.model.clone();
        for item in items.iter() {
            if !Arc::ptr_eq(&item.session.model, &model) {
                return Err(ModelError::MixedBatch);
            }
            item.session.check(item.tokens)?;
            if let Outputs::Rows(rows) = item.outputs
                && let Some(&row) = rows.iter().find(|&&r| r >= item.tokens.len())
            {
                return Err(ModelError::NoSuchRow {
                    row,
                    rows: item.tokens.len(),
                });
            }
        }
        let mut parts: Vec<Part<'_>> = items
            .iter_mut()
            .map(|item| Part {
                tokens: item.tokens,
                pos0: item.session.tokens.len(),
                cache: &mut item.session.cache,
                outputs: item.outputs,
            })
            .collect();
        let logits = model.forward(&mut parts)?;
        drop(parts);
        let mut out = Vec::with_capacity(items.len());
        for (item, logits) in items.iter_mut().zip(logits) {
            let (rows, vocab) = logits.dims2()?;
            let data = logits.flatten_all()?.to_vec1::<f32>()?;
            let s = &mut *item.session;
            s.cache.set_len(s.tokens.len() + item.tokens.len());
            s.tokens.extend_from_slice(item.tokens);
            out.push(Logits { vocab, rows, data });
        }
        Ok(out)
    }

    fn check(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let max = self.context_length();
        let len = self.tokens.len() + tokens.len();
        if len > max {
            return Err(ModelError::ContextOverflow { len, max });
        }
        let vocab = self.model.info().vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::InvalidToken { id, vocab });
        }
        Ok(())
    }
}
