//! The uplink codec's contract: the server decodes bit for bit the `q'` the device samples
//! from, `q'` is a distribution, and only its support can be drafted.

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use uhlm_core::codec::{Codec, Precision, decode, encode};
use uhlm_core::sampling::sample;

fn codec_strategy() -> impl Strategy<Value = Codec> {
    let precision = prop_oneof![Just(Precision::U8), Just(Precision::U16)];
    prop_oneof![
        Just(Codec::DenseF32),
        Just(Codec::DenseF16),
        (1u32..64, precision.clone()).prop_map(|(k, precision)| Codec::TopK { k, precision }),
        (0.05f32..=1.0, 1u32..256, precision.clone()).prop_map(|(p, max_k, precision)| {
            Codec::TopP {
                p,
                max_k,
                precision,
            }
        }),
        (1u32..16, 0.05f32..=1.0, 0u32..64, precision).prop_map(
            |(k, min_mass, extra, precision)| {
                Codec::TopKFloor {
                    k,
                    min_mass,
                    max_k: k + extra,
                    precision,
                }
            }
        ),
        (1u32..64).prop_map(|k| Codec::TopKUniformTail { k }),
    ]
}

/// Distributions with zeros, ties and a wide dynamic range.
fn dist_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![Just(0.0f32), 1e-9f32..1e-3, 1e-3f32..1.0, Just(0.25f32)],
        1..400,
    )
    .prop_filter("needs mass", |v| v.iter().any(|&x| x > 0.0))
    .prop_map(|v| {
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        v.iter().map(|&x| (x as f64 / s) as f32).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn decode_of_encode_is_q_prime_bit_for_bit(codec in codec_strategy(), q in dist_strategy()) {
        let e = encode(&codec, &q).unwrap();
        let decoded = decode(&e.bytes, Some(q.len())).unwrap();
        prop_assert_eq!(decoded.len(), q.len());
        for (a, b) in decoded.iter().zip(&e.q_prime) {
            prop_assert_eq!(a.to_bits(), b.to_bits());
        }
        let sum: f64 = e.q_prime.iter().map(|&x| x as f64).sum();
        prop_assert!((sum - 1.0).abs() < 1e-6, "sum {}", sum);
        prop_assert!(e.q_prime.iter().all(|&x| x.is_finite() && x >= 0.0));
        if codec.is_exact() {
            // Exact codecs never invent mass where the device had none.
            for (qp, &orig) in e.q_prime.iter().zip(&q) {
                prop_assert!(*qp == 0.0 || orig > 0.0);
            }
        }
    }

    #[test]
    fn only_the_support_of_q_prime_is_drafted(codec in codec_strategy(), q in dist_strategy(), seed in any::<u64>()) {
        let e = encode(&codec, &q).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..200 {
            let d = sample(&e.q_prime, &mut rng) as usize;
            prop_assert!(e.q_prime[d] > 0.0);
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&bytes, None);
        let _ = decode(&bytes, Some(300));
    }
}

/// A peaked distribution over SmolLM2's 49,152 tokens.
fn peaked(vocab: usize) -> Vec<f32> {
    let mut w: Vec<f64> = (0..vocab).map(|i| 1e-7 * (1.0 + (i % 7) as f64)).collect();
    for (rank, id) in [17usize, 4000, 123, 49_000, 2500, 31_337]
        .iter()
        .enumerate()
    {
        w[*id] = 0.5 / (rank + 1) as f64;
    }
    let s: f64 = w.iter().sum();
    w.iter().map(|&x| (x / s) as f32).collect()
}

#[test]
fn top_k_32_u8_of_a_peaked_vocab_fits_in_128_bytes() {
    let q = peaked(49_152);
    let e = encode(&"topk:32".parse().unwrap(), &q).unwrap();
    assert!(e.bytes.len() <= 128, "{} bytes", e.bytes.len());
    assert_eq!(e.q_prime.iter().filter(|&&x| x > 0.0).count(), 32);
    let dense = encode(&Codec::DenseF32, &q).unwrap();
    assert_eq!(dense.bytes.len(), 1 + 3 + 4 * 49_152);
    let half = encode(&Codec::DenseF16, &q).unwrap();
    assert_eq!(half.bytes.len(), 1 + 3 + 2 * 49_152);
}

#[test]
fn gemma_sized_vocabulary_round_trips() {
    let q = peaked(262_144);
    for spec in [
        "topp:0.99:4096:u16",
        "dense-f16",
        "topk-floor:16:0.95:128:u16",
    ] {
        let e = encode(&spec.parse().unwrap(), &q).unwrap();
        assert_eq!(
            decode(&e.bytes, Some(262_144)).unwrap(),
            e.q_prime,
            "{spec}"
        );
    }
}
