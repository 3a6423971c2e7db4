//! Quantized matrix products on the CPU, `y = x · Wᵀ`, computed from the GGUF blocks exactly
//! as loaded.
//!
//! Why not candle's own CPU path: it keeps a second, repacked copy of Q4_K (and, for prefill,
//! Q6_K) tensors beside the original, which took the 1.5B model to 2.5x its file size in RSS,
//! and it has only scalar kernels for Q4_0-style formats other than Q4_0/Q8_0, which the
//! runtime used to answer by widening Q5_0/Q4_1 weights to Q8_0 (+55% memory). Here every
//! weight exists once:
//! - the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) run on AVX2 tile kernels
//!   ([`avx2`]) that unpack each weight block once for a tile of rows, so prefill does not
//!   repeat the work per row;
//! - Q4_K and Q6_K run on AVX2 from an interleaved layout that replaces the GGUF blocks at
//!   load ([`avx2_kquant`]);
//! - the other formats candle has SIMD dot products for (AVX2 or NEON: the remaining
//!   k-quants, and Q4_0/Q8_0 without AVX2) run those block by block over the GGUF layout.
//!
//! Everything else (other devices, other formats, and Q4_1/Q5_0/Q5_1 on CPUs without AVX2)
//! goes to candle's `QMatMul`, as does every weight of a model loaded with
//! [`Kernels::Candle`] (the reference these kernels are tested against).

use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};

use crate::load_options::Kernels;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_kquant;
mod blocks;
#[cfg(target_arch = "x86_64")]
mod dot;

use blocks::blocks;
#[cfg(target_arch = "x86_64")]
use dot::Isa;

/// Which kernel family serves a weight, holding the weight in the form that kernel reads.
#[derive(Debug, Clone)]
enum Kernel {
    /// One of the 32-value block formats, on the AVX2 tile kernels.
    #[cfg(target_arch = "x86_64")]
    Block32(avx2::Format, Arc<QTensor>),
    /// Q4_K or Q6_K interleaved by eight columns, on AVX2 (the GGUF blocks are dropped).
    #[cfg(target_arch = "x86_64")]
    Interleaved(Arc<avx2_kquant::Packed>),
    /// A format candle has SIMD dot products for (AVX2 or NEON), run block by block from
    /// the GGUF layout.
    Blocks(GgmlDType, Arc<QTensor>),
    /// candle's `QMatMul`.
    Candle(QMatMul),
}

/// A quantized weight `(n, k)` ready to multiply `(.., k)` activations.
#[derive(Debug, Clone)]
pub(crate) struct QuantMatmul {
    n: usize,
    k: usize,
    kernel: Kernel,
    /// The instruction set of the x86 kernels: AVX-VNNI where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    isa: Isa,
}

impl QuantMatmul {
    /// Takes `weight`; where it becomes the only holder and the kernel uses its own layout,
    /// the GGUF copy is freed.
    pub fn new(weight: Arc<QTensor>, kernels: Kernels) -> Result<Self> {
        let (n, k) = weight.shape().dims2()?;
        let path = match kernels {
            Kernels::Own => choose_path(&weight),
            Kernels::Candle => Path::Candle,
        };
        let kernel = match path {
            #[cfg(target_arch = "x86_64")]
            Path::Block32(format) => Kernel::Block32(format, weight),
            #[cfg(target_arch = "x86_64")]
            Path::Blocks(dtype)
                if avx2::available()
                    && avx2_kquant::fits(dtype, n, k)
                    && Arc::strong_count(&weight) == 1 =>
            {
                let packed = avx2_kquant::Packed::new(dtype, &weight.data()?, n, k)?;
                Kernel::Interleaved(Arc::new(packed))
            }
            Path::Blocks(dtype) => Kernel::Blocks(dtype, weight),
            Path::Candle => Kernel::Candle(QMatMul::from_arc(weight)?),
        };
        Ok(Self {
            n,
            k,
            kernel,
            #[cfg(target_arch = "x86_64")]
            isa: Isa::detect(),
        })
    }

