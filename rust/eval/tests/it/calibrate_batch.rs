//! Calibration labels prompts several at a time, each model stepping them in one batched
//! forward pass; the labels must be exactly those of one prompt at a time.
//!
//! Needs the cached SmolLM2 model (`uhlm models fetch`); `UHLM_REQUIRE_MODELS=1` turns its
//! absence into a failure.

use uhlm_core::sampling::SamplingOptions;
use uhlm_eval::calibrate::{CalibrationOptions, calibrate_with_progress};
use uhlm_eval::pair::Pair;
use uhlm_eval::prompts::{EvalPrompt, PromptSet};
use uhlm_model::LoadOptions;

#[test]
fn batched_labels_equal_one_prompt_at_a_time() {
    let path = match uhlm_model::fetch::resolve_model("smollm2") {
        Ok(p) => p,
        Err(e) => {
            assert!(
                std::env::var_os("UHLM_REQUIRE_MODELS").is_none(),
                "{e} and UHLM_REQUIRE_MODELS is set"
            );
            eprintln!("skipping: {e}");
            return;
        }
    };
    // The same file on both sides is a valid pair (one vocabulary); the draft is sampled at
    // temperature 1, so the labels also exercise each prompt's random stream.
    let pair = Pair::load(&path, &path, &LoadOptions::default()).unwrap();
    let texts = [
        "The capital of France is",
        "def add(a, b):",
        "Once upon a time, in a small village,",
        "The opposite of hot is",
        "Water boils at a temperature of",
    ];
    let prompts = PromptSet {
        source: "test".into(),
        prompts: texts
            .iter()
            .map(|t| EvalPrompt {
                prompt: t.to_string(),
                chat: false,
            })
            .collect(),
    };
    let run = |batch: usize| {
        let options = CalibrationOptions {
            sampling: SamplingOptions {
                temperature: 1.0,
                max_tokens: 12,
                // Stops one prompt early at a different step than the others.
                stop: vec![".".into()],
                ..SamplingOptions::default()
            },
            batch,
            ..CalibrationOptions::default()
        };
        let mut finished = Vec::new();
        let run =
            calibrate_with_progress(&pair, &prompts, &options, &mut |i| finished.push(i)).unwrap();
        finished.sort_unstable();
        assert_eq!(finished, vec![0, 1, 2, 3, 4], "batch {batch}");
        run.samples
    };
    let alone = run(1);
    let batched = run(4);
    assert!(alone.len() > 5 * 3, "{} labels", alone.len());
    assert_eq!(batched, alone);
}
