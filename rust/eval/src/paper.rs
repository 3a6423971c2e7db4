//! `uhlm bench paper`: the U-HLM and CU-HLM comparisons, computed exactly on real models.
//!
//! Every system is evaluated teacher-forced on the LLM's own greedy continuation of each prompt:
//! at each position we have the SLM's logits `z_q` and the LLM's distribution `p`. From them,
//! without sampling, a system's
//! - decision under greedy decoding (agreement: does it equal the LLM's token),
//! - output distribution `P` under sampling at temperature 1, in closed form:
//!   `P(x) = q_d(x)·[x skipped] + q_d(x)·min(1, p(x)/q_s(x))·[x sent] + R·norm(max(0, p - q_s))(x)`
//!   where `q_d` is what the device samples from, `q_s` what the server sees, and `R` the
//!   probability that a sent draft is rejected (fidelity = `sum min(P, p)`, log-likelihood =
//!   `E_P[ln p]`),
//! - expected skip rate and uplink bytes per token,
//! - expected time per token on the core's fading channel at each SNR, with the SLM and LLM step
//!   times measured on this machine.
//!
//! Skipping is decided by `u(x) < u_th`, each token by its own estimate. `u` is computed for the
//! top [`RANKED`] tokens of the SLM's ranking and the rest are sent: exact for the closed form
//! (its `u` rises down the ranking) whenever `u_th` is below the last ranked token's `u`; for the
//! Monte-Carlo estimator a token further down could draw a low `u` only with negligible
//! probability, since its chance of being sampled at every temperature is tiny.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use crate::channel::{Channel, ChannelConfig};
use uhlm_core::codec::{Codec, encode};
use uhlm_core::protocol::{Draft, Generate, Message, Tokens, Verdict, Verify, encode_frame};
use uhlm_core::sampling::{SamplingOptions, argmax, probabilities_into};
use uhlm_core::uncertainty::{UncertaintyEstimator, UncertaintyKind};

use crate::EvalError;
use crate::calibrate::{CalibrationOptions, CalibrationRun, calibrate};
use crate::measured::{MeasureOptions, MeasuredRun, link_key};
use crate::pair::Pair;
use crate::prompts::PromptSet;

/// Tokens per position whose uncertainty is computed (the skip candidates).
pub const RANKED: usize = 32;

/// How a system decides each token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SystemKind {
    /// The device alone.
    SlmOnly,
    /// The server samples every token; the device only asks (no draft).
    LlmOnly,
    /// Draft on the device, skip when `u < threshold`, otherwise send the draft with `codec`.
    Hybrid {
        estimator: UncertaintyKind,
        threshold: f32,
        codec: Codec,
        /// Whether the device refits the threshold from verdicts while generating (ours). The
        /// exact evaluation holds every threshold fixed; the measured runs honour this.
        #[serde(default)]
        recalibrate: bool,
    },
}

/// One compared system.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SystemSpec {
    pub name: String,
    pub description: String,
    pub kind: SystemKind,
}

/// Parameters of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaperOptions {
    /// Tokens of the LLM's greedy reference per evaluation prompt.
    pub max_tokens: u32,
    /// Calibration on its own prompts (the first `calibration_prompts` of the set).
    pub calibration: CalibrationOptions,
    pub calibration_prompts: usize,
    /// Uplink SNRs of the simulated channel, in dB.
    pub snr_db: Vec<f64>,
    /// Bandwidth, RTT and downlink rate of the simulated channel (its SNR is swept).
    pub channel: ChannelConfig,
    /// Entries CU-HLM keeps; `None`: 2.6% of the vocabulary (the paper's 97.4% compression).
    pub cuhlm_k: Option<u32>,
    /// Thresholds of the skip-rate/fidelity sweep of our system.
    pub sweep: Vec<f32>,
    pub seed: u64,
}

