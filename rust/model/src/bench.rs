//! A load / prefill / decode benchmark of one model, for `uhlm bench model`.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::ModelError;
use crate::forward_pass::Outputs;
use crate::load_options::LoadOptions;
use crate::model::{Model, kernel_threads};
use crate::session::{BatchItem, Session};

/// Timings of one [`bench_model`] run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub model: String,
    /// Kernel threads actually used (candle's pool is sized once per process).
    pub threads: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub load_ms: f64,
    /// Prompt tokens per second, scored in one forward pass.
    pub prefill_tok_s: f64,
    /// Greedy decode: tokens per second over all sessions of the batch.
    pub decode_tok_s: f64,
    /// Prompt tokens per second of the calling thread's CPU time: what prefill reaches when it
    /// does not compete for cores (exact for one thread, where all kernels run on the caller).
    pub prefill_cpu_tok_s: Option<f64>,
    /// Decode steps per second of the calling thread's CPU time.
    pub decode_cpu_tok_s: Option<f64>,
    /// Peak resident memory of the process (`VmHWM`), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Resident memory before the model was loaded (the program itself: code, runtime,
    /// thread stacks), so that `peak - this` is what the model cost.
    pub rss_before_load_bytes: Option<u64>,
    /// Size of the GGUF file.
    pub file_bytes: u64,
    /// Bytes held by the KV caches at the end of the run.
    pub kv_cache_bytes: u64,
    /// Sessions decoding in lock step, one batched forward pass per step.
    #[serde(default = "one")]
    pub batch: usize,
    /// Where the forward passes ran.
    #[serde(default)]
    pub device: Device,
}

impl BenchReport {
    /// What loading and running the model added to the process's resident memory.
    pub fn model_rss_bytes(&self) -> Option<u64> {
        Some(
            self.peak_rss_bytes?
                .saturating_sub(self.rss_before_load_bytes?),
        )
    }
}

/// Loads `path`, scores a `prompt_tokens`-long prompt in one pass, then decodes
/// `decode_tokens` tokens greedily. The prompt is a fixed synthetic id sequence: speed does not
/// depend on which tokens are fed. With `batch` > 1, that many sessions (each prefilled with its
/// own prompt) decode in lock step, one batched forward pass per step
/// ([`Session::score_batch`]), and the decode rate counts the tokens of all of them.
pub fn bench_model(
    path: &Path,
    threads: Option<usize>,
    device: Device,
    prompt_tokens: usize,
    decode_tokens: usize,
    batch: usize,
) -> Result<BenchReport, ModelError> {
    let rss_before_load_bytes = rss_bytes();
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| ModelError::io(path, e))?
        .len();
    let start = Instant::now();
    let model = Model::load(
        path,
        &LoadOptions {
            threads,
            device,
            ..LoadOptions::default()
        },
    )?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let vocab = model.info().vocab_size;
    let batch = batch.max(1);
    let prompt = |s: usize| -> Vec<u32> {
        (0..prompt_tokens)
            .map(|i| ((i * 7919 + 1009 + s * 104_729) % vocab) as u32)
            .collect()
    };
    let mut sessions: Vec<Session> = (0..batch).map(|_| model.session()).collect();
    let (start, cpu0) = (Instant::now(), thread_cpu_s());
    let logits = sessions[0].score_last(&prompt(0))?;
    let (prefill_s, cpu1) = (start.elapsed().as_secs_f64(), thread_cpu_s());
    let mut next = vec![argmax(&logits)];
    for (s, session) in sessions.iter_mut().enumerate().skip(1) {
        next.push(argmax(&session.score_last(&prompt(s))?));
    }
    let (start, cpu1) = (
        Instant::now(),
        if batch > 1 { thread_cpu_s() } else { cpu1 },
    );
    for _ in 0..decode_tokens {
        if batch == 1 {
            next[0] = argmax(&sessions[0].step(next[0])?);
            continue;
        }
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut items: Vec<BatchItem<'_>> = sessions
            .iter_mut()
            .zip(&tokens)
            .map(|(session, t)| BatchItem {
                session,
                tokens: t,
                outputs: Outputs::Last,
            })
            .collect();
        for (n, logits) in next.iter_mut().zip(Session::score_batch(&mut items)?) {
            *n = argmax(&logits.into_vec());
        }
    }
    let (decode_s, cpu2) = (start.elapsed().as_secs_f64(), thread_cpu_s());
    let decoded = decode_tokens * batch;
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let cpu_rate = |n: usize, a: Option<f64>, b: Option<f64>| Some(rate(n, b? - a?));
    Ok(BenchReport {
        model: model.info().name.clone(),
        threads: kernel_threads(),
        prompt_tokens,
        decode_tokens,
        load_ms,
        prefill_tok_s: rate(prompt_tokens, prefill_s),
        decode_tok_s: rate(decoded, decode_s),
        prefill_cpu_tok_s: cpu_rate(prompt_tokens, cpu0, cpu1),
        decode_cpu_tok_s: cpu_rate(decoded, cpu1, cpu2),
        peak_rss_bytes: peak_rss_bytes(),
        rss_before_load_bytes,
        file_bytes,
        kv_cache_bytes: sessions.iter().map(|s| s.kv_cache_bytes() as u64).sum(),
        batch,
        device,
    })
}

