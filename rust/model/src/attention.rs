//! Scaled dot-product attention over a layer's KV cache, with grouped-query heads, a causal
//! mask and an optional sliding window.
//!
//! On CPU every query row is computed by the same scalar-order loop whether it arrives alone
//! (decoding) or in a batch (scoring), so incremental decoding reproduces one-pass scoring
//! bit for bit; rows and heads are spread over the kernel threads, each computed whole by one. With candle's batched matmul the summation order depends on the batch shape,
//! and the 8-bit activation quantization of the following quantized matmuls amplifies those
//! last-bit differences into visibly different logits.

use candle_core::{Device, Result, Storage, Tensor};

use crate::kv_cache::KvCache;

/// Static attention parameters of one layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnConfig {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub scale: f64,
    /// Keys further back than this many positions are invisible (gemma3 local layers).
    pub window: Option<usize>,
}

/// Attends `q` `(n_head, seq, head_dim)` (positions `pos0..pos0+seq`) to the cached keys and
/// values of `layer`, which already include the new positions. Returns `(seq, n_head*head_dim)`.
pub(crate) fn attend(
    cfg: &AttnConfig,
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    pos0: usize,
    seq: usize,
    device: &Device,
) -> Result<Tensor> {
    if device.is_cpu() {
        attend_cpu(cfg, q, cache, layer, pos0, seq)
    } else {
        attend_tensor(cfg, q, cache, layer, pos0, seq, device)
    }
}

/// First key position query position `p` may see.
fn first_visible(p: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (p + 1).saturating_sub(w),
        None => 0,
    }
}

fn attend_cpu(
    cfg: &AttnConfig,
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    pos0: usize,
    seq: usize,
) -> Result<Tensor> {
    let hd = cfg.head_dim;
    let n_rep = cfg.n_head / cfg.n_kv_head;
    let q = q.contiguous()?;
    let (kb, vb) = cache.buffers(layer);
    let cap = kb.dim(1)?;
    let (q_s, q_l) = q.storage_and_layout();
    let (k_s, k_l) = kb.storage_and_layout();
    let (v_s, v_l) = vb.storage_and_layout();
    let (Storage::Cpu(q_c), Storage::Cpu(k_c), Storage::Cpu(v_c)) = (&*q_s, &*k_s, &*v_s) else {
        candle_core::bail!("attend_cpu needs CPU tensors")
    };
    let qs = &q_c.as_slice::<f32>()?[q_l.start_offset()..];
    let ks = &k_c.as_slice::<f32>()?[k_l.start_offset()..];
    let vs = &v_c.as_slice::<f32>()?[v_l.start_offset()..];
    let mut out = vec![0f32; seq * cfg.n_head * hd];
    // One work item per (query row, head), each writing its own `head_dim` slice of `out`:
    // items run on candle's kernel threads, and every item's arithmetic is the same
    // sequential loop however they are scheduled, so results stay bit-identical.
    let n_head = cfg.n_head;
    let out_ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(seq * n_head, |items| {
        let mut scores: Vec<f32> = Vec::with_capacity(pos0 + seq);
        for item in items {
            let (i, h) = (item / n_head, item % n_head);
            let kvh = h / n_rep;
            let keys = &ks[kvh * cap * hd..(kvh + 1) * cap * hd];
            let values = &vs[kvh * cap * hd..(kvh + 1) * cap * hd];
            let p = pos0 + i;
            let lo = first_visible(p, cfg.window);
            let qrow = &qs[(h * seq + i) * hd..(h * seq + i + 1) * hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in lo..=p {
                let s = dot(qrow, &keys[j * hd..(j + 1) * hd]) * cfg.scale as f32;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            // SAFETY: item `i * n_head + h` owns `out[item * hd..(item + 1) * hd]`, and each
            // item is handed to exactly one thread once; `out` outlives the call.
            let o =
                unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(item * hd), hd) };
            for (j, &w) in (lo..=p).zip(scores.iter()) {
                let w = w / sum;
                for (o, &v) in o.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                    *o += w * v;
                }
            }
        }
    });
    Tensor::from_vec(out, (seq, cfg.n_head * hd), &Device::Cpu)
}