impl Default for PaperOptions {
    fn default() -> Self {
        Self {
            max_tokens: 32,
            calibration: CalibrationOptions::default(),
            calibration_prompts: 16,
            snr_db: vec![-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
            channel: ChannelConfig::default(),
            cuhlm_k: None,
            sweep: (0..=20).map(|i| i as f32 * 0.05).collect(),
            seed: 7,
        }
    }
}

impl PaperOptions {
    /// A few prompts and tokens: checks the harness end to end in seconds.
    pub fn quick() -> Self {
        let mut o = Self {
            max_tokens: 8,
            calibration_prompts: 2,
            snr_db: vec![0.0, 20.0],
            sweep: vec![0.0, 0.5, 1.0],
            ..Self::default()
        };
        o.calibration.sampling.max_tokens = 12;
        o
    }
}

/// Measured per-token compute times on this machine.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ComputeTimes {
    pub slm_step_s: f64,
    pub llm_step_s: f64,
}

/// The metrics of one system (names as the JSON contract).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SystemResult {
    pub name: String,
    pub description: String,
    pub kind: SystemKind,
    pub skip_rate: f64,
    pub uplink_bytes_per_token: f64,
    pub uplink_bytes_per_generation: f64,
    pub agreement: f64,
    pub fidelity: f64,
    pub llm_loglik: f64,
    /// Tokens/s on the simulated channel, keyed `snr_<dB>db`, and measured through the
    /// emulated link, keyed `link_<profile>` (see [`crate::measured`]).
    pub throughput_tokens_per_s: BTreeMap<String, f64>,
    /// Throughput over HLM's under the same condition, keyed like `throughput_tokens_per_s`.
    pub speedup_over_hlm: BTreeMap<String, f64>,
}

impl SystemResult {
    /// What was compared, without its results.
    pub fn spec(&self) -> SystemSpec {
        SystemSpec {
            name: self.name.clone(),
            description: self.description.clone(),
            kind: self.kind.clone(),
        }
    }
}

/// Our system at one threshold of the sweep.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct SweepPoint {
    pub threshold: f32,
    pub skip_rate: f64,
    pub fidelity: f64,
    pub agreement: f64,
}

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaperReport {
    pub prompts: String,
    pub eval_prompts: usize,
    pub positions: usize,
    pub options: PaperOptions,
    pub compute: ComputeTimes,
    pub calibration: CalibrationRun,
    pub systems: Vec<SystemResult>,
    pub sweep: Vec<SweepPoint>,
    /// Every system run for real through each link profile (empty when not measured).
    #[serde(default)]
    pub measured: Vec<MeasuredRun>,
    #[serde(default)]
    pub measure_options: Option<MeasureOptions>,
}

impl PaperReport {
    /// Adds measured runs: their tokens/s join each system's throughput (and speedup) maps.
    pub fn add_measured(&mut self, options: MeasureOptions, runs: Vec<MeasuredRun>) {
        for run in &runs {
            if let Some(s) = self.systems.iter_mut().find(|s| s.name == run.system) {
                s.throughput_tokens_per_s
                    .insert(link_key(&run.profile), run.tokens_per_s);
            }
        }
        fill_speedups(&mut self.systems);
        self.measured = runs;
        self.measure_options = Some(options);
    }

    /// Keys of the throughput maps in reading order: simulated SNRs, then measured profiles.
    pub fn throughput_keys(&self) -> Vec<String> {
        let profiles = self.measure_options.iter().flat_map(|o| &o.profiles);
        self.options
            .snr_db
            .iter()
            .map(|s| snr_key(*s))
            .chain(profiles.map(|p| link_key(p)))
            .collect()
    }
}

/// Each system's throughput over HLM's under the same condition.
fn fill_speedups(results: &mut [SystemResult]) {
    let hlm = results
        .iter()
        .find(|r| r.name == "hlm")
        .map(|r| r.throughput_tokens_per_s.clone())
        .unwrap_or_default();
    for r in results {
        r.speedup_over_hlm = r
            .throughput_tokens_per_s
            .iter()
            .map(|(k, v)| (k.clone(), v / hlm.get(k).copied().unwrap_or(f64::NAN)))
            .collect();
    }
}

/// Sums over positions. Time per token is linear in what is summed here, so it is computed at
/// the end, once the step times are known.
#[derive(Default, Clone)]
struct Acc {
    skip: f64,
    bytes: f64,
    agree: f64,
    fidelity: f64,
    loglik: f64,
    exchanges: f64,
    server_steps: f64,
    downlink: f64,
    slm_runs: f64,
}

