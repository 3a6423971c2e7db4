//! AVX2 tile kernels for the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
//!
//! Activations are quantized once per call to 8 bits per 32-value block (scale `d`, and
//! `s = d · Σq` for the formats with an offset). A tile kernel then walks the weight blocks
//! of `RN` columns once and multiplies each unpacked block with the matching block of `RM`
//! activation rows, keeping the `RM x RN` partial sums in registers. The 4- and 5-bit formats
//! are unpacked to unsigned bytes, so the integer dot product (`maddubs`, or VNNI's
//! `vpdpbusd`: [`super::dot`]) needs no sign fix-up; their offset (−8·d, −16·d, or the block
//! minimum `m`) multiplies `Σa` once per block.

// Row loops index several per-row register arrays in lock step.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use half::f16;

use super::blocks::blocks;
use super::dot::{Avx2, AvxVnni, Dot, Isa};
use candle_core::Result;
use candle_core::quantized::GgmlDType;

const QK: usize = 32;

/// The weight formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Format {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            _ => return None,
        })
    }
}

pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

// GGUF block layouts (ggml's `block_q4_0` etc.).
#[repr(C)]
struct Q4_0 {
    d: f16,
    qs: [u8; 16],
}
#[repr(C)]
struct Q4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}
#[repr(C)]
struct Q5_0 {
    d: f16,
    qh: [u8; 4],
    qs: [u8; 16],
}
#[repr(C)]
struct Q5_1 {
    d: f16,
    m: f16,
    qh: [u8; 4],
    qs: [u8; 16],
}
#[repr(C)]
struct Q8_0 {
    d: f16,
    qs: [i8; 32],
}

/// One block of activations: `x ≈ d · qs`, and `s = d · Σ qs`.
#[derive(Clone, Copy)]
#[repr(C)]
struct Act {
    qs: [i8; QK],
    d: f32,
    s: f32,
}

/// A weight block as the kernel consumes it.
trait Block: Sync {
    /// Whether the unpacked values are signed (Q8_0), else unsigned bytes.
    const SIGNED: bool;
    /// The 32 values in order, as bytes.
    ///
    /// # Safety
    /// The CPU supports AVX2 (the kernels that call it are compiled for it and chosen only
    /// after detecting it).
    unsafe fn unpack(&self) -> __m256i;
    /// Scale of the integer products.
    fn d(&self) -> f32;
    /// Coefficient of `s` (the activation block's scaled sum): the block's offset.
    fn offset(&self) -> f32;
}

/// f16 to f32 through a fresh register: `half`'s conversion inserts into a live register
/// (`vpinsrw`), which chains every block's scale load onto the previous one.
#[inline(always)]
fn f32_of(h: f16) -> f32 {
    // SAFETY: F16C is part of the level these kernels require (`avx2,fma,f16c`): this
    // private function is called only from `Block` methods, which run only inside the
    // `#[target_feature]` kernels that `matmul` enters after detecting those features.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32))) }
}

/// The 32 nibbles of `qs`, low ones first, one per byte.
///
/// # Safety
/// The CPU supports AVX2.
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: the caller guarantees AVX2; the one load reads the 16 bytes `qs` borrows
    // (unaligned load), the rest is register-only.
    unsafe {
        let bytes = _mm_loadu_si128(qs.as_ptr().cast());
        let low = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
        let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0f));
        _mm256_set_m128i(high, low)
    }
}

/// 0x10 in byte `j` where bit `j` of `qh` is set (ggml's `bytes_from_bits_32`, masked).
///
/// # Safety
/// The CPU supports AVX2.
#[inline(always)]
unsafe fn fifth_bits(qh: &[u8; 4]) -> __m256i {
    // SAFETY: register-only AVX2 intrinsics (`qh` is read as a plain value); the caller
    // guarantees AVX2.
    unsafe {
        let bits = _mm256_set1_epi32(i32::from_le_bytes(*qh));
        let spread = _mm256_shuffle_epi8(
            bits,
            _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0x0000000000000000,
            ),
        );
        let set = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        let mask = _mm256_cmpeq_epi8(set, _mm256_set1_epi64x(-1));
        _mm256_and_si256(mask, _mm256_set1_epi8(0x10))
    }
}

/// `impl Block` for a format: whether its values are signed, how to unpack them, and the
/// offset its values carry (as a function of the block).
macro_rules! block {
    ($ty:ident, signed: $signed:expr, unpack: |$s:ident| $unpack:expr, offset: |$o:ident| $offset:expr) => {
        impl Block for $ty {
            const SIGNED: bool = $signed;
            #[inline(always)]
            unsafe fn unpack(&self) -> __m256i {
                let $s = self;
                // SAFETY: the caller guarantees AVX2 (`Block::unpack`'s contract); the
                // expressions read only the block `self` borrows.
                unsafe { $unpack }
            }
            #[inline(always)]
            fn d(&self) -> f32 {
                f32_of(self.d)
            }
            #[inline(always)]
            fn offset(&self) -> f32 {
                let $o = self;
                $offset
            }
        }
    };
}

