//! A `Verify` from an untrusted device against a session: the checks the server's worker runs
//! (`Verify::check`: token ids, position, context limit, the draft's payload), then
//! speculative verification with the LLM's distribution. Nothing may panic; a request that
//! passes the checks must verify, and the verdict's token must be in the vocabulary.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use uhlm_core::codec::{self, Codec, Precision};
use uhlm_core::protocol::{Draft, Link, Verify};
use uhlm_core::verify;

#[derive(Debug, arbitrary::Arbitrary)]
pub struct Input {
    /// Server side: tokens held, vocabulary size, context limit.
    held: u16,
    vocab: u16,
    max_context: u16,
    /// Device side.
    seq: u32,
    position: u32,
    skipped: Vec<u32>,
    draft: Option<(u32, Payload)>,
    /// Chained links: local tokens, then a draft.
    chain: Vec<(Vec<u32>, u32, Payload)>,
    max_links: u8,
    /// The LLM's distribution (weights, cycled over the vocabulary).
    p: Vec<u8>,
    seed: u64,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub enum Payload {
    /// Raw bytes, as an attacker sends them.
    Raw(Vec<u8>),
    /// A well-formed payload: these weights over the vocabulary, encoded with a codec.
    Encoded { weights: Vec<u8>, codec: u8, k: u8 },
}

fn weights(w: &[u8], vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|i| w.get(i % w.len().max(1)).copied().unwrap_or(1) as f32)
        .collect()
}

fn payload(p: Payload, vocab: usize) -> Vec<u8> {
    match p {
        Payload::Raw(bytes) => bytes,
        Payload::Encoded {
            weights: w,
            codec,
            k,
        } => {
            let k = u32::from(k).max(1);
            let codec = match codec % 4 {
                0 => Codec::DenseF32,
                1 => Codec::DenseF16,
                2 => Codec::TopK {
                    k,
                    precision: Precision::U8,
                },
                _ => Codec::TopKFloor {
                    k,
                    min_mass: 0.9,
                    max_k: k * 4,
                    precision: Precision::U16,
                },
            };
            codec::encode(&codec, &weights(&w, vocab))
                .map(|e| e.bytes)
                .unwrap_or_default()
        }
    }
}

/// Checks and verifies one request (panics on a violated property).
pub fn check(input: Input) {
    let vocab = usize::from(input.vocab % 512) + 1;
    let v = Verify {
        seq: input.seq,
        position: input.position,
        skipped: input.skipped,
        draft: input.draft.map(|(token, p)| Draft {
            token,
            q: payload(p, vocab),
        }),
        uncertainty: 0.5,
        chain: input
            .chain
            .into_iter()
            .map(|(skipped, token, p)| Link {
                skipped,
                draft: Draft {
                    token,
                    q: payload(p, vocab),
                },
                uncertainty: 0.5,
            })
            .collect(),
    };
    let held = usize::from(input.held);
    let max_links = usize::from(input.max_links % 8);
    let Ok(q) = v.check(held, vocab, usize::from(input.max_context), max_links) else {
        return;
    };
    // What passed the checks is consistent with the session.
    assert_eq!(v.base_len(), Some(held as u32));
    assert!(v.inputs().iter().all(|&t| (t as usize) < vocab));
    let positions = v.positions().expect("checked positions fit");
    assert!(
        positions
            .iter()
            .all(|&p| (p as usize) < usize::from(input.max_context))
    );
    assert_eq!(positions.len(), q.len());
    assert!(v.chain.len() <= max_links);
    // The row before each position is among the inputs (or is the session's last token).
    assert_eq!(v.inputs().len() + held, *positions.last().unwrap() as usize);
    let mut p = weights(&input.p, vocab);
    let total: f32 = p.iter().sum();
    if total <= 0.0 {
        p = vec![1.0; vocab];
    }
    let total: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    let mut rng = ChaCha8Rng::seed_from_u64(input.seed);
    let drafts = v.drafts();
    if v.draft.is_none() {
        assert_eq!(q, [None], "no draft, no chain, no distribution");
    }
    for (d, q) in drafts.zip(q) {
        let q = q.expect("a draft and its decoded distribution come together");
        let verdict =
            verify::verify(&p, &q, d.token, &mut rng).expect("a checked request verifies");
        assert!((verdict.token as usize) < vocab);
        assert!(!verdict.accepted || verdict.token == d.token);
    }
}
