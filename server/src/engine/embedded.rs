//! The embedded engine: uhlm's own candle runtime in this process, one KV cache per session,
//! every session's rows in one batched forward pass.

use std::sync::Arc;

use uhlm_core::sampling::SamplingOptions;
use uhlm_model::{BatchItem, Model, Outputs, PassCost, Session};

use super::seam::{Engine, EngineError, EngineSession, ScoreItem, Target, Wanted};

/// The model loaded in this process.
pub(crate) struct Embedded {
    model: Arc<Model>,
}

impl Embedded {
    pub fn new(model: Arc<Model>) -> Self {
        Self { model }
    }
}

impl EngineSession for Session {
    fn len(&self) -> usize {
        Session::len(self)
    }

    fn truncate(&mut self, len: usize) {
        Session::truncate(self, len);
    }

    fn reset(&mut self) {
        Session::reset(self);
    }

    fn kv_cache_bytes(&self) -> usize {
        Session::kv_cache_bytes(self)
    }

    fn growth_bytes(&self, more: usize) -> usize {
        self.kv_growth_bytes(more)
    }
}

impl Engine for Embedded {
    type Session = Session;

    fn vocab_size(&self) -> usize {
        self.model.info().vocab_size
    }

    fn session(&self) -> Session {
        self.model.session()
    }

    /// The model's own bound, and per decided row the draft distribution the worker decoded
    /// for it (a cache's growth is its session's, [`EngineSession::growth_bytes`]).
    fn pass_cost(&self) -> PassCost {
        let cost = self.model.pass_cost();
        PassCost {
            bytes_per_output: cost.bytes_per_output
                + (self.model.info().vocab_size * std::mem::size_of::<f32>()) as u64,
            ..cost
        }
    }

    fn score(&self, items: &mut [ScoreItem<'_, Session>]) -> Result<Vec<Vec<Target>>, EngineError> {
        let mut batch: Vec<BatchItem<'_>> = items
            .iter_mut()
            .map(|i| BatchItem {
                session: &mut *i.session,
                tokens: i.tokens,
                // The runtime always computes one row; a catch-up ignores it.
                outputs: match i.wanted {
                    Wanted::Nothing | Wanted::Last => Outputs::Last,
                    Wanted::Rows(r) => Outputs::Rows(r),
                },
            })
            .collect();
        let logits = Session::score_batch(&mut batch)?;
        let vocab = self.vocab_size();
        Ok(logits
            .into_iter()
            .zip(items.iter())
            .map(|(l, i)| match i.wanted {
                Wanted::Nothing => Vec::new(),
                _ => l
                    .into_vec()
                    .chunks(vocab)
                    .map(|row| Target::Logits(row.to_vec()))
                    .collect(),
            })
            .collect())
    }

    /// Never needed: every target this engine gives is whole.
    fn logits_at(&self, _: &Session, _: usize) -> Result<Vec<f32>, EngineError> {
        Err(EngineError::Unsupported {
            engine: "embedded",
            what: "score a past position again",
        })
    }

    /// Never needed: every target this engine gives is whole.
    fn draws_at(
        &self,
        _: &Session,
        _: usize,
        _: &SamplingOptions,
        _: u32,
    ) -> Result<Vec<(u32, f32)>, EngineError> {
        Err(EngineError::Unsupported {
            engine: "embedded",
            what: "draw from a past position",
        })
    }
}
