//! The device's model side of the loop: the SLM session, the sampling distribution, the uplink
//! encoding, the draft and its uncertainty. Runs on blocking threads, never on the reactor.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use uhlm_core::codec::{Codec, encode};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample, seek_position};
use uhlm_core::uncertainty::UncertaintyEstimator;
use uhlm_core::uncertainty::combined::LogisticCombiner;

use crate::draft_model::DraftModel;
use crate::error::SdkError;

/// ChaCha stream of the device's draft sampling. The server seeds its verification RNG from
/// the same seed on stream 0; drawing the draft from another stream keeps the acceptance
/// uniform independent of the draft, which exactness needs.
const DRAFT_STREAM: u64 = 0x75686c6d;

/// One drafted token.
pub(crate) struct Drafted {
    pub token: u32,
    /// The encoded `q'` the token was sampled from (modes that send drafts).
    pub q: Option<Vec<u8>>,
    pub uncertainty: f32,
    /// A combined predictor's separate signals behind `uncertainty` (empty otherwise).
    pub signals: Vec<f32>,
}

struct Params {
    sampling: SamplingOptions,
    codec: Option<Codec>,
    rng: ChaCha8Rng,
}

pub(crate) struct Drafter {
    session: Box<dyn DraftModel>,
    /// Logits every step must have (the engine's model's vocabulary).
    vocab: usize,
    estimator: Box<dyn UncertaintyEstimator>,
    params: Option<Params>,
    logits: Vec<f32>,
    probs: Vec<f32>,
    scratch: Vec<u32>,
}

impl Drafter {
    pub fn new(
        session: Box<dyn DraftModel>,
        vocab: usize,
        estimator: Box<dyn UncertaintyEstimator>,
    ) -> Self {
        Self {
            session,
            vocab,
            estimator,
            params: None,
            logits: Vec::new(),
            probs: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Most tokens the SLM's context holds.
    pub fn context_length(&self) -> usize {
        self.session.context_length()
    }

    /// Starts a generation from `prompt`, reusing the cached prefix shared with the last one.
    /// `codec` is `Some` in modes whose drafts are sampled from the encoded `q'`.
    pub fn start(
        &mut self,
        prompt: &[u32],
        sampling: SamplingOptions,
        codec: Option<Codec>,
        seed: u64,
    ) -> Result<(), SdkError> {
        let common = self
            .session
            .tokens()
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // Keep at least one prompt token to score: its logits predict the first new token.
        self.session
            .truncate(common.min(prompt.len().saturating_sub(1)));
        let fresh = &prompt[self.session.tokens().len()..];
        let logits = self.session.score_last(fresh)?;
        self.logits = self.checked(logits)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(DRAFT_STREAM);
        self.params = Some(Params {
            sampling,
            codec,
            rng,
        });
        Ok(())
    }

    /// Forgets every token after the first `n` (drafts after a rejected one); the next
    /// [`feed`](Self::feed) appends the token that replaces them.
    pub fn truncate(&mut self, n: usize) {
        self.session.truncate(n);
    }

    /// Appends a token and computes the logits for the next position.
    pub fn feed(&mut self, token: u32) -> Result<(), SdkError> {
        let logits = self.session.step(token)?;
        self.logits = self.checked(logits)?;
        Ok(())
    }

    /// `logits` if they cover the vocabulary: a shorter or longer row would draft tokens the
    /// server's model does not have (or never draft some it does).
    fn checked(&self, logits: Vec<f32>) -> Result<Vec<f32>, SdkError> {
        if logits.len() == self.vocab {
            Ok(logits)
        } else {
            Err(SdkError::Model(format!(
                "the draft model returned {} logits for a vocabulary of {}",
                logits.len(),
                self.vocab
            )))
        }
    }

    /// Drafts the next token from the current logits.
    pub fn draft(&mut self) -> Result<Drafted, SdkError> {
        let p = self
            .params
            .as_mut()
            .ok_or_else(|| SdkError::Model("draft before start".into()))?;
        if !probabilities_into(
            &self.logits,
            &p.sampling,
            &mut self.probs,
            &mut self.scratch,
        ) {
            return Err(SdkError::Model(
                "the on-device model produced no finite logit".into(),
            ));
        }
        // The draft for this position draws the same number however many drafts were thrown
        // away before it (chains drafted past a rejected token).
        seek_position(&mut p.rng, self.session.tokens().len());
        let (token, q) = match &p.codec {
            Some(codec) => {
                let enc = encode(codec, &self.probs)
                    .map_err(|e| SdkError::InvalidConfig(format!("codec {codec}: {e}")))?;
                (sample(&enc.q_prime, &mut p.rng), Some(enc.bytes))
            }
            None => (sample(&self.probs, &mut p.rng), None),
        };
        let uncertainty = self.estimator.estimate(&self.logits, token);
        Ok(Drafted {
            token,
            q,
            uncertainty,
            signals: self.estimator.signals().to_vec(),
        })
    }

    /// Takes a combined predictor's weights refitted by the policy.
    pub fn set_combiner(&mut self, combiner: &LogisticCombiner) {
        self.estimator.set_combiner(combiner);
    }
}