impl Acc {
    fn add(&mut self, o: &Outcome) {
        self.skip += o.skip;
        self.bytes += o.bytes;
        self.agree += o.agree;
        self.fidelity += o.fidelity;
        self.loglik += o.loglik;
        self.exchanges += o.exchanges;
        self.server_steps += o.server_steps;
        self.downlink += o.downlink;
        self.slm_runs += o.runs_slm as u8 as f64;
    }

    /// Total expected seconds at uplink rate `rate` (bit/s).
    fn seconds(&self, rate: f64, channel: &ChannelConfig, compute: ComputeTimes) -> f64 {
        self.slm_runs * compute.slm_step_s
            + self.bytes * 8.0 / rate
            + self.downlink * 8.0 / channel.downlink_bps
            + self.exchanges * channel.rtt_s
            + self.server_steps * compute.llm_step_s
    }
}

/// One position's shared data.
struct Position<'a> {
    z_q: &'a [f32],
    q: &'a [f32],
    p: &'a [f32],
    ln_p: &'a [f32],
    /// The LLM's greedy token here (the reference).
    reference: u32,
}

/// Runs calibration, then every system over the evaluation prompts.
pub fn bench_paper(
    pair: &Pair,
    prompts: &PromptSet,
    options: &PaperOptions,
) -> Result<PaperReport, EvalError> {
    let split = options
        .calibration_prompts
        .min(prompts.prompts.len().saturating_sub(1));
    let calibration_set = PromptSet {
        source: format!("first {split} of: {}", prompts.source),
        prompts: prompts.prompts[..split].to_vec(),
    };
    let eval = &prompts.prompts[split..];
    let mut cal_options = options.calibration.clone();
    cal_options.estimators = vec![
        UncertaintyKind::default(),
        UncertaintyKind::paper(options.seed),
    ];
    let calibration = calibrate(pair, &calibration_set, &cal_options)?;
    let ours = calibration.fits[0].calibration.as_ref();
    let paper = calibration.fits[1].calibration.as_ref();
    // No fit (e.g. no spread in a tiny run): skip nothing, the safe choice.
    let our_threshold = ours.map_or(0.0, |c| c.target_risk);
    let paper_threshold = paper.map_or(0.0, |c| (c.risk_averse as f32).max(0.0));
    let vocab = pair.llm.info().vocab_size;
    let cuhlm_k = options
        .cuhlm_k
        .unwrap_or(((vocab as f64 * 0.026).round() as u32).max(1));
    let systems = systems(our_threshold, paper_threshold, cuhlm_k);

    let mut run = Evaluation::new(&systems, options)?;
    let mut compute = TimeAcc::default();
    let eos = pair.llm.tokenizer().eos_ids().to_vec();
    for prompt in eval {
        let ids = pair.prompt_ids(prompt)?;
        let (mut slm, mut llm) = (pair.slm.session(), pair.llm.session());
        let mut z_p = llm.score_last(&ids)?;
        let mut z_q = slm.score_last(&ids)?;
        for _ in 0..options.max_tokens {
            let reference = argmax(&z_p).ok_or(EvalError::NoUsableLogits(run.positions))?;
            run.position(&z_q, &z_p, reference)?;
            if eos.contains(&reference) || llm.len() + 1 >= llm.context_length() {
                break;
            }
            let t = Instant::now();
            z_p = llm.step(reference)?;
            compute.llm += t.elapsed().as_secs_f64();
            let t = Instant::now();
            z_q = slm.step(reference)?;
            compute.slm += t.elapsed().as_secs_f64();
            compute.steps += 1;
        }
    }
    let Evaluation {
        accs,
        sweep_accs,
        positions,
        ..
    } = run;
    let mean_rates = mean_uplink_rates(options);
    let compute_times = compute.mean();
    let n = positions.max(1) as f64;
    let mut results: Vec<SystemResult> = systems
        .iter()
        .zip(&accs)
        .map(|(s, a)| SystemResult {
            name: s.name.clone(),
            description: s.description.clone(),
            kind: s.kind.clone(),
            skip_rate: a.skip / n,
            uplink_bytes_per_token: a.bytes / n,
            uplink_bytes_per_generation: a.bytes / eval.len().max(1) as f64,
            agreement: a.agree / n,
            fidelity: a.fidelity / n,
            llm_loglik: a.loglik / n,
            throughput_tokens_per_s: options
                .snr_db
                .iter()
                .zip(&mean_rates)
                .map(|(snr, rate)| {
                    let t = a.seconds(*rate, &options.channel, compute_times);
                    (snr_key(*snr), if t > 0.0 { n / t } else { 0.0 })
                })
                .collect(),
            speedup_over_hlm: BTreeMap::new(),
        })
        .collect();
    fill_speedups(&mut results);
    Ok(PaperReport {
        prompts: prompts.source.clone(),
        eval_prompts: eval.len(),
        positions,
        options: options.clone(),
        compute: compute_times,
        calibration,
        systems: results,
        measured: Vec::new(),
        measure_options: None,
        sweep: options
            .sweep
            .iter()
            .zip(&sweep_accs)
            .map(|(&threshold, a)| SweepPoint {
                threshold,
                skip_rate: a.skip / n,
                fidelity: a.fidelity / n,
                agreement: a.agree / n,
            })
            .collect(),
    })
}