    /// Whether this CPU multiplies `dtype` weights from their own blocks at SIMD speed, so
    /// that widening them to another format would only cost memory.
    pub fn has_fast_kernel(dtype: GgmlDType, device: &Device) -> bool {
        device.is_cpu() && path_for(dtype) != Path::Candle
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Kernel::Candle(q) = &self.kernel {
            return q.forward(xs);
        }
        if xs.dtype() != candle_core::DType::F32 {
            let ys = self.forward(&xs.to_dtype(candle_core::DType::F32)?)?;
            return ys.to_dtype(xs.dtype());
        }
        let (n, k) = (self.n, self.k);
        let dims = xs.dims();
        let Some((&xk, batch)) = dims.split_last() else {
            candle_core::bail!("matmul input has no dimensions");
        };
        if xk != k {
            candle_core::bail!("matmul input {dims:?} does not match weight ({n}, {k})");
        }
        let m: usize = batch.iter().product();
        let xs = xs.contiguous()?;
        let mut out = vec![0f32; m * n];
        {
            let (storage, layout) = xs.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("a CPU weight needs CPU activations");
            };
            let start = layout.start_offset();
            let x = &cpu.as_slice::<f32>()?[start..start + m * k];
            match &self.kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Block32(format, w) => {
                    avx2::matmul(*format, self.isa, (m, k, n), x, &w.data()?, &mut out)?
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Interleaved(w) => avx2_kquant::matmul(w, self.isa, m, n, x, &mut out),
                Kernel::Blocks(dtype, w) => {
                    blocks_matmul(*dtype, (m, k, n), x, &w.data()?, &mut out)?
                }
                Kernel::Candle(_) => unreachable!("handled above"),
            }
        }
        let mut shape = batch.to_vec();
        shape.push(n);
        Tensor::from_vec(out, shape, &Device::Cpu)
    }
}

/// Which kernel family a weight gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    #[cfg(target_arch = "x86_64")]
    Block32(avx2::Format),
    Blocks(GgmlDType),
    Candle,
}

fn choose_path(weight: &QTensor) -> Path {
    let (_, k) = match weight.shape().dims2() {
        Ok(d) => d,
        Err(_) => return Path::Candle,
    };
    if !weight.device().is_cpu() || !k.is_multiple_of(weight.dtype().block_size()) {
        return Path::Candle;
    }
    path_for(weight.dtype())
}

fn path_for(dtype: GgmlDType) -> Path {
    #[cfg(target_arch = "x86_64")]
    if let Some(format) = avx2::Format::of(dtype).filter(|_| avx2::available()) {
        return Path::Block32(format);
    }
    // Q4_0 and Q8_0 have candle SIMD dot products too (only reached without AVX2): run
    // block by block, candle's own path would keep a repacked second copy on aarch64.
    match dtype {
        GgmlDType::Q4_0
        | GgmlDType::Q8_0
        | GgmlDType::Q2K
        | GgmlDType::Q3K
        | GgmlDType::Q4K
        | GgmlDType::Q5K
        | GgmlDType::Q6K => Path::Blocks(dtype),
        _ => Path::Candle,
    }
}

fn blocks_matmul(
    dtype: GgmlDType,
    mkn: (usize, usize, usize),
    x: &[f32],
    data: &[u8],
    dst: &mut [f32],
) -> Result<()> {
    match dtype {
        GgmlDType::Q4_0 => by_blocks::<BlockQ4_0>(mkn, x, data, dst),
        GgmlDType::Q8_0 => by_blocks::<BlockQ8_0>(mkn, x, data, dst),
        GgmlDType::Q2K => by_blocks::<BlockQ2K>(mkn, x, data, dst),
        GgmlDType::Q3K => by_blocks::<BlockQ3K>(mkn, x, data, dst),
        GgmlDType::Q4K => by_blocks::<BlockQ4K>(mkn, x, data, dst),
        GgmlDType::Q5K => by_blocks::<BlockQ5K>(mkn, x, data, dst),
        GgmlDType::Q6K => by_blocks::<BlockQ6K>(mkn, x, data, dst),
        other => candle_core::bail!("{other:?} has no block-by-block path"),
    }
}

