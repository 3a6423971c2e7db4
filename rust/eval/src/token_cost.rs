//! What one drafted token costs the device beyond the SLM's forward pass: sampling, the uplink
//! encoding, the uncertainty estimate, the policy and the frame, each timed on real logits.
//!
//! The SLM generates greedily from a prompt and keeps the logits of every position (so the
//! stages see the distributions a real generation sees, peaked and flat ones alike); then each
//! stage runs over all of them, repeatedly, and reports its mean time per token beside the mean
//! forward time of the same model on the same thread.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uhlm_core::codec::{Codec, encode};
use uhlm_core::protocol::{Draft, Message, Verify, encode_frame};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample};
use uhlm_core::threshold::{PolicyConfig, ThresholdPolicy};
use uhlm_core::uncertainty::UncertaintyKind;
use uhlm_model::Model;

use crate::EvalError;

/// One timed stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageCost {
    pub stage: String,
    /// Mean microseconds per token.
    pub us_per_token: f64,
    /// That time as a share of the mean forward pass (`0.05` = 5 %).
    pub of_forward: f64,
}

/// The report of [`token_cost`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenCostReport {
    pub model: String,
    pub vocab: usize,
    pub positions: usize,
    pub temperature: f32,
    /// Mean SLM decode step (one token, this thread), microseconds.
    pub forward_us: f64,
    pub stages: Vec<StageCost>,
    /// What the SDK's uhlm mode runs per token with its defaults (softmax, default codec,
    /// sample, default estimator, policy; the frame only for sent tokens, counted in full).
    pub uhlm_default_us: f64,
    pub uhlm_default_of_forward: f64,
}

/// Decodes `positions` tokens greedily after `prompt` and times every per-token stage on their
/// logits, at sampling temperature `temperature`, each over at least `min_time`.
pub fn token_cost(
    model: &Arc<Model>,
    prompt: &[u32],
    positions: usize,
    temperature: f32,
    min_time: Duration,
) -> Result<TokenCostReport, EvalError> {
    let mut session = model.session();
    let mut logits = vec![session.score_last(prompt)?];
    let start = Instant::now();
    for _ in 1..positions.max(1) {
        let last = logits.last().expect("one logits row at least");
        let token = uhlm_core::sampling::argmax(last).ok_or(EvalError::NoUsableLogits(0))?;
        logits.push(session.step(token)?);
    }
    let steps = positions.max(1) - 1;
    let forward_us = if steps == 0 {
        f64::NAN
    } else {
        start.elapsed().as_secs_f64() * 1e6 / steps as f64
    };
    let vocab = logits[0].len();
    let sampling = SamplingOptions {
        temperature,
        ..SamplingOptions::default()
    };

    // Inputs every later stage needs, computed once.
    let (mut q, mut scratch) = (Vec::new(), Vec::new());
    let probs: Vec<Vec<f32>> = logits
        .iter()
        .map(|l| {
            probabilities_into(l, &sampling, &mut q, &mut scratch);
            q.clone()
        })
        .collect();
    let codec = Codec::default();
    let encoded: Vec<_> = probs
        .iter()
        .map(|p| encode(&codec, p))
        .collect::<Result<_, _>>()
        .map_err(|e| EvalError::Frame(e.to_string()))?;

    let mut stages = Vec::new();
    let mut time = |name: String, f: &mut dyn FnMut(usize)| {
        let us = per_token(logits.len(), min_time, f);
        stages.push(StageCost {
            stage: name,
            us_per_token: us,
            of_forward: us / forward_us,
        });
        us
    };

    let softmax_us = time(format!("softmax (temperature {temperature})"), &mut |i| {
        probabilities_into(&logits[i], &sampling, &mut q, &mut scratch);
        black_box(&q);
    });
    let mut codec_us = f64::NAN;
    for c in [
        codec.clone(),
        Codec::TopKUniformTail {
            k: (vocab as f64 * 0.026).round().max(1.0) as u32,
        },
        Codec::DenseF32,
    ] {
        let us = time(format!("encode {c}"), &mut |i| {
            black_box(encode(&c, &probs[i]).ok());
        });
        if c == codec {
            codec_us = us;
        }
    }
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7);
    let sample_us = time("sample from q'".into(), &mut |i| {
        black_box(sample(&encoded[i].q_prime, &mut rng));
    });
    let drafts: Vec<u32> = encoded
        .iter()
        .map(|e| uhlm_core::sampling::argmax(&e.q_prime).unwrap_or(0))
        .collect();
    let mut estimate_default = f64::NAN;
    for kind in UncertaintyKind::all(7) {
        let mut estimator = kind.build();
        let is_default = kind == UncertaintyKind::default();
        let us = time(format!("uncertainty {}", estimator.name()), &mut |i| {
            black_box(estimator.estimate(&logits[i], drafts[i]));
        });
        if is_default {
            estimate_default = us;
        }
    }
    let mut policy = ThresholdPolicy::new(PolicyConfig::default())
        .map_err(|e| EvalError::Frame(e.to_string()))?;
    let policy_us = time("policy decide".into(), &mut |i| {
        black_box(policy.decide(i as f32 / logits.len() as f32));
    });
    let frame_us = time("Verify frame".into(), &mut |i| {
        let msg = Message::Verify(Verify {
            seq: i as u32,
            position: i as u32,
            skipped: Vec::new(),
            draft: Some(Draft {
                token: drafts[i],
                q: encoded[i].bytes.clone(),
            }),
            uncertainty: 0.5,
            chain: Vec::new(),
        });
        black_box(encode_frame(&msg, u32::MAX).ok());
    });
    let uhlm_default_us =
        softmax_us + codec_us + sample_us + estimate_default + policy_us + frame_us;
    Ok(TokenCostReport {
        model: model.path().display().to_string(),
        vocab,
        positions: logits.len(),
        temperature,
        forward_us,
        stages,
        uhlm_default_us,
        uhlm_default_of_forward: uhlm_default_us / forward_us,
    })
}

/// Mean microseconds of `f(i)` over `i` cycling through `0..n`, repeated for at least
/// `min_time` (after one warm-up pass).
fn per_token(n: usize, min_time: Duration, f: &mut dyn FnMut(usize)) -> f64 {
    for i in 0..n {
        f(i);
    }
    let start = Instant::now();
    let mut calls = 0u64;
    loop {
        for i in 0..n {
            f(i);
        }
        calls += n as u64;
        if start.elapsed() >= min_time {
            break;
        }
    }
    start.elapsed().as_secs_f64() * 1e6 / calls as f64
}
