//! Deciding one position from what the engine reported there: the exact speculative-sampling
//! rule on whole logits (`uhlm_core::verify`), or on a sampling engine's partial report
//! (`uhlm_core::verify_partial`), asking the engine for more where the report does not suffice.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uhlm_core::protocol::{ErrorCode, ErrorMessage};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample, seek_position};
use uhlm_core::verify::{Verdict, VerifyError, sample_residual, tv_distance, verify};
use uhlm_core::verify_partial::{Partial, sample_partial, verify_partial};

use super::{engine_failure, fail};
use crate::engine::{Engine, Target};

/// Most times a position asks the engine for more draws before it takes the whole
/// distribution instead. The residual's rejection rounds are memoryless: after any number of
/// refused draws the token to come follows the residual exactly, so drawing it from the whole
/// distribution then changes no probability; it bounds the requests when the residual's mass
/// is small (each round keeps its draw with that probability).
const MAX_DRAW_ASKS: u64 = 8;

/// The seed of the engine's `k`-th draw at `position` of a session whose random numbers come
/// from the ChaCha seed `session_seed`: a stream per position apart from the verdicts' (stream
/// 0), so that the engine's draws are independent of the numbers the verdict draws, and a
/// seeded generation asks the engine for the same draws on a retry or a new connection.
pub(super) fn engine_seed(session_seed: [u8; 32], position: usize, k: u64) -> u32 {
    let mut r = ChaCha8Rng::from_seed(session_seed);
    r.set_stream(1 + position as u64);
    r.set_word_pos(u128::from(k));
    r.next_u32()
}

/// What deciding one position needs besides the target.
pub(super) struct Position<'a, E: Engine> {
    pub engine: &'a E,
    pub session: &'a E::Session,
    pub sampling: &'a SamplingOptions,
    /// Tokens before the position (its context's length).
    pub len: usize,
    /// The draft there and the distribution it was drawn from; `None`: sample.
    pub draft: Option<(u32, &'a [f32])>,
}

impl<E: Engine> Position<'_, E> {
    /// The verdict at this position (for a plain sample: not accepted, `beta` 0). `probs` and
    /// `scratch` are reused buffers.
    pub fn decide(
        &self,
        target: Target,
        rng: &mut ChaCha8Rng,
        probs: &mut Vec<f32>,
        scratch: &mut Vec<u32>,
    ) -> Result<Verdict, ErrorMessage> {
        // A position's verdict draws the same numbers on a retry or a new connection.
        seek_position(rng, self.len);
        let partial = match target {
            Target::Logits(logits) => return self.whole(&logits, rng, probs, scratch),
            Target::Partial(partial) => partial,
        };
        let session_seed = rng.get_seed();
        let mut k = 0;
        let mut more = || {
            if k == MAX_DRAW_ASKS {
                return None;
            }
            k += 1;
            let seed = engine_seed(session_seed, self.len, k);
            match self
                .engine
                .draws_at(self.session, self.len, self.sampling, seed)
            {
                Ok(draws) => Some(draws),
                Err(e) => {
                    tracing::error!(error = %e, "the engine gave no further draw");
                    None
                }
            }
        };
        let decided = match self.draft {
            Some((d, q)) => verify_partial(&partial, q, d, rng, &mut more),
            None => sample_partial(&partial, rng, &mut more).map(|t| Partial::Decided(sampled(t))),
        };
        let decided = match decided {
            Err(VerifyError::NoMoreDraws) if k == MAX_DRAW_ASKS => {
                return self.residual_from_whole(rng, probs, scratch);
            }
            other => other.map_err(bad_draft)?,
        };
        match decided {
            Partial::Decided(v) => Ok(v),
            // Decided from the report alone, before any number was drawn: the whole
            // distribution's verdict draws the same numbers it would have.
            Partial::NeedFull => {
                self.engine_probabilities(probs, scratch)?;
                self.verify_whole(probs, rng)
            }
        }
    }

    /// After [`MAX_DRAW_ASKS`] refused rounds: the residual (or, with no draft, the sample)
    /// drawn from the whole distribution.
    fn residual_from_whole(
        &self,
        rng: &mut ChaCha8Rng,
        probs: &mut Vec<f32>,
        scratch: &mut Vec<u32>,
    ) -> Result<Verdict, ErrorMessage> {
        self.engine_probabilities(probs, scratch)?;
        let Some((d, q)) = self.draft else {
            return Ok(sampled(sample(probs, rng)));
        };
        let token = sample_residual(probs, q, rng).map_err(bad_draft)?;
        let (p_d, q_d) = (probs[d as usize], q[d as usize]);
        Ok(Verdict {
            token,
            accepted: false,
            beta: (1.0 - p_d / q_d).max(0.0),
            tv_distance: tv_distance(probs, q),
        })
    }

    fn whole(
        &self,
        logits: &[f32],
        rng: &mut ChaCha8Rng,
        probs: &mut Vec<f32>,
        scratch: &mut Vec<u32>,
    ) -> Result<Verdict, ErrorMessage> {
        self.probabilities(logits, probs, scratch)?;
        self.verify_whole(probs, rng)
    }

    /// The verdict against the whole distribution `probs`.
    fn verify_whole(&self, probs: &[f32], rng: &mut ChaCha8Rng) -> Result<Verdict, ErrorMessage> {
        match self.draft {
            Some((d, q)) => verify(probs, q, d, rng).map_err(bad_draft),
            None => Ok(sampled(sample(probs, rng))),
        }
    }

    /// The engine's whole distribution at this position, under the session's sampling.
    fn engine_probabilities(
        &self,
        probs: &mut Vec<f32>,
        scratch: &mut Vec<u32>,
    ) -> Result<(), ErrorMessage> {
        let logits = self
            .engine
            .logits_at(self.session, self.len)
            .map_err(engine_failure)?;
        self.probabilities(&logits, probs, scratch)
    }

    /// The session's sampling applied to `logits`, into `probs`.
    fn probabilities(
        &self,
        logits: &[f32],
        probs: &mut Vec<f32>,
        scratch: &mut Vec<u32>,
    ) -> Result<(), ErrorMessage> {
        if probabilities_into(logits, self.sampling, probs, scratch) {
            Ok(())
        } else {
            Err(fail(
                ErrorCode::Internal,
                "the model produced no finite logits",
            ))
        }
    }
}

fn sampled(token: u32) -> Verdict {
    Verdict {
        token,
        accepted: false,
        beta: 0.0,
        tv_distance: 0.0,
    }
}

/// A draft that cannot be verified is the device's fault, except where the engine ran dry.
fn bad_draft(e: VerifyError) -> ErrorMessage {
    match e {
        VerifyError::NoMoreDraws => fail(
            ErrorCode::Internal,
            "the server's inference engine failed on this request",
        ),
        e => fail(
            ErrorCode::InvalidRequest,
            format!("cannot verify the draft: {e}"),
        ),
    }
}
