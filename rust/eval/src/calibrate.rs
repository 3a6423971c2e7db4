//! Calibration: how well each uncertainty estimator predicts the LLM's rejection of a draft.
//!
//! The pair runs in lockstep over the prompts exactly as the hybrid loop would with every token
//! verified: the SLM samples a draft from `q`, the LLM's `p` decides, the final token feeds both
//! models. At each position we record every estimator's `u` and the rejection probability
//! `beta = 1 - min(1, p_d / q_d)`, then fit `beta ≈ a·u + b` per estimator (U-HLM §III).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample};
use uhlm_core::threshold::{Calibration, DEFAULT_CONFIDENCE, DEFAULT_MAX_OUTPUT_RISK, Sample};
use uhlm_core::uncertainty::UncertaintyKind;
use uhlm_core::verify::verify;

use crate::EvalError;
use crate::pair::Pair;
use crate::prompts::PromptSet;

/// What a calibration run samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CalibrationOptions {
    pub sampling: SamplingOptions,
    pub estimators: Vec<UncertaintyKind>,
    /// The mean skipped beta the target-risk threshold allows.
    pub target_risk_epsilon: f32,
    pub seed: u64,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingOptions {
                temperature: 1.0,
                max_tokens: 32,
                ..SamplingOptions::default()
            },
            estimators: UncertaintyKind::all(7),
            target_risk_epsilon: 0.1,
            seed: 7,
        }
    }
}

/// One drafted token: every estimator's uncertainty and what the LLM made of the draft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Labelled {
    pub prompt: usize,
    pub position: usize,
    /// One entry per estimator, in [`CalibrationOptions::estimators`] order.
    pub u: Vec<f32>,
    pub beta: f32,
    /// Total-variation distance between the SLM's and the LLM's distribution here.
    pub tv: f32,
    pub accepted: bool,
}

/// The fit of one estimator, or why it has none.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EstimatorFit {
    pub name: String,
    pub calibration: Option<Calibration>,
    pub error: Option<String>,
}

/// A whole calibration run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CalibrationRun {
    pub prompts: String,
    pub options: CalibrationOptions,
    pub samples: Vec<Labelled>,
    pub fits: Vec<EstimatorFit>,
    /// Mean `sum_x min(p_x, q_x)`: the share of probability mass the pair agrees on.
    pub mean_acceptance: f64,
}

impl CalibrationRun {
    /// The calibration of the SDK's default estimator, the file devices load.
    pub fn default_calibration(&self) -> Option<&Calibration> {
        let default = UncertaintyKind::default();
        self.fits
            .iter()
            .filter_map(|f| f.calibration.as_ref())
            .find(|c| c.estimator == default)
    }

    /// `(u, beta)` of estimator `i`, one list per prompt (each prompt's generation is one
    /// output of the per-output risk).
    pub fn outputs_of(&self, i: usize) -> Vec<Vec<Sample>> {
        let mut outputs: Vec<Vec<Sample>> = Vec::new();
        for s in &self.samples {
            if outputs.len() <= s.prompt {
                outputs.resize_with(s.prompt + 1, Vec::new);
            }
            outputs[s.prompt].push(Sample {
                u: s.u[i],
                beta: s.beta,
            });
        }
        outputs
    }

    /// `(u, beta)` of estimator `i`.
    pub fn samples_of(&self, i: usize) -> Vec<Sample> {
        self.samples
            .iter()
            .map(|s| Sample {
                u: s.u[i],
                beta: s.beta,
            })
            .collect()
    }
}

/// Runs the pair over `prompts` and fits every estimator.
pub fn calibrate(
    pair: &Pair,
    prompts: &PromptSet,
    options: &CalibrationOptions,
) -> Result<CalibrationRun, EvalError> {
    calibrate_with_progress(pair, prompts, options, &mut |_| {})
}

