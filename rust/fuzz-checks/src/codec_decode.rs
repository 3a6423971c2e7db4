//! Arbitrary bytes as a draft's uplink payload (`codec::decode`, the server's most complex
//! parser of untrusted bytes): nothing may panic, and whatever decodes must be a distribution
//! the verifier accepts, so that no payload can reach the model worker and fail there.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use uhlm_core::codec::{self, MAX_VOCAB};
use uhlm_core::verify;

/// Decodes one payload (panics on a violated property).
pub fn check(data: &[u8]) {
    let Ok(q) = codec::decode(data, None) else {
        return;
    };
    assert!(!q.is_empty() && q.len() <= MAX_VOCAB);
    // The vocabulary the payload names is the one it is checked against.
    assert_eq!(codec::decode(data, Some(q.len())).as_ref(), Ok(&q));
    assert!(codec::decode(data, Some(q.len() + 1)).is_err());
    let p = vec![1.0 / q.len() as f32; q.len()];
    let draft = q
        .iter()
        .position(|&x| x > 0.0)
        .expect("a decoded q has mass") as u32;
    let verdict = verify::verify(&p, &q, draft, &mut ChaCha8Rng::seed_from_u64(7))
        .expect("every decoded distribution is verifiable");
    assert!((verdict.token as usize) < q.len());
}
