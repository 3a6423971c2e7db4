//! The hybrid loop's decisions on synthetic distributions, without models or sockets:
//! uncertainty → skip or send → compress → verify, and what it costs on the uplink.
//!
//! Run: `cargo run -p uhlm-core --example hybrid_step`

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uhlm_core::codec::{Codec, encode};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample};
use uhlm_core::threshold::{Decision, PolicyConfig, ThresholdPolicy};
use uhlm_core::uncertainty::UncertaintyKind;
use uhlm_core::verify::verify;

const VOCAB: usize = 49_152;

/// Synthetic LLM and SLM logits: the SLM sees the LLM's preferences through noise.
fn logits(rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>) {
    let peak = rng.random_range(6.0f32..20.0);
    let leader = rng.random_range(0..VOCAB);
    let llm: Vec<f32> = (0..VOCAB)
        .map(|i| {
            if i == leader {
                peak
            } else {
                rng.random::<f32>() * 3.0
            }
        })
        .collect();
    let slm = llm.iter().map(|&z| z + rng.random::<f32>() * 0.3).collect();
    (llm, slm)
}

fn main() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let opts = SamplingOptions {
        temperature: 1.0,
        ..Default::default()
    };
    let codec: Codec = "topk-floor:16:0.95:128:u16".parse().expect("valid codec");
    let mut estimator = UncertaintyKind::default().build();
    let mut policy = ThresholdPolicy::new(PolicyConfig::default()).expect("valid policy");
    let (mut p, mut q, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    let (mut skipped, mut accepted, mut resampled, mut bytes) = (0, 0, 0, 0usize);
    let tokens = 200;
    for _ in 0..tokens {
        let (llm, slm) = logits(&mut rng);
        probabilities_into(&slm, &opts, &mut q, &mut scratch);
        let encoded = encode(&codec, &q).expect("q has mass");
        let draft = sample(&encoded.q_prime, &mut rng);
        let u = estimator.estimate(&slm, draft);
        let decision = policy.decide(u);
        if decision == Decision::Skip {
            skipped += 1;
            continue;
        }
        bytes += encoded.bytes.len();
        probabilities_into(&llm, &opts, &mut p, &mut scratch);
        let verdict = verify(&p, &encoded.q_prime, draft, &mut rng).expect("valid inputs");
        policy.observe(decision, u, verdict.beta);
        if verdict.accepted {
            accepted += 1;
        } else {
            resampled += 1;
        }
    }
    let dense = tokens * (4 + 4 * VOCAB);
    println!("tokens {tokens}: skipped {skipped}, accepted {accepted}, resampled {resampled}");
    println!(
        "uplink {bytes} bytes with {codec} vs {dense} dense f32 ({:.4}%)",
        100.0 * bytes as f64 / dense as f64
    );
    println!("threshold now {:.3}", policy.threshold());
}
