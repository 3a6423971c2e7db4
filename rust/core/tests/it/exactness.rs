//! Invariant 1: with skipping off, verified output is distributed exactly as the LLM's `p`,
//! for every uplink codec, because the device samples its draft from the decoded `q'`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use statrs::distribution::{ChiSquared, ContinuousCDF};
use uhlm_core::codec::{Codec, Precision, encode};
use uhlm_core::sampling::sample;
use uhlm_core::verify::verify;

const DRAWS: usize = 200_000;

/// A random distribution with a realistic spread of magnitudes.
fn random_dist(rng: &mut ChaCha8Rng, vocab: usize, sharpness: f64) -> Vec<f32> {
    let w: Vec<f64> = (0..vocab)
        .map(|_| (sharpness * (rng.random::<f64>() * 2.0 - 1.0)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|&x| (x / s) as f32).collect()
}

/// Chi-square goodness-of-fit p-value of `counts` against `p`, merging cells expected < 5.
fn chi_square_p_value(counts: &[u64], p: &[f32]) -> f64 {
    let n: u64 = counts.iter().sum();
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
    for (&c, &pi) in counts.iter().zip(p) {
        let e = pi as f64 * n as f64;
        if e < 5.0 {
            pooled_obs += c as f64;
            pooled_exp += e;
            continue;
        }
        stat += (c as f64 - e).powi(2) / e;
        cells += 1;
    }
    if pooled_exp >= 5.0 {
        stat += (pooled_obs - pooled_exp).powi(2) / pooled_exp;
        cells += 1;
    } else {
        assert!(
            pooled_obs < 20.0,
            "{pooled_obs} draws where p expects {pooled_exp}"
        );
    }
    let dof = (cells - 1) as f64;
    1.0 - ChiSquared::new(dof).unwrap().cdf(stat)
}

/// Runs the hybrid step `DRAWS` times: draft from `q_sampled`, verify against `q_verified`.
fn histogram(p: &[f32], q_sampled: &[f32], q_verified: &[f32], seed: u64) -> Vec<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts = vec![0u64; p.len()];
    for _ in 0..DRAWS {
        let draft = sample(q_sampled, &mut rng);
        let v = verify(p, q_verified, draft, &mut rng).expect("valid inputs");
        counts[v.token as usize] += 1;
    }
    counts
}

fn codecs() -> Vec<Codec> {
    vec![
        Codec::DenseF32,
        Codec::DenseF16,
        Codec::TopK {
            k: 4,
            precision: Precision::U8,
        },
        Codec::TopP {
            p: 0.6,
            max_k: 64,
            precision: Precision::U16,
        },
        Codec::TopKFloor {
            k: 2,
            min_mass: 0.5,
            max_k: 16,
            precision: Precision::U8,
        },
    ]
}

#[test]
fn verified_tokens_follow_p_for_every_codec() {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    for (case, vocab) in [8usize, 16, 33, 64].into_iter().enumerate() {
        let p = random_dist(&mut rng, vocab, 2.5);
        let q = random_dist(&mut rng, vocab, 2.5);
        for codec in codecs() {
            let e = encode(&codec, &q).unwrap();
            let counts = histogram(&p, &e.q_prime, &e.q_prime, 7 + case as u64);
            let pv = chi_square_p_value(&counts, &p);
            assert!(pv > 1e-3, "vocab {vocab}, codec {codec}: p-value {pv}");
        }
    }
}

#[test]
fn verifying_against_the_uncompressed_q_is_caught() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for vocab in [16usize, 48] {
        let p = random_dist(&mut rng, vocab, 2.0);
        let q = random_dist(&mut rng, vocab, 2.0);
        for codec in codecs().into_iter().filter(|c| {
            !matches!(c, Codec::DenseF32 | Codec::DenseF16) // q' == q up to rounding there
        }) {
            let e = encode(&codec, &q).unwrap();
            // The wrong verifier: the device drafts from q' but the server checks against q.
            let counts = histogram(&p, &e.q_prime, &q, 3);
            let pv = chi_square_p_value(&counts, &p);
            assert!(
                pv < 1e-6,
                "vocab {vocab}, codec {codec}: wrong verifier passed, p-value {pv}"
            );
        }
    }
}

#[test]
fn greedy_llm_with_one_hot_p_always_yields_its_argmax() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let q = random_dist(&mut rng, 32, 2.0);
    let mut p = vec![0.0f32; 32];
    p[11] = 1.0;
    let e = encode(&"topk:8".parse().unwrap(), &q).unwrap();
    let counts = histogram(&p, &e.q_prime, &e.q_prime, 1);
    assert_eq!(counts[11], DRAWS as u64);
}