/// How far one model's logits on `device` are from the CPU's, and batched from alone there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceCheck {
    pub device: Device,
    /// Largest |logit difference| over the prompt's rows, `device` against the CPU.
    pub max_abs_diff_vs_cpu: f32,
    /// Rows whose most likely token differs between the two.
    pub argmax_mismatches: usize,
    pub rows: usize,
    /// Largest |logit difference| between sessions scored in one batched pass on `device`
    /// (one of them rolled back first, as after a rejection) and the same sessions alone.
    pub max_abs_diff_batched_vs_alone: f32,
}

/// Scores a synthetic prompt on the CPU and on `device`, then three sessions at different
/// positions batched and alone on `device`: what a server moved to a GPU must still give.
pub fn check_device(
    path: &Path,
    device: Device,
    prompt_tokens: usize,
) -> Result<DeviceCheck, ModelError> {
    let load = |device| {
        Model::load(
            path,
            &LoadOptions {
                device,
                ..LoadOptions::default()
            },
        )
    };
    let (cpu, dev) = (load(Device::Cpu)?, load(device)?);
    let vocab = cpu.info().vocab_size;
    let prompt = |s: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 7919 + 1009 + s * 104_729) % vocab) as u32)
            .collect()
    };
    let tokens = prompt(0, prompt_tokens.max(2));
    let (a, b) = (cpu.session().score(&tokens)?, dev.session().score(&tokens)?);
    let (mut max_abs_diff_vs_cpu, mut argmax_mismatches) = (0f32, 0);
    for i in 0..a.rows() {
        max_abs_diff_vs_cpu = max_abs_diff_vs_cpu.max(max_abs_diff(a.row(i), b.row(i)));
        argmax_mismatches += usize::from(argmax(a.row(i)) != argmax(b.row(i)));
    }
    // Three sessions: a prompt, a longer one rolled back by 3 tokens, a one-token step.
    let texts = [prompt(1, 24), prompt(2, 40), prompt(3, 9)];
    let primed = |i: usize| -> Result<Session, ModelError> {
        let mut s = dev.session();
        match i {
            0 => {}
            1 => {
                s.score(&texts[1])?;
                s.truncate(texts[1].len() - 3);
            }
            _ => {
                s.score(&texts[2][..8])?;
            }
        }
        Ok(s)
    };
    let news: [&[u32]; 3] = [&texts[0], &texts[1][texts[1].len() - 3..], &texts[2][8..]];
    let mut alone = Vec::new();
    for (i, new) in news.iter().enumerate() {
        alone.push(primed(i)?.score(new)?);
    }
    let mut sessions = (0..3).map(primed).collect::<Result<Vec<_>, _>>()?;
    let mut items: Vec<BatchItem<'_>> = sessions
        .iter_mut()
        .zip(news)
        .map(|(session, tokens)| BatchItem {
            session,
            tokens,
            outputs: Outputs::All,
        })
        .collect();
    let mut max_abs_diff_batched_vs_alone = 0f32;
    for (batched, alone) in Session::score_batch(&mut items)?.iter().zip(&alone) {
        for i in 0..alone.rows() {
            let d = max_abs_diff(batched.row(i), alone.row(i));
            max_abs_diff_batched_vs_alone = max_abs_diff_batched_vs_alone.max(d);
        }
    }
    Ok(DeviceCheck {
        device,
        max_abs_diff_vs_cpu,
        argmax_mismatches,
        rows: a.rows(),
        max_abs_diff_batched_vs_alone,
    })
}

/// NaN anywhere counts as infinitely far.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() { f32::INFINITY } else { d }
        })
        .fold(0.0, f32::max)
}

fn one() -> usize {
    1
}

fn argmax(xs: &[f32]) -> u32 {
    uhlm_core::sampling::argmax(xs).unwrap_or(0)
}

/// CPU seconds the calling thread has run (`/proc/thread-self/schedstat`, Linux and Android).
fn thread_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 * 1e-9)
}

/// `VmHWM` from `/proc/self/status` (Linux and Android).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:")
}

/// `VmRSS` from `/proc/self/status` (Linux and Android).
fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:")
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
