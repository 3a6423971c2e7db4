//! A load / prefill / decode benchmark of one model, for `uhlm bench model`.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::model::{LoadOptions, Model, Outputs, kernel_threads};
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
    })
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