/// The running evaluation: every system and the threshold sweep, position by position.
struct Evaluation<'a> {
    systems: &'a [SystemSpec],
    sweep: &'a [f32],
    /// Each hybrid system's estimator (`None` for systems that never estimate).
    estimators: Vec<Option<Box<dyn UncertaintyEstimator>>>,
    sweep_estimator: Box<dyn UncertaintyEstimator>,
    accs: Vec<Acc>,
    sweep_accs: Vec<Acc>,
    frames: FrameSizes,
    positions: usize,
    p: Vec<f32>,
    q: Vec<f32>,
    scratch: Vec<u32>,
}

impl<'a> Evaluation<'a> {
    fn new(systems: &'a [SystemSpec], options: &'a PaperOptions) -> Result<Self, EvalError> {
        Ok(Self {
            systems,
            sweep: &options.sweep,
            estimators: systems
                .iter()
                .map(|s| match &s.kind {
                    SystemKind::Hybrid { estimator, .. } => Some(estimator.build()),
                    _ => None,
                })
                .collect(),
            sweep_estimator: UncertaintyKind::default().build(),
            accs: vec![Acc::default(); systems.len()],
            sweep_accs: vec![Acc::default(); options.sweep.len()],
            frames: FrameSizes::new(options.max_tokens)?,
            positions: 0,
            p: Vec::new(),
            q: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Scores every system at one position; the uncertainties of one ranking are shared.
    fn position(&mut self, z_q: &[f32], z_p: &[f32], reference: u32) -> Result<(), EvalError> {
        let temp1 = SamplingOptions {
            temperature: 1.0,
            ..SamplingOptions::default()
        };
        if !probabilities_into(z_q, &temp1, &mut self.q, &mut self.scratch)
            || !probabilities_into(z_p, &temp1, &mut self.p, &mut self.scratch)
        {
            return Err(EvalError::NoUsableLogits(self.positions));
        }
        let ln_p: Vec<f32> = self.p.iter().map(|&x| x.max(1e-30).ln()).collect();
        let pos = Position {
            z_q,
            q: &self.q,
            p: &self.p,
            ln_p: &ln_p,
            reference,
        };
        let ranked = ranking(z_q);
        for (i, system) in self.systems.iter().enumerate() {
            let out = evaluate(
                system,
                &pos,
                &ranked,
                self.estimators[i].as_mut(),
                &self.frames,
            )?;
            self.accs[i].add(&out);
        }
        let u = uncertainties(self.sweep_estimator.as_mut(), z_q, &ranked);
        for (j, &threshold) in self.sweep.iter().enumerate() {
            let kind = SystemKind::Hybrid {
                estimator: UncertaintyKind::default(),
                threshold,
                codec: Codec::default(),
                recalibrate: false,
            };
            let out = hybrid(&kind, &pos, &ranked, &u, &self.frames)?;
            self.sweep_accs[j].add(&out);
        }
        self.positions += 1;
        Ok(())
    }
}

/// `snr_10db`-style keys of the throughput maps.
pub fn snr_key(snr_db: f64) -> String {
    format!("snr_{snr_db}db")
}

/// The compared systems, in the order of the papers' tables.
pub fn systems(our_threshold: f32, paper_threshold: f32, cuhlm_k: u32) -> Vec<SystemSpec> {
    let paper_estimator = UncertaintyKind::paper(7);
    vec![
        SystemSpec {
            name: "slm".into(),
            description: "SLM only, on the device".into(),
            kind: SystemKind::SlmOnly,
        },
        SystemSpec {
            name: "llm".into(),
            description: "LLM only: the server generates and streams every token (one request)"
                .into(),
            kind: SystemKind::LlmOnly,
        },
        SystemSpec {
            name: "hlm".into(),
            description: "HLM: every token verified, dense f32 uplink".into(),
            kind: SystemKind::Hybrid {
                estimator: paper_estimator.clone(),
                threshold: 0.0,
                codec: Codec::DenseF32,
                recalibrate: false,
            },
        },
        SystemSpec {
            name: "u-hlm".into(),
            description: format!(
                "U-HLM as published: Monte-Carlo u (K=20), risk-averse u_th = -b/a = {paper_threshold:.3}, dense f32"
            ),
            kind: SystemKind::Hybrid {
                estimator: paper_estimator.clone(),
                threshold: paper_threshold,
                codec: Codec::DenseF32,
                recalibrate: false,
            },
        },
        SystemSpec {
            name: "cu-hlm".into(),
            description: format!(
                "CU-HLM as published: U-HLM's u and u_th, top-{cuhlm_k} uplink with a uniform tail (not exact)"
            ),
            kind: SystemKind::Hybrid {
                estimator: paper_estimator,
                threshold: paper_threshold,
                codec: Codec::TopKUniformTail { k: cuhlm_k },
                recalibrate: false,
            },
        },
        SystemSpec {
            name: "uhlm".into(),
            description: format!(
                "uhlm: closed-form u, target-risk u_th (eps 0.1) = {our_threshold:.3}, exact {} uplink",
                Codec::default()
            ),
            kind: SystemKind::Hybrid {
                estimator: UncertaintyKind::default(),
                threshold: our_threshold,
                codec: Codec::default(),
                recalibrate: true,
            },
        },
    ]
}

/// Mean Shannon rate of the fading uplink at each SNR (ergodic rate over seeded draws).
fn mean_uplink_rates(options: &PaperOptions) -> Vec<f64> {
    options
        .snr_db
        .iter()
        .map(|&snr_db| {
            let config = ChannelConfig {
                snr_db,
                ..options.channel.clone()
            };
            let mut channel = Channel::new(config.clone(), options.seed);
            const DRAWS: usize = 20_000;
            (0..DRAWS)
                .map(|_| config.uplink_rate_bps(channel.draw_gain()))
                .sum::<f64>()
                / DRAWS as f64
        })
        .collect()
}

#[derive(Default)]
struct TimeAcc {
    slm: f64,
    llm: f64,
    steps: usize,
}

impl TimeAcc {
    fn mean(&self) -> ComputeTimes {
        let n = self.steps.max(1) as f64;
        ComputeTimes {
            slm_step_s: self.slm / n,
            llm_step_s: self.llm / n,
        }
    }
}

/// Sizes of the frames that do not depend on the distribution.
struct FrameSizes {
    /// Remote LLM only: one `Generate` per generation of `tokens_per_generation` tokens.
    generate: f64,
    tokens_per_generation: f64,
    /// A `Tokens` frame carrying one id (the server streams each token as it is sampled).
    streamed_token: f64,
    /// A `Verdict` (the downlink of every verification).
    verdict: f64,
}

impl FrameSizes {
    fn new(tokens_per_generation: u32) -> Result<Self, EvalError> {
        let generate = frame_bytes(&Message::Generate(Generate {
            seq: 1000,
            max_tokens: tokens_per_generation,
        }))?;
        let streamed_token = frame_bytes(&Message::Tokens(Tokens {
            seq: 1000,
            tokens: vec![40_000],
        }))?;
        let verdict = frame_bytes(&Message::Verdict(Verdict {
            seq: 1000,
            token: 40_000,
            accepted: true,
            beta: 0.25,
            tv_distance: 0.25,
            accepted_links: Vec::new(),
            // What a busy server sends; a few bytes more than `None`.
            window: Some(256),
        }))?;
        Ok(Self {
            generate,
            tokens_per_generation: tokens_per_generation.max(1) as f64,
            streamed_token,
            verdict,
        })
    }
}

fn frame_bytes(msg: &Message) -> Result<f64, EvalError> {
    encode_frame(msg, u32::MAX)
        .map(|f| f.len() as f64)
        .map_err(|e| EvalError::Frame(e.to_string()))
}

fn verify_frame_bytes(draft: Option<(u32, Vec<u8>)>) -> Result<f64, EvalError> {
    frame_bytes(&Message::Verify(Verify {
        seq: 1000,
        position: 1000,
        skipped: Vec::new(),
        draft: draft.map(|(token, q)| Draft { token, q }),
        uncertainty: 0.5,
        chain: Vec::new(),
    }))
}

/// Bytes a skipped token adds to the next `Verify` (its id in `skipped`, a postcard varint).
fn varint_len(id: u32) -> f64 {
    (32 - id.max(1).leading_zeros()).div_ceil(7) as f64
}

/// Token ids by descending SLM logit, the first [`RANKED`].
fn ranking(z_q: &[f32]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..z_q.len() as u32)
        .filter(|&i| z_q[i as usize].is_finite())
        .collect();
    let k = RANKED.min(ids.len());
    if k == 0 {
        return ids;
    }
    ids.select_nth_unstable_by(k - 1, |&a, &b| z_q[b as usize].total_cmp(&z_q[a as usize]));
    ids.truncate(k);
    ids.sort_by(|&a, &b| z_q[b as usize].total_cmp(&z_q[a as usize]));
    ids
}

fn uncertainties(est: &mut dyn UncertaintyEstimator, z_q: &[f32], ranked: &[u32]) -> Vec<f32> {
    let mut u = Vec::with_capacity(ranked.len());
    est.estimate_many(z_q, ranked, &mut u);
    u
}

/// What one system does at one position (expectations over its sampling).
struct Outcome {
    skip: f64,
    /// Expected uplink bytes.
    bytes: f64,
    /// Expected round trips waited for (0 to 1).
    exchanges: f64,
    /// Expected forward passes of the LLM the device waits for.
    server_steps: f64,
    /// Whether the device runs its SLM for this token.
    runs_slm: bool,
    agree: f64,
    fidelity: f64,
    loglik: f64,
    downlink: f64,
}

fn evaluate(
    system: &SystemSpec,
    pos: &Position,
    ranked: &[u32],
    estimator: Option<&mut Box<dyn UncertaintyEstimator>>,
    frames: &FrameSizes,
) -> Result<Outcome, EvalError> {
    Ok(match &system.kind {
        SystemKind::SlmOnly => {
            let draft = ranked.first().copied().unwrap_or(0);
            Outcome {
                skip: 1.0,
                bytes: 0.0,
                exchanges: 0.0,
                server_steps: 0.0,
                runs_slm: true,
                agree: (draft == pos.reference) as u8 as f64,
                fidelity: overlap(pos.q, pos.p),
                loglik: expected_ln(pos.q, pos.ln_p),
                downlink: 0.0,
            }
        }
        // The streaming server: one request and one round trip per generation, then a
        // forward pass and a streamed `Tokens` frame per token.
        SystemKind::LlmOnly => Outcome {
            skip: 0.0,
            bytes: frames.generate / frames.tokens_per_generation,
            exchanges: 1.0 / frames.tokens_per_generation,
            server_steps: 1.0,
            runs_slm: false,
            agree: 1.0,
            fidelity: 1.0,
            loglik: expected_ln(pos.p, pos.ln_p),
            downlink: frames.streamed_token,
        },
        SystemKind::Hybrid { threshold, .. } => {
            let u = match estimator {
                Some(est) if *threshold > 0.0 => uncertainties(est.as_mut(), pos.z_q, ranked),
                _ => Vec::new(),
            };
            hybrid(&system.kind, pos, ranked, &u, frames)?
        }
    })
}

/// A hybrid system at one position, given the uncertainties `u` of the `ranked` tokens
/// (empty when nothing can be skipped).
fn hybrid(
    kind: &SystemKind,
    pos: &Position,
    ranked: &[u32],
    u: &[f32],
    frames: &FrameSizes,
) -> Result<Outcome, EvalError> {
    let SystemKind::Hybrid {
        threshold, codec, ..
    } = kind
    else {
        unreachable!("hybrid() is only called for hybrid systems");
    };
    let encoded = encode(codec, pos.q).map_err(|e| EvalError::Frame(e.to_string()))?;
    let server_q = &encoded.q_prime;
    // Exact codecs make the device draft from what it sends; CU-HLM drafts from the full q.
    let device_q: &[f32] = if codec.is_exact() { server_q } else { pos.q };
    // Skipped: every ranked token whose own estimate is below the threshold. (For the
    // Monte-Carlo estimator these need not be a prefix of the ranking.)
    let skipped: Vec<u32> = ranked
        .iter()
        .zip(u)
        .filter(|(_, u)| **u < *threshold)
        .map(|(&id, _)| id)
        .collect();
    let is_skipped = |x: usize| skipped.contains(&(x as u32));

    let mut out_p = vec![0.0f64; pos.p.len()];
    let mut reject = 0.0f64;
    let mut skip = 0.0f64;
    for x in 0..pos.p.len() {
        let qd = device_q[x] as f64;
        if qd == 0.0 {
            continue;
        }
        if is_skipped(x) {
            out_p[x] += qd;
            skip += qd;
        } else {
            let qs = server_q[x] as f64;
            let keep = if qs > 0.0 {
                (pos.p[x] as f64 / qs).min(1.0)
            } else {
                0.0
            };
            out_p[x] += qd * keep;
            reject += qd * (1.0 - keep);
        }
    }
    let residual: f64 = pos
        .p
        .iter()
        .zip(server_q)
        .map(|(&p, &qs)| (p as f64 - qs as f64).max(0.0))
        .sum();
    if reject > 0.0 && residual > 0.0 {
        for (x, o) in out_p.iter_mut().enumerate() {
            let r = (pos.p[x] as f64 - server_q[x] as f64).max(0.0);
            *o += reject * r / residual;
        }
    }
    let fidelity: f64 = out_p
        .iter()
        .zip(pos.p)
        .map(|(&a, &b)| a.min(b as f64))
        .sum();
    let loglik: f64 = out_p
        .iter()
        .zip(pos.ln_p)
        .map(|(&a, &l)| a * l as f64)
        .sum();
    // Greedy: the device's top draft is kept if skipped, otherwise the server decides, and
    // a greedy server's decision is its own argmax (the reference).
    let draft = ranked.first().copied().unwrap_or(0);
    let agree = if is_skipped(draft as usize) {
        (draft == pos.reference) as u8 as f64
    } else {
        1.0
    };
    let send = 1.0 - skip;
    let frame = verify_frame_bytes(Some((draft, encoded.bytes)))?;
    Ok(Outcome {
        skip,
        bytes: send * frame + skip * varint_len(draft),
        exchanges: send,
        server_steps: send,
        runs_slm: true,
        agree,
        fidelity: fidelity.min(1.0),
        loglik,
        downlink: send * frames.verdict,
    })
}

fn overlap(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.min(y) as f64).sum()
}

fn expected_ln(dist: &[f32], ln_p: &[f32]) -> f64 {
    dist.iter()
        .zip(ln_p)
        .map(|(&d, &l)| d as f64 * l as f64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(z: &[f32]) -> Vec<f32> {
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    fn position<'a>(z_q: &'a [f32], q: &'a [f32], p: &'a [f32], ln_p: &'a [f32]) -> Position<'a> {
        Position {
            z_q,
            q,
            p,
            ln_p,
            reference: argmax(p).unwrap(),
        }
    }

    /// One position where the SLM and the LLM disagree on the top token.
    struct Fixture {
        z_q: [f32; 6],
        q: Vec<f32>,
        p: Vec<f32>,
        ln_p: Vec<f32>,
    }

    impl Fixture {
        fn new() -> Self {
            let z_q = [2.0f32, 1.0, 0.5, -1.0, 0.0, 3.0];
            let p = softmax(&[0.0f32, 2.5, 0.5, 1.0, -2.0, 1.0]);
            Self {
                z_q,
                q: softmax(&z_q),
                ln_p: p.iter().map(|x| x.ln()).collect(),
                p,
            }
        }
    }

    #[test]
    fn exact_hybrid_without_skipping_reproduces_the_llm() {
        let f = Fixture::new();
        let (z_q, q, p, ln_p) = (&f.z_q[..], &f.q[..], &f.p[..], &f.ln_p[..]);
        let pos = position(z_q, q, p, ln_p);
        let frames = FrameSizes::new(32).unwrap();
        for codec in ["dense-f32", "topk:2", "topp:0.5"] {
            let kind = SystemKind::Hybrid {
                estimator: UncertaintyKind::default(),
                threshold: 0.0,
                codec: codec.parse().unwrap(),
                recalibrate: false,
            };
            let out = hybrid(&kind, &pos, &ranking(z_q), &[], &frames).unwrap();
            assert!(
                (out.fidelity - 1.0).abs() < 1e-5,
                "{codec}: {}",
                out.fidelity
            );
            assert_eq!(out.skip, 0.0);
            assert_eq!(out.agree, 1.0);
            assert!((out.loglik - expected_ln(p, ln_p)).abs() < 1e-5);
        }
        // The uniform tail is not exact: CU-HLM loses fidelity on the same position.
        let kind = SystemKind::Hybrid {
            estimator: UncertaintyKind::default(),
            threshold: 0.0,
            codec: Codec::TopKUniformTail { k: 1 },
            recalibrate: false,
        };
        let out = hybrid(&kind, &pos, &ranking(z_q), &[], &frames).unwrap();
        assert!(out.fidelity < 0.999, "{}", out.fidelity);
    }

    #[test]
    fn skipping_everything_is_the_slm_and_a_prefix_is_skipped() {
        let f = Fixture::new();
        let (z_q, q, p, ln_p) = (&f.z_q[..], &f.q[..], &f.p[..], &f.ln_p[..]);
        let pos = position(z_q, q, p, ln_p);
        let frames = FrameSizes::new(32).unwrap();
        let ranked = ranking(z_q);
        assert_eq!(ranked[..2], [5, 0]);
        let mut est = UncertaintyKind::default().build();
        let u = uncertainties(est.as_mut(), z_q, &ranked);
        assert!(
            u.windows(2).all(|w| w[0] <= w[1]),
            "u rises down the ranking: {u:?}"
        );
        let all = SystemKind::Hybrid {
            estimator: UncertaintyKind::default(),
            threshold: 1.1,
            codec: Codec::DenseF32,
            recalibrate: false,
        };
        let out = hybrid(&all, &pos, &ranked, &u, &frames).unwrap();
        assert!((out.skip - 1.0).abs() < 1e-6);
        assert!((out.fidelity - overlap(q, p)).abs() < 1e-5);
        assert_eq!(out.agree, 0.0, "the SLM's top token is not the LLM's");
        // Between the first and second u: only the top token is skipped.
        let one = SystemKind::Hybrid {
            estimator: UncertaintyKind::default(),
            threshold: (u[0] + u[1]) / 2.0,
            codec: Codec::DenseF32,
            recalibrate: false,
        };
        let out = hybrid(&one, &pos, &ranked, &u, &frames).unwrap();
        assert!((out.skip - q[5] as f64).abs() < 1e-6);
        assert!(out.bytes > 0.0 && out.exchanges < 1.0);
    }

    #[test]
    fn each_token_is_judged_by_its_own_estimate() {
        // A Monte-Carlo draw can rank the second token as more certain than the first: it is
        // skipped on its own, while the first is sent.
        let f = Fixture::new();
        let (z_q, q, p, ln_p) = (&f.z_q[..], &f.q[..], &f.p[..], &f.ln_p[..]);
        let pos = position(z_q, q, p, ln_p);
        let frames = FrameSizes::new(32).unwrap();
        let ranked = ranking(z_q);
        let mut u = vec![0.9f32; ranked.len()];
        u[0] = 0.5;
        u[1] = 0.1;
        let kind = SystemKind::Hybrid {
            estimator: UncertaintyKind::paper(7),
            threshold: 0.3,
            codec: Codec::DenseF32,
            recalibrate: false,
        };
        let out = hybrid(&kind, &pos, &ranked, &u, &frames).unwrap();
        assert!((out.skip - q[ranked[1] as usize] as f64).abs() < 1e-6);
        assert_eq!(
            out.agree, 1.0,
            "the top draft is sent, so the server decides it"
        );
    }

    #[test]
    fn varints_and_keys() {
        assert_eq!(varint_len(1), 1.0);
        assert_eq!(varint_len(127), 1.0);
        assert_eq!(varint_len(128), 2.0);
        assert_eq!(varint_len(49_151), 3.0);
        assert_eq!(snr_key(-5.0), "snr_-5db");
    }
}
