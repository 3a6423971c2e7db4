//! A device's draft model that does almost no model work once the campaign is warm: the real
//! draft model computes the logits of each context the device reaches once, and the device
//! replays them, at a phone's pace, whenever that context comes back.
//!
//! Contexts come back because a hybrid generation is a function of its seed (the device draws
//! its drafts from the seed, the server verifies with the same seed, each position's numbers
//! its own), and loadgen's replaying devices repeat their seed; a fault (a lost link, a killed
//! server) sends a generation down a new path, whose rows are then computed. Every row a device
//! samples from is the draft model's own row for that device's context: the server sees drafts
//! that agree with it as often as a drafting phone's do. Run 9's replay recorded one greedy
//! path and replayed it by position whatever the device sampled, and the server accepted 15 %
//! of the drafts against 61 % from drafting devices (RELIABILITY.md, run 10).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uhlm_model::{Model, Session};
use uhlm_sdk::{DraftModel, SdkError};

/// Most prompt tokens the model scores before the generated ones: the end of a long prompt is
/// enough for the distributions' shapes, and four 4,096-token prefills on the devices' own core
/// took minutes in the campaign.
const SCORED_PROMPT: usize = 256;

/// Most rows one device keeps (a row is the vocabulary's logits, 192 KiB for SmolLM2's): a
/// generation's path and its drafts thrown away, several times over; contexts past it are
/// computed each time.
const MAX_ROWS: usize = 160;

/// How the devices' rows were served, for the report.
#[derive(Debug, Default)]
pub(super) struct ReplayCounts {
    pub replayed: AtomicU64,
    pub computed: AtomicU64,
}

/// See the module documentation. It holds one prompt; the device's context is that prompt and
/// the tokens generated after it.
pub(super) struct ReplayedDraft {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    /// The real model, scoring the prompt's last [`SCORED_PROMPT`] tokens and the path after it.
    session: Session,
    /// Rows by the generated tokens that precede them (empty: the prompt's last row).
    rows: HashMap<Vec<u32>, Vec<f32>>,
    pace: Duration,
    counts: Arc<ReplayCounts>,
}

impl ReplayedDraft {
    /// Scores `prompt` once, so that the device's first generation starts from a replayed row.
    pub fn new(
        model: &Arc<Model>,
        prompt: Vec<u32>,
        pace: Duration,
        counts: Arc<ReplayCounts>,
    ) -> Result<Self, SdkError> {
        let mut draft = Self {
            tokens: prompt.clone(),
            prompt,
            session: model.session(),
            rows: HashMap::new(),
            pace,
            counts,
        };
        draft.row()?;
        draft.tokens.clear();
        Ok(draft)
    }

    /// The row after the current context: replayed if this context was reached before.
    fn row(&mut self) -> Result<Vec<f32>, SdkError> {
        let path = self
            .tokens
            .strip_prefix(self.prompt.as_slice())
            .ok_or_else(|| {
                SdkError::Model("a replayed draft holds one prompt; it was given another".into())
            })?
            .to_vec();
        if let Some(row) = self.rows.get(&path) {
            self.counts.replayed.fetch_add(1, Ordering::Relaxed);
            return Ok(row.clone());
        }
        let tail = &self.prompt[self.prompt.len().saturating_sub(SCORED_PROMPT)..];
        let context: Vec<u32> = tail.iter().chain(&path).copied().collect();
        if context.is_empty() {
            return Err(SdkError::Model("an empty context has no next token".into()));
        }
        // Keep what the session already holds of this context; score at least the last token.
        let held = self.session.tokens();
        let common = held
            .iter()
            .zip(&context)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(context.len() - 1);
        self.session.truncate(keep);
        let row = self.session.score_last(&context[keep..])?;
        self.counts.computed.fetch_add(1, Ordering::Relaxed);
        if self.rows.len() < MAX_ROWS {
            self.rows.insert(path, row.clone());
        }
        Ok(row)
    }
}

impl DraftModel for ReplayedDraft {
    fn context_length(&self) -> usize {
        self.session.context_length()
    }

    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    fn score_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SdkError> {
        self.tokens.extend_from_slice(tokens);
        self.row()
    }

    /// One token at a phone's pace: whatever computing the row took counts towards it.
    fn step(&mut self, token: u32) -> Result<Vec<f32>, SdkError> {
        let started = Instant::now();
        self.tokens.push(token);
        let row = self.row()?;
        std::thread::sleep(self.pace.saturating_sub(started.elapsed()));
        Ok(row)
    }
}
