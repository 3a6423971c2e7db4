//! The closed-form evaluation: every system and the threshold sweep scored position by
//! position, each system's skip rate, uplink bytes, agreement with the LLM's greedy token and
//! output distribution under sampling (fidelity, log-likelihood) as expectations, without
//! sampling.

use uhlm_core::codec::{Codec, encode};
use uhlm_core::sampling::{SamplingOptions, probabilities_into};
use uhlm_core::uncertainty::{UncertaintyEstimator, UncertaintyKind};

use super::frame_bytes::{FrameSizes, varint_len, verify_frame_bytes};
use super::report::{ComputeTimes, PaperOptions};
use super::systems::{SystemKind, SystemSpec};
use crate::EvalError;
use crate::channel::ChannelConfig;

/// Tokens per position whose uncertainty is computed (the skip candidates).
pub const RANKED: usize = 32;

/// Sums over positions. Time per token is linear in what is summed here, so it is computed at
/// the end, once the step times are known.
#[derive(Default, Clone)]
pub(super) struct Acc {
    pub(super) skip: f64,
    pub(super) bytes: f64,
    pub(super) agree: f64,
    pub(super) fidelity: f64,
    pub(super) loglik: f64,
    pub(super) exchanges: f64,
    pub(super) server_steps: f64,
    pub(super) downlink: f64,
    pub(super) slm_runs: f64,
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
    pub(super) fn seconds(&self, rate: f64, channel: &ChannelConfig, compute: ComputeTimes) -> f64 {
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

/// The running evaluation: every system and the threshold sweep, position by position.
pub(super) struct Evaluation<'a> {
    systems: &'a [SystemSpec],
    sweep: &'a [f32],
    /// Each hybrid system's estimator (`None` for systems that never estimate).
    estimators: Vec<Option<Box<dyn UncertaintyEstimator>>>,
    sweep_estimator: Box<dyn UncertaintyEstimator>,
    pub(super) accs: Vec<Acc>,
    pub(super) sweep_accs: Vec<Acc>,
    frames: FrameSizes,
    pub(super) positions: usize,
    p: Vec<f32>,
    q: Vec<f32>,
    scratch: Vec<u32>,
}

impl<'a> Evaluation<'a> {
    pub(super) fn new(
        systems: &'a [SystemSpec],
        options: &'a PaperOptions,
    ) -> Result<Self, EvalError> {
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
    pub(super) fn position(
        &mut self,
        z_q: &[f32],
        z_p: &[f32],
        reference: u32,
    ) -> Result<(), EvalError> {
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
    use uhlm_core::sampling::argmax;

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
}
