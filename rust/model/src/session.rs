//! A decoding session: one conversation's tokens and KV cache over a shared [`Model`].

use std::sync::Arc;

use crate::error::ModelError;
use crate::kv_cache::KvCache;
use crate::model::{Model, Outputs};

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

    /// Forgets every token.
    pub fn reset(&mut self) {
        self.truncate(0);
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

    fn append(&mut self, tokens: &[u32], outputs: Outputs) -> Result<Logits, ModelError> {
        self.check(tokens)?;
        let pos0 = self.tokens.len();
        let logits = self.model.forward(tokens, pos0, &mut self.cache, outputs)?;
        let (rows, vocab) = logits.dims2()?;
        let data = logits.flatten_all()?.to_vec1::<f32>()?;
        self.cache.set_len(pos0 + tokens.len());
        self.tokens.extend_from_slice(tokens);
        Ok(Logits { vocab, rows, data })
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
