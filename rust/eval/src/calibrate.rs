//! Calibration: how well each uncertainty estimator predicts the LLM's rejection of a draft.
//!
//! The pair runs in lockstep over the prompts exactly as the hybrid loop would with every token
//! verified: the SLM samples a draft from `q`, the LLM's `p` decides, the final token feeds both
//! models. At each position we record every estimator's `u` and the rejection probability
//! `beta = 1 - min(1, p_d / q_d)`, then fit `beta ≈ a·u + b` per estimator (U-HLM §III).
//! Prompts are labelled a few at a time, each model stepping them in one batched forward pass
//! (bit-identical to one at a time), the SLM and the LLM on two threads.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use uhlm_core::sampling::{SamplingOptions, probabilities_into, sample};
use uhlm_core::threshold::{Calibration, DEFAULT_CONFIDENCE, DEFAULT_MAX_OUTPUT_RISK, Sample};
use uhlm_core::uncertainty::combined::LogisticCombiner;
use uhlm_core::uncertainty::{UncertaintyEstimator, UncertaintyKind};
use uhlm_core::verify::verify;
use uhlm_model::{BatchItem, Outputs, Session};

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
    /// Prompts labelled together, each model stepping them in one batched forward pass (speed
    /// only: the logits, hence the labels, are bit for bit those of one prompt at a time).
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_batch() -> usize {
    4
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
            batch: default_batch(),
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

/// One token of a combined predictor's calibration: its signals and `beta`.
pub type SignalsAndBeta = (Vec<f32>, f32);

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
        self.outputs_with(|s| Sample {
            u: s.u[i],
            beta: s.beta,
        })
    }

    /// Every labelled token as `token(label)`, one list per prompt.
    fn outputs_with<T>(&self, token: impl Fn(&Labelled) -> T) -> Vec<Vec<T>> {
        let mut outputs: Vec<Vec<T>> = Vec::new();
        for s in &self.samples {
            if outputs.len() <= s.prompt {
                outputs.resize_with(s.prompt + 1, Vec::new);
            }
            outputs[s.prompt].push(token(s));
        }
        outputs
    }

    /// The outputs of every run (one per prompt), each token as the combinable signals
    /// ([`UncertaintyKind::combinable`]) and `beta`; `None` if a run lacks one of the signals.
    pub fn combinable_outputs(runs: &[CalibrationRun]) -> Option<Vec<Vec<SignalsAndBeta>>> {
        let mut outputs: Vec<Vec<SignalsAndBeta>> = Vec::new();
        for run in runs {
            let columns: Vec<usize> = UncertaintyKind::combinable()
                .iter()
                .map(|k| run.options.estimators.iter().position(|e| e == k))
                .collect::<Option<_>>()?;
            outputs
                .extend(run.outputs_with(|s| (columns.iter().map(|&c| s.u[c]).collect(), s.beta)));
        }
        Some(outputs)
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

/// One calibration of estimator `kind` from several runs pooled (each run's prompts are
/// separate outputs), with the per-output threshold at `max_risk` / `confidence`.
pub fn pooled_calibration(
    runs: &[CalibrationRun],
    kind: &UncertaintyKind,
    max_risk: f32,
    confidence: f32,
) -> Result<Calibration, EvalError> {
    let mut outputs = Vec::new();
    for run in runs {
        let i = run
            .options
            .estimators
            .iter()
            .position(|e| e == kind)
            .ok_or_else(|| EvalError::Calibration(format!("{} has no {kind:?}", run.prompts)))?;
        outputs.extend(run.outputs_of(i));
    }
    calibration_of(kind.clone(), &outputs, runs, max_risk, confidence)
}

/// The calibration of a combined predictor ([`UncertaintyKind::Combined`]) from several runs
/// pooled: its weights are fitted on the even-numbered outputs and its thresholds calibrated
/// on the odd ones, so that the bound holds for a predictor the calibrated outputs did not
/// shape.
pub fn combined_calibration(
    runs: &[CalibrationRun],
    max_risk: f32,
    confidence: f32,
) -> Result<Calibration, EvalError> {
    let outputs = CalibrationRun::combinable_outputs(runs).ok_or_else(|| {
        EvalError::Calibration(
            "a combined predictor needs every combinable signal in the calibration".into(),
        )
    })?;
    let (x, y): (Vec<Vec<f32>>, Vec<f32>) = outputs.iter().step_by(2).flatten().cloned().unzip();
    let combiner = LogisticCombiner::fit(&x, &y, None).ok_or_else(|| {
        EvalError::Calibration("the combined predictor could not be fitted".into())
    })?;
    let scored: Vec<Vec<Sample>> = outputs
        .iter()
        .skip(1)
        .step_by(2)
        .map(|tokens| {
            tokens
                .iter()
                .map(|(signals, beta)| Sample {
                    u: combiner.score(signals),
                    beta: *beta,
                })
                .collect()
        })
        .collect();
    let kind = UncertaintyKind::Combined {
        signals: UncertaintyKind::combinable(),
        combiner,
    };
    calibration_of(kind, &scored, runs, max_risk, confidence)
}

/// Every threshold of `kind` from its `(u, beta)` per output.
fn calibration_of(
    kind: UncertaintyKind,
    outputs: &[Vec<Sample>],
    runs: &[CalibrationRun],
    max_risk: f32,
    confidence: f32,
) -> Result<Calibration, EvalError> {
    let epsilon = runs.first().map_or(0.1, |r| r.options.target_risk_epsilon);
    let samples: Vec<Sample> = outputs.iter().flatten().copied().collect();
    Ok(Calibration::from_samples(kind, &samples, epsilon)?
        .with_output_quality(outputs, max_risk, confidence)?)
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
    let ids = prompts
        .prompts
        .iter()
        .map(|p| pair.prompt_ids(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut samples = Vec::new();
    let batch = options.batch.max(1);
    for (g, group) in ids.chunks(batch).enumerate() {
        label_prompts(pair, g * batch, group, options, &mut samples, done)?;
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

/// One prompt being labelled.
struct Labelling {
    prompt: usize,
    slm: Session,
    llm: Session,
    estimators: Vec<Box<dyn UncertaintyEstimator>>,
    rng: ChaCha8Rng,
    generated: Vec<u32>,
    labels: Vec<Labelled>,
    /// The next SLM and LLM logits; `None` once the prompt is done.
    logits: Option<(Vec<f32>, Vec<f32>)>,
}

/// Labels every drafted position of `prompts` (indices `first..`) in lock step, calling `done`
/// as each finishes.
fn label_prompts(
    pair: &Pair,
    first: usize,
    prompts: &[Vec<u32>],
    options: &CalibrationOptions,
    out: &mut Vec<Labelled>,
    done: &mut dyn FnMut(usize),
) -> Result<(), EvalError> {
    let sampling = &options.sampling;
    let eos = pair.llm.tokenizer().eos_ids().to_vec();
    let tokenizer = pair.llm.tokenizer();
    let stops: Vec<&str> = sampling
        .stop
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let mut group: Vec<Labelling> = (0..prompts.len())
        .map(|i| {
            // One stream per prompt, so adding prompts does not change earlier ones.
            let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
            rng.set_stream((first + i) as u64);
            Labelling {
                prompt: first + i,
                slm: pair.slm.session(),
                llm: pair.llm.session(),
                estimators: options.estimators.iter().map(|k| k.build()).collect(),
                rng,
                generated: Vec::new(),
                labels: Vec::new(),
                logits: None,
            }
        })
        .collect();
    let prompt_tokens: Vec<Option<&[u32]>> = prompts.iter().map(|p| Some(p.as_slice())).collect();
    step(&mut group, &prompt_tokens)?;
    let (mut q, mut p, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let mut feed: Vec<Option<[u32; 1]>> = vec![None; group.len()];
        for (l, feed) in group.iter_mut().zip(feed.iter_mut()) {
            let Some((q_logits, p_logits)) = l.logits.take() else {
                continue;
            };
            let position = l.labels.len();
            if !probabilities_into(&q_logits, sampling, &mut q, &mut scratch)
                || !probabilities_into(&p_logits, sampling, &mut p, &mut scratch)
            {
                return Err(EvalError::NoUsableLogits(position));
            }
            let draft = sample(&q, &mut l.rng);
            let u = l
                .estimators
                .iter_mut()
                .map(|e| e.estimate(&q_logits, draft))
                .collect();
            let verdict = verify(&p, &q, draft, &mut l.rng)?;
            l.labels.push(Labelled {
                prompt: l.prompt,
                position,
                u,
                beta: verdict.beta,
                tv: verdict.tv_distance,
                accepted: verdict.accepted,
            });
            let token = verdict.token;
            l.generated.push(token);
            // The generation this calibrates stops at a stop string: so do its labels.
            let stopped = !stops.is_empty()
                && tokenizer
                    .decode(&l.generated, true)
                    .is_ok_and(|text| stops.iter().any(|s| text.contains(s)));
            let full = l.slm.len() + 1 >= l.slm.context_length().min(l.llm.context_length());
            if stopped
                || eos.contains(&token)
                || full
                || l.labels.len() >= sampling.max_tokens as usize
            {
                done(l.prompt);
            } else {
                *feed = Some([token]);
            }
        }
        if feed.iter().all(Option::is_none) {
            break;
        }
        let tokens: Vec<Option<&[u32]>> = feed.iter().map(|t| t.as_ref().map(|t| &t[..])).collect();
        step(&mut group, &tokens)?;
    }
    out.extend(group.into_iter().flat_map(|l| l.labels));
    Ok(())
}

/// Appends `tokens[i]` (where given) to both sessions of `group[i]` and keeps their logits: the
/// SLM's batch on a second thread while the LLM's runs here (the models are independent until
/// the verdict).
fn step(group: &mut [Labelling], tokens: &[Option<&[u32]>]) -> Result<(), EvalError> {
    let (mut slm_items, mut llm_items, mut who) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (l, t)) in group.iter_mut().zip(tokens).enumerate() {
        let Some(t) = t else { continue };
        let Labelling { slm, llm, .. } = l;
        slm_items.push(BatchItem {
            session: slm,
            tokens: t,
            outputs: Outputs::Last,
        });
        llm_items.push(BatchItem {
            session: llm,
            tokens: t,
            outputs: Outputs::Last,
        });
        who.push(i);
    }
    let (q, p) = std::thread::scope(|scope| {
        let slm_pass = scope.spawn(|| Session::score_batch(&mut slm_items));
        let p = Session::score_batch(&mut llm_items);
        (slm_pass.join().expect("SLM thread panicked"), p)
    });
    let (q, p) = (q?, p?);
    drop((slm_items, llm_items));
    for ((i, q), p) in who.into_iter().zip(q).zip(p) {
        group[i].logits = Some((q.into_vec(), p.into_vec()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