block!(Q4_0, signed: false, unpack: |b| nibbles(&b.qs), offset: |b| -8.0 * f32_of(b.d));
block!(Q4_1, signed: false, unpack: |b| nibbles(&b.qs), offset: |b| f32_of(b.m));
block!(Q5_0, signed: false,
    unpack: |b| _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh)),
    offset: |b| -16.0 * f32_of(b.d));
block!(Q5_1, signed: false,
    unpack: |b| _mm256_or_si256(nibbles(&b.qs), fifth_bits(&b.qh)),
    offset: |b| f32_of(b.m));
block!(Q8_0, signed: true, unpack: |b| _mm256_loadu_si256(b.qs.as_ptr().cast()), offset: |_b| 0.0);

/// `dst (m, n) = x (m, k) · Wᵀ` for `W` stored as `n` rows of `k / 32` blocks in `data`, on
/// `isa`'s kernels (the same results on either).
pub(crate) fn matmul(
    format: Format,
    isa: Isa,
    mkn: (usize, usize, usize),
    x: &[f32],
    data: &[u8],
    dst: &mut [f32],
) -> Result<()> {
    let (_, k, n) = mkn;
    let count = n * (k / QK);
    match format {
        Format::Q4_0 => run::<Q4_0>(isa, mkn, x, blocks(data, count)?, dst),
        Format::Q4_1 => run::<Q4_1>(isa, mkn, x, blocks(data, count)?, dst),
        Format::Q5_0 => run::<Q5_0>(isa, mkn, x, blocks(data, count)?, dst),
        Format::Q5_1 => run::<Q5_1>(isa, mkn, x, blocks(data, count)?, dst),
        Format::Q8_0 => run::<Q8_0>(isa, mkn, x, blocks(data, count)?, dst),
    }
    Ok(())
}

/// Activation rows per tile: each weight block is unpacked once for this many rows.
const RM: usize = 4;
/// Columns per unit of work handed to a thread: their weights stay in L1/L2 while every row
/// tile passes over them.
const COLS_PER_ITEM: usize = 8;

fn run<B: Block>(isa: Isa, (m, k, n): (usize, usize, usize), x: &[f32], w: &[B], dst: &mut [f32]) {
    let kb = k / QK;
    let acts = quantize(x, m, k);
    let dst_ptr = dst.as_mut_ptr() as usize;
    let items = n.div_ceil(COLS_PER_ITEM);
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        for item in range {
            let c0 = item * COLS_PER_ITEM;
            let c1 = n.min(c0 + COLS_PER_ITEM);
            let dst = dst_ptr as *mut f32;
            // SAFETY: `isa` was detected before this path was chosen; every (row, column)
            // of dst is written by exactly one work item.
            unsafe {
                match isa {
                    Isa::Avx2 => columns_avx2::<B>(&acts, w, kb, m, n, c0..c1, dst),
                    Isa::AvxVnni => columns_vnni::<B>(&acts, w, kb, m, n, c0..c1, dst),
                }
            }
        }
    });
}

fn quantize(x: &[f32], m: usize, k: usize) -> Vec<Act> {
    let mut out = Vec::with_capacity(m * k / QK);
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(block) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        out.push(Act {
            qs,
            d,
            s: d * sum as f32,
        });
    }
    out
}

/// [`columns`] compiled for one instruction set.
macro_rules! columns_on {
    ($name:ident, $dot:ty, $features:literal) => {
        /// [`columns`] compiled for these features.
        ///
        /// # Safety
        /// The CPU has the features; otherwise as [`columns`].
        #[target_feature(enable = $features)]
        unsafe fn $name<B: Block>(
            acts: &[Act],
            w: &[B],
            kb: usize,
            m: usize,
            n: usize,
            cols: std::ops::Range<usize>,
            dst: *mut f32,
        ) {
            // SAFETY: this function's contract is `columns`' own, and the features are
            // enabled here, which `$dot`'s instructions need.
            unsafe { columns::<$dot, B>(acts, w, kb, m, n, cols, dst) }
        }
    };
}

columns_on!(columns_avx2, Avx2, "avx2,fma,f16c");
columns_on!(columns_vnni, AvxVnni, "avx2,fma,f16c,avxvnni");