/// Weights times activations quantized to the format's dot-product partner (Q8_0 or Q8_K):
/// candle's per-block SIMD dot products, four output columns per call, columns split across
/// candle's kernel threads. Each output is one dot product whatever the batch.
fn by_blocks<T: GgmlType + Sync>(
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    data: &[u8],
    dst: &mut [f32],
) -> Result<()> {
    let kb = k / T::BLCK_SIZE;
    let w: &[T] = blocks(data, n * kb)?;
    let mut a = vec![T::VecDotType::zeros(); m * kb];
    for (row, blocks) in x.chunks_exact(k).zip(a.chunks_exact_mut(kb)) {
        T::VecDotType::from_float(row, blocks);
    }
    let col = |c: usize| &w[c * kb..(c + 1) * kb];
    let dst_ptr = dst.as_mut_ptr() as usize;
    let quads = n / 4;
    candle_core::utils::barrier_pool().execute_chunked(quads, |range| {
        for q in range {
            let c = q * 4;
            for r in 0..m {
                let ar = &a[r * kb..(r + 1) * kb];
                let (d0, d1, d2, d3) =
                    T::vec_dot_4(k, col(c), col(c + 1), col(c + 2), col(c + 3), ar);
                // SAFETY: each (row, column) is written by exactly one work item.
                unsafe {
                    let p = (dst_ptr as *mut f32).add(r * n + c);
                    *p = d0;
                    *p.add(1) = d1;
                    *p.add(2) = d2;
                    *p.add(3) = d3;
                }
            }
        }
    });
    for c in quads * 4..n {
        for r in 0..m {
            dst[r * n + c] = T::vec_dot(k, col(c), &a[r * kb..(r + 1) * kb]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_vec(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |s, (a, b)| s.max((a - b).abs()))
    }

    /// Weights of every CPU format, multiplied by our path and by candle's: the same
    /// products up to how each rounds the activations' block scales (candle keeps them in
    /// f16, these kernels in f32), far below the error of the weight quantization itself.
    /// Widths cover whole and partial groups of four blocks and of four columns.
    #[test]
    fn every_format_matches_candles_kernel() {
        #[cfg(target_arch = "x86_64")]
        let mut vnni_compared = false;
        for (n, k) in [(40, 512), (37, 576), (5, 256)] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 0.2)
                .collect();
            let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            for dtype in [
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
                GgmlDType::Q5_0,
                GgmlDType::Q5_1,
                GgmlDType::Q8_0,
                GgmlDType::Q2K,
                GgmlDType::Q3K,
                GgmlDType::Q4K,
                GgmlDType::Q5K,
                GgmlDType::Q6K,
            ] {
                if !k.is_multiple_of(dtype.block_size()) {
                    continue;
                }
                let q = || Arc::new(QTensor::quantize(&w, dtype).unwrap());
                let ours = QuantMatmul::new(q(), Kernels::Own).unwrap();
                let theirs = QMatMul::from_arc(q()).unwrap();
                for m in [1usize, 3, 4, 7, 9] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| (i * 104729 % 1013) as f32 / 1013.0 - 0.5)
                        .collect();
                    let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
                    let a = to_vec(ours.forward(&x).unwrap());
                    let b = to_vec(theirs.forward(&x).unwrap());
                    let scale = b.iter().fold(1f32, |s, v| s.max(v.abs()));
                    let worst = max_abs_diff(&a, &b);
                    assert!(
                        worst <= 2e-3 * scale,
                        "{dtype:?} {n}x{k} m={m}: max abs diff {worst} (scale {scale})"
                    );
                    // Each row alone (the decode path) gives exactly its row of the batch
                    // (prefill, verification): results do not depend on batching.
                    for r in 0..m {
                        let alone = to_vec(ours.forward(&x.narrow(0, r, 1).unwrap()).unwrap());
                        assert_eq!(alone, a[r * n..(r + 1) * n], "{dtype:?} m={m} row {r}");
                    }
                    // Nor on the instruction set: AVX2 alone gives what VNNI gives.
                    #[cfg(target_arch = "x86_64")]
                    if ours.isa == Isa::AvxVnni {
                        let avx2 = QuantMatmul {
                            isa: Isa::Avx2,
                            ..ours.clone()
                        };
                        assert_eq!(to_vec(avx2.forward(&x).unwrap()), a, "{dtype:?} m={m}");
                        vnni_compared = true;
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if !vnni_compared {
            // Without AVX-VNNI the kernels run AVX2 alone; the comparison needs such a CPU.
            assert_eq!(
                Isa::detect(),
                Isa::Avx2,
                "a VNNI CPU must have compared the kernels"
            );
            eprintln!("no AVX-VNNI on this CPU: the AVX2 kernels only");
        }
    }
}