/// [`calibrate`], calling `done(i)` after prompt `i` is labelled (calibrations of a real pair
/// take minutes).
pub fn calibrate_with_progress(
    pair: &Pair,
    prompts: &PromptSet,
    options: &CalibrationOptions,
    done: &mut dyn FnMut(usize),
) -> Result<CalibrationRun, EvalError> {
    let mut samples = Vec::new();
    for (i, prompt) in prompts.prompts.iter().enumerate() {
        let ids = pair.prompt_ids(prompt)?;
        label_prompt(pair, i, &ids, options, &mut samples)?;
        done(i);
    }
    let mut run = CalibrationRun {
        prompts: prompts.source.clone(),
        options: options.clone(),
        mean_acceptance: if samples.is_empty() {
            0.0
        } else {
            samples.iter().map(|s| 1.0 - s.tv as f64).sum::<f64>() / samples.len() as f64
        },
        samples,
        fits: Vec::new(),
    };
    run.fits = options
        .estimators
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            // Every prompt's labelled run is one output of the per-output bound.
            let fit = Calibration::from_samples(
                kind.clone(),
                &run.samples_of(i),
                options.target_risk_epsilon,
            )
            .and_then(|c| {
                c.with_output_quality(
                    &run.outputs_of(i),
                    DEFAULT_MAX_OUTPUT_RISK,
                    DEFAULT_CONFIDENCE,
                )
            });
            EstimatorFit {
                name: kind.build().name().to_string(),
                error: fit.as_ref().err().map(ToString::to_string),
                calibration: fit.ok(),
            }
        })
        .collect();
    Ok(run)
}

/// Labels every drafted position of one prompt.
fn label_prompt(
    pair: &Pair,
    prompt: usize,
    ids: &[u32],
    options: &CalibrationOptions,
    out: &mut Vec<Labelled>,
) -> Result<(), EvalError> {
    let sampling = &options.sampling;
    let mut estimators: Vec<_> = options.estimators.iter().map(|k| k.build()).collect();
    // One stream per prompt, so adding prompts does not change earlier ones.
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    rng.set_stream(prompt as u64);
    let eos = pair.llm.tokenizer().eos_ids().to_vec();
    let tokenizer = pair.llm.tokenizer();
    let stops: Vec<&str> = sampling
        .stop
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let mut generated = Vec::new();
    let (mut slm, mut llm) = (pair.slm.session(), pair.llm.session());
    // The two models are independent until the verdict: each step runs them on two threads.
    let mut next = std::thread::scope(|scope| {
        let slm_pass = scope.spawn(|| slm.score_last(ids));
        let p = llm.score_last(ids);
        (slm_pass.join().expect("SLM thread panicked"), p)
    });
    let (mut q, mut p, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    for position in 0..sampling.max_tokens as usize {
        let (q_logits, p_logits) = (next.0?, next.1?);
        if !probabilities_into(&q_logits, sampling, &mut q, &mut scratch)
            || !probabilities_into(&p_logits, sampling, &mut p, &mut scratch)
        {
            return Err(EvalError::NoUsableLogits(position));
        }
        let draft = sample(&q, &mut rng);
        let u = estimators
            .iter_mut()
            .map(|e| e.estimate(&q_logits, draft))
            .collect();
        let verdict = verify(&p, &q, draft, &mut rng)?;
        out.push(Labelled {
            prompt,
            position,
            u,
            beta: verdict.beta,
            tv: verdict.tv_distance,
            accepted: verdict.accepted,
        });
        let token = verdict.token;
        generated.push(token);
        // The generation this calibrates stops at a stop string: so do its labels.
        let stopped = !stops.is_empty()
            && tokenizer
                .decode(&generated, true)
                .is_ok_and(|text| stops.iter().any(|s| text.contains(s)));
        if stopped
            || eos.contains(&token)
            || slm.len() + 1 >= slm.context_length().min(llm.context_length())
        {
            break;
        }
        next = std::thread::scope(|scope| {
            let slm_pass = scope.spawn(|| slm.step(token));
            let p = llm.step(token);
            (slm_pass.join().expect("SLM thread panicked"), p)
        });
    }
    Ok(())
}
