//! The embedded engine: uhlm's own candle runtime in this process, one KV cache per session,
//! every session's rows in one batched forward pass.

use std::sync::Arc;

use uhlm_model::{BatchItem, Model, Outputs, Session};

use super::{Engine, EngineError, EngineSession, ScoreItem, Wanted};

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
}

impl Engine for Embedded {
    type Session = Session;

    fn vocab_size(&self) -> usize {
        self.model.info().vocab_size
    }

    fn session(&self) -> Session {
        self.model.session()
    }

    fn score(&self, items: &mut [ScoreItem<'_, Session>]) -> Result<Vec<Vec<f32>>, EngineError> {
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
        Ok(logits
            .into_iter()
            .zip(items.iter())
            .map(|(l, i)| match i.wanted {
                Wanted::Nothing => Vec::new(),
                _ => l.into_vec(),
            })
            .collect())
    }
}