/// Dot product with eight independent accumulators: vectorizes, and its summation order
/// depends only on the length.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Device-agnostic attention with candle's batched matmuls (used off-CPU).
fn attend_tensor(
    cfg: &AttnConfig,
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    pos0: usize,
    seq: usize,
    device: &Device,
) -> Result<Tensor> {
    let end = pos0 + seq;
    // The first new query sees keys no older than its window; older ones are never read.
    let start = first_visible(pos0, cfg.window);
    let (k, v) = cache.read(layer, start, end)?;
    let kv_len = end - start;
    let n_rep = cfg.n_head / cfg.n_kv_head;
    // Query heads sharing a KV head are adjacent, so grouping them is a free reshape and the
    // keys are never repeated in memory.
    let q = q.reshape((cfg.n_kv_head, n_rep * seq, cfg.head_dim))?;
    let scores = (q.matmul(&k.t()?)? * cfg.scale)?;
    let scores = if seq > 1 {
        let mask = mask(pos0, seq, start, cfg.window, device)?;
        scores
            .reshape((cfg.n_kv_head, n_rep, seq, kv_len))?
            .broadcast_add(&mask)?
            .reshape((cfg.n_kv_head, n_rep * seq, kv_len))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .reshape((cfg.n_head, seq, cfg.head_dim))?
        .transpose(0, 1)?
        .reshape((seq, cfg.n_head * cfg.head_dim))
}

/// Additive mask `(seq, kv_len)`: 0 where query `pos0+i` may see key `start+j`, -inf elsewhere.
fn mask(
    pos0: usize,
    seq: usize,
    start: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let kv_len = pos0 + seq - start;
    let mut m = Vec::with_capacity(seq * kv_len);
    for i in 0..seq {
        let p = pos0 + i;
        for j in 0..kv_len {
            let kp = start + j;
            let visible = kp <= p && window.is_none_or(|w| p - kp < w);
            m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(m, (seq, kv_len), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvShape;

    /// The batched-matmul path is what a GPU runs; no GPU is at hand in the test suite, so it
    /// runs on the CPU here against the CPU's own loop: grouped heads, decoding and scoring
    /// several rows after a cached prefix, with and without a sliding window.
    #[test]
    fn the_gpu_path_attends_as_the_cpu_loop_does() {
        let dev = Device::Cpu;
        let (n_head, n_kv_head, head_dim) = (6, 2, 16);
        let shape = KvShape {
            n_kv_head,
            head_dim,
        };
        let mut state = 12345u64;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect()
        };
        for window in [None, Some(5)] {
            for (pos0, seq) in [(0, 7), (9, 1), (9, 4)] {
                let cfg = AttnConfig {
                    n_head,
                    n_kv_head,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    window,
                };
                let end = pos0 + seq;
                let mut cache = KvCache::new(vec![shape], 64, &dev);
                cache.reserve(end).unwrap();
                let kv = |v: Vec<f32>| Tensor::from_vec(v, (n_kv_head, end, head_dim), &dev);
                let (k, v) = (
                    kv(random(n_kv_head * end * head_dim)).unwrap(),
                    kv(random(n_kv_head * end * head_dim)).unwrap(),
                );
                cache.write(0, 0, &k, &v).unwrap();
                cache.set_len(end);
                let q = Tensor::from_vec(
                    random(n_head * seq * head_dim),
                    (n_head, seq, head_dim),
                    &dev,
                )
                .unwrap();
                let a = attend_cpu(&cfg, &q, &cache, 0, pos0, seq).unwrap();
                let b = attend_tensor(&cfg, &q, &cache, 0, pos0, seq, &dev).unwrap();
                assert_eq!(a.dims(), b.dims());
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(
                    diff < 1e-5,
                    "window {window:?}, pos0 {pos0}, seq {seq}: {diff}"
                );
            }
        }
    }
}
