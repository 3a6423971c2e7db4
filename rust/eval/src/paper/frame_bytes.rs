//! Uplink and downlink bytes per frame, as the wire protocol encodes them: what the closed-form
//! evaluation charges each system for a request, a verification, a verdict or a streamed token.

use uhlm_core::protocol::{Draft, Generate, Message, Tokens, Verdict, Verify, encode_frame};

use crate::EvalError;

/// Sizes of the frames that do not depend on the distribution.
pub(super) struct FrameSizes {
    /// Remote LLM only: one `Generate` per generation of `tokens_per_generation` tokens.
    pub(super) generate: f64,
    pub(super) tokens_per_generation: f64,
    /// A `Tokens` frame carrying one id (the server streams each token as it is sampled).
    pub(super) streamed_token: f64,
    /// A `Verdict` (the downlink of every verification).
    pub(super) verdict: f64,
}

impl FrameSizes {
    pub(super) fn new(tokens_per_generation: u32) -> Result<Self, EvalError> {
        let generate = frame_bytes(&Message::Generate(Generate {
            seq: 1000,
            max_tokens: tokens_per_generation,
        }))?;
        let streamed_token = frame_bytes(&Message::Tokens(Tokens {
            seq: 1000,
            tokens: vec![40_000],
        }))?;
        let verdict = frame_bytes(&Message::Verdict(Verdict {
            seq: 1000,
            token: 40_000,
            accepted: true,
            beta: 0.25,
            tv_distance: 0.25,
            accepted_links: Vec::new(),
            // What a busy server sends; a few bytes more than `None`.
            window: Some(256),
        }))?;
        Ok(Self {
            generate,
            tokens_per_generation: tokens_per_generation.max(1) as f64,
            streamed_token,
            verdict,
        })
    }
}

pub(super) fn frame_bytes(msg: &Message) -> Result<f64, EvalError> {
    encode_frame(msg, u32::MAX)
        .map(|f| f.len() as f64)
        .map_err(|e| EvalError::Frame(e.to_string()))
}

pub(super) fn verify_frame_bytes(draft: Option<(u32, Vec<u8>)>) -> Result<f64, EvalError> {
    frame_bytes(&Message::Verify(Verify {
        seq: 1000,
        position: 1000,
        skipped: Vec::new(),
        draft: draft.map(|(token, q)| Draft { token, q }),
        uncertainty: 0.5,
        chain: Vec::new(),
    }))
}

/// Bytes a skipped token adds to the next `Verify` (its id in `skipped`, a postcard varint).
pub(super) fn varint_len(id: u32) -> f64 {
    (32 - id.max(1).leading_zeros()).div_ceil(7) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        assert_eq!(varint_len(1), 1.0);
        assert_eq!(varint_len(127), 1.0);
        assert_eq!(varint_len(128), 2.0);
        assert_eq!(varint_len(49_151), 3.0);
    }
}
