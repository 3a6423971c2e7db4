//! A combined predictor refitted online from verdicts, as the SDK drives it: the estimator
//! scores each token with the weights in force, the policy decides, verdicts of sent tokens
//! (probes included) come back, and refitted weights reach the estimator.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uhlm_core::threshold::{Decision, PolicyConfig, ThresholdMode, ThresholdPolicy};
use uhlm_core::uncertainty::UncertaintyKind;
use uhlm_core::uncertainty::combined::LogisticCombiner;

/// Share of tokens skipped and mean skipped rejection per token over the stream's last half.
struct Tail {
    skip: f64,
    risk: f64,
}

/// Two signals per token: the first predicts rejection, the second is noise. The shipped
/// weights look only at the noise.
fn run(refit_combiner: bool, seed: u64) -> (Tail, ThresholdPolicy) {
    let shipped = LogisticCombiner {
        weights: vec![0.0, 1.0],
        bias: 0.0,
    };
    let kind = UncertaintyKind::Combined {
        signals: vec![UncertaintyKind::MaxProbability, UncertaintyKind::Margin],
        combiner: shipped.clone(),
    };
    let config = PolicyConfig {
        mode: ThresholdMode::Quality {
            max_risk: 0.05,
            confidence: 0.9,
        },
        initial_threshold: 0.2,
        probe_rate: 0.1,
        refit_combiner,
        seed,
        ..PolicyConfig::default()
    };
    let mut policy = ThresholdPolicy::new(config).unwrap().for_estimator(&kind);
    let mut weights = shipped;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = 20_000;
    let (mut skipped, mut risk) = (0usize, 0.0f64);
    for i in 0..n {
        let signals = [rng.random::<f32>(), rng.random::<f32>()];
        let beta = (0.6 * signals[0].powi(3)).min(1.0);
        let u = weights.score(&signals);
        let decision = policy.decide(u);
        if decision == Decision::Skip {
            if i >= n / 2 {
                skipped += 1;
                risk += beta as f64;
            }
            continue;
        }
        policy.observe_signals(decision, u, &signals, beta);
        if let Some(next) = policy.take_combiner_update() {
            weights = next;
        }
    }
    let half = (n / 2) as f64;
    (
        Tail {
            skip: skipped as f64 / half,
            risk: risk / half,
        },
        policy,
    )
}

#[test]
fn refitted_weights_find_the_informative_signal_and_skip_more_within_the_risk() {
    for seed in [1, 2, 3] {
        let (fixed, _) = run(false, seed);
        let (refit, policy) = run(true, seed);
        let w = &policy.combiner().expect("combined").weights;
        eprintln!(
            "seed {seed}: shipped skip {:.3} risk {:.4}; refit skip {:.3} risk {:.4}; {w:?}",
            fixed.skip, fixed.risk, refit.skip, refit.risk
        );
        assert!(w[0] > 5.0 * w[1].abs(), "{w:?}");
        assert!(refit.risk <= 0.05 && fixed.risk <= 0.05);
        assert!(refit.skip > fixed.skip + 0.1);
    }
}