/// Columns `cols` of `dst`, tile by tile.
///
/// # Safety
/// The CPU has `D`'s instruction set; `acts` holds `m * kb` blocks and `w` at least
/// `cols.end * kb`; `dst` points to an `m × n` row-major buffer, `cols.end <= n`, and no other
/// thread reads or writes columns `cols` of it during the call.
#[inline(always)]
unsafe fn columns<D: Dot, B: Block>(
    acts: &[Act],
    w: &[B],
    kb: usize,
    m: usize,
    n: usize,
    cols: std::ops::Range<usize>,
    dst: *mut f32,
) {
    for c in cols {
        let col = &w[c * kb..(c + 1) * kb];
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(RM);
            let out = dst.wrapping_add(r * n + c);
            let rows_at = &acts[r * kb..];
            // SAFETY: `rows_at` holds the `rows * kb` blocks of rows `r..r + rows < m`, `col`
            // holds `kb` blocks, and `out` plus `(rows - 1) * n` stays inside column `c` of
            // `dst`, which this call owns (our contract); the ISA is the caller's.
            unsafe {
                match rows {
                    1 => tile::<D, B, 1>(col, rows_at, kb, n, out),
                    2 => tile::<D, B, 2>(col, rows_at, kb, n, out),
                    3 => tile::<D, B, 3>(col, rows_at, kb, n, out),
                    _ => tile::<D, B, RM>(col, rows_at, kb, n, out),
                }
            }
            r += rows;
        }
    }
}

/// One weight column times `R` activation rows (starting at `acts`), written `n` apart from
/// `out`.
///
/// Every output element is computed in the same order whatever `R` is (even and odd blocks
/// in two accumulators, then the odd block out), so a row gives bit-identical logits alone
/// (decode) and in a batch (prefill, verification): with 8-bit activations, a last-bit
/// difference can flip a rounding in the next layer and grow into visible logit changes.
/// Two accumulators also let consecutive blocks' FMAs overlap.
///
/// # Safety
/// The CPU has `D`'s instruction set (AVX2, FMA, F16C at least); `col` holds `kb` blocks,
/// `acts` at least `R * kb`; `out.add(i * n)` for `i < R` is valid for a write that no other
/// thread makes at the same time.
#[inline(always)]
unsafe fn tile<D: Dot, B: Block, const R: usize>(
    col: &[B],
    acts: &[Act],
    kb: usize,
    n: usize,
    out: *mut f32,
) {
    // SAFETY: our contract: `get_unchecked` indices stay below `kb` (`col`) and `R * kb`
    // (`acts`), the loads read within those blocks, the prefetch never faults, and the stores
    // are the `R` writes the caller gave us; the intrinsics need `D`'s ISA, which it has.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let mut offset = [[0f32; R]; 2];
        let row = |i: usize, b: usize| acts.get_unchecked(i * kb + b);
        let step = |b: usize, acc: &mut [__m256; R], offset: &mut [f32; R]| {
            let blk = col.get_unchecked(b);
            // Unsigned magnitudes for the byte products; for Q8_0 the signs move onto the
            // activations.
            let raw = blk.unpack();
            let wv = if B::SIGNED {
                _mm256_sign_epi8(raw, raw)
            } else {
                raw
            };
            let (wd, wo) = (blk.d(), blk.offset());
            for i in 0..R {
                let a = row(i, b);
                let av = _mm256_loadu_si256(a.qs.as_ptr().cast());
                let av = if B::SIGNED {
                    _mm256_sign_epi8(av, raw)
                } else {
                    av
                };
                let dot = D::dot(wv, av);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(wd * a.d), acc[i]);
                if !B::SIGNED {
                    offset[i] += wo * a.s;
                }
            }
        };
        let pairs = kb / 2 * 2;
        let [acc0, acc1] = &mut acc;
        let [off0, off1] = &mut offset;
        let mut b = 0;
        while b < pairs {
            prefetch::<1>(col.as_ptr().add(b).cast());
            step(b, acc0, off0);
            step(b + 1, acc1, off1);
            b += 2;
        }
        let mut sum = [_mm256_setzero_ps(); R];
        let mut off = [0f32; R];
        for i in 0..R {
            sum[i] = _mm256_add_ps(acc0[i], acc1[i]);
            off[i] = off0[i] + off1[i];
        }
        if pairs < kb {
            step(pairs, &mut sum, &mut off);
        }
        for i in 0..R {
            *out.add(i * n) = hsum(sum[i]) + off[i];
        }
    }
}

/// Bytes ahead of the current position to ask the memory for: decode streams every weight
/// once, and on one core the hardware prefetcher alone leaves the loads waiting (measured on
/// the 1.5B model: 14.5 tokens/s without, 19.5 with).
const PREFETCH_AHEAD: usize = 2048;

/// Prefetches `LINES` cache lines starting `PREFETCH_AHEAD` bytes after `p`.
///
/// # Safety
/// The CPU supports SSE (every x86_64 does). `p` may point anywhere: it is never read.
#[inline(always)]
pub(super) unsafe fn prefetch<const LINES: usize>(p: *const u8) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD).cast::<i8>();
    for line in 0..LINES {
        // SAFETY: a prefetch never faults, whatever the address (`wrapping_add` makes no
        // in-bounds claim), and SSE is baseline on x86_64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line)) };
    }
}

/// The sum of the eight lanes of `v`.
///
/// # Safety
/// The CPU supports AVX.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: register-only AVX/SSE3 intrinsics; the caller guarantees AVX (part of AVX2).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}
