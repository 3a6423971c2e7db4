//! Q4_K and Q6_K weights on AVX2, eight output columns at a time.
//!
//! At load the GGUF blocks of every eight consecutive weight rows are interleaved into one
//! block per 256-value super-block (and the originals dropped), with the packed 6-bit scales
//! unpacked to bytes: Q4_K takes 1,184 bytes where the file has 1,152 (+2.8%), Q6_K 1,696
//! for 1,680 (+1%). One 32-byte load then holds four consecutive values of all eight columns,
//! so one byte product instruction (`maddubs`, or VNNI's `vpdpbusd`: [`super::dot`]) against
//! four broadcast activation bytes advances eight dot products,
//! and the per-super-block work (scales, mins, the float multiply) is shared by eight columns
//! instead of repeated per column. llama.cpp's CPU backend repacks Q4_K the same way; these
//! layouts are ours.
//!
//! Values are unpacked as unsigned bytes (Q4_K 0..15, Q6_K 0..63); Q4_K's mins and Q6_K's
//! offset of 32 multiply per-sub-block sums of the activations instead.

// Row loops index several per-row register arrays in lock step.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use half::f16;

use candle_core::Result;
use candle_core::quantized::GgmlDType;

use super::avx2::prefetch;
use super::blocks::blocks;
use super::dot::{Avx2, AvxVnni, Dot, Isa};

const QK_K: usize = 256;

/// ggml's `block_q4_K`.
#[repr(C)]
struct Q4K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}

/// ggml's `block_q6_K`.
#[repr(C)]
struct Q6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [i8; QK_K / 16],
    d: f16,
}

/// One Q4_K super-block of eight interleaved columns.
#[repr(C)]
pub(crate) struct Q4Kx8 {
    d: [f16; 8],
    dmin: [f16; 8],
    /// `[sub-block of 32][column]`.
    scales: [[u8; 8]; 8],
    /// `[pair of sub-blocks p][2 · column + t]`: the min of sub-block `2p + t`.
    mins: [[u8; 16]; 4],
    /// `[sub-block][group of 8 values]`: byte `4c + j` holds value `8g + j` of column `c`
    /// in its low nibble and value `8g + 4 + j` in its high nibble.
    qs: [[[u8; 32]; 4]; 8],
}

/// One Q6_K super-block of eight interleaved columns.
#[repr(C)]
pub(crate) struct Q6Kx8 {
    d: [f16; 8],
    /// `[sub-block of 16][column]`.
    scales: [[i8; 8]; 16],
    /// `[pair of sub-blocks p][2 · column + t]`: the scale of sub-block `2p + t`.
    scale_pairs: [[i8; 16]; 8],
    /// The values, by sub-block of 16: one contiguous stream for the kernel.
    subs: [Q6Sub; 16],
}

/// The values of one Q6_K sub-block of eight interleaved columns.
#[repr(C)]
struct Q6Sub {
    /// Low four bits, `[group of 8 values]`, laid out as Q4_K's `qs`.
    ql: [[u8; 32]; 2],
    /// High two bits: byte `4c + j` holds those of values `j`, `4 + j`, `8 + j`, `12 + j`
    /// of column `c` at bits 0, 2, 4, 6.
    qh: [u8; 32],
}

/// A k-quant weight `(n, k)` interleaved by eight columns, `n` a multiple of 8.
pub(crate) enum Packed {
    Q4K(Vec<Q4Kx8>, usize),
    Q6K(Vec<Q6Kx8>, usize),
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Packed::Q4K(b, kb) => write!(f, "Q4Kx8({} blocks, k {})", b.len(), kb * QK_K),
            Packed::Q6K(b, kb) => write!(f, "Q6Kx8({} blocks, k {})", b.len(), kb * QK_K),
        }
    }
}

/// Whether a `(n, k)` weight of `dtype` can be packed.
pub(crate) fn fits(dtype: GgmlDType, n: usize, k: usize) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K)
        && n.is_multiple_of(8)
        && k.is_multiple_of(QK_K)
        && k > 0
}

/// ggml's `get_scale_min_k4`.
fn scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The low-nibble layout shared by both formats: for `g` groups of 8 values starting at
/// value `v0`, byte `4c + j` of group `g` = `value(c, v0 + 8g + j) | value(c, v0 + 8g + 4 + j) << 4`.
fn interleave_nibbles<const G: usize>(
    value: impl Fn(usize, usize) -> u8,
    v0: usize,
) -> [[u8; 32]; G] {
    let mut out = [[0u8; 32]; G];
    for (g, group) in out.iter_mut().enumerate() {
        for c in 0..8 {
            for j in 0..4 {
                let i = v0 + g * 8 + j;
                group[4 * c + j] = (value(c, i) & 0xf) | ((value(c, i + 4) & 0xf) << 4);
            }
        }
    }
    out
}

impl Packed {
    /// Interleaves the GGUF blocks in `data` (`n` rows of `k / 256` blocks).
    pub fn new(dtype: GgmlDType, data: &[u8], n: usize, k: usize) -> Result<Self> {
        let kb = k / QK_K;
        match dtype {
            GgmlDType::Q4K => {
                let src: &[Q4K] = blocks(data, n * kb)?;
                Ok(Packed::Q4K(by_eight(src, n, kb, pack_q4k), kb))
            }
            GgmlDType::Q6K => {
                let src: &[Q6K] = blocks(data, n * kb)?;
                Ok(Packed::Q6K(by_eight(src, n, kb, pack_q6k), kb))
            }
            other => candle_core::bail!("{other:?} has no interleaved layout"),
        }
    }
}

/// One packed block per super-block `b` of every eight consecutive rows (`group`), in the
/// order the kernels walk them: `[group][b]`. `pack` gets the eight rows' blocks.
fn by_eight<S, P>(src: &[S], n: usize, kb: usize, pack: impl Fn([&S; 8]) -> P) -> Vec<P> {
    let mut out = Vec::with_capacity(n / 8 * kb);
    for group in 0..n / 8 {
        for b in 0..kb {
            out.push(pack(std::array::from_fn(|c| {
                &src[(group * 8 + c) * kb + b]
            })));
        }
    }
    out
}

fn pack_q4k(col: [&Q4K; 8]) -> Q4Kx8 {
    // Value i: chunk i / 64 holds 64 values as the low (first 32) and high (next 32) nibbles
    // of 32 bytes.
    let value = |c: usize, i: usize| {
        let byte = col[c].qs[(i / 64) * 32 + i % 32];
        if i % 64 < 32 { byte & 0xf } else { byte >> 4 }
    };
    let mut p = Q4Kx8 {
        d: std::array::from_fn(|c| col[c].d),
        dmin: std::array::from_fn(|c| col[c].dmin),
        scales: [[0; 8]; 8],
        mins: [[0; 16]; 4],
        qs: std::array::from_fn(|s| interleave_nibbles::<4>(value, s * 32)),
    };
    for (c, blk) in col.iter().enumerate() {
        for s in 0..8 {
            let (sc, m) = scale_min(s, &blk.scales);
            p.scales[s][c] = sc;
            p.mins[s / 2][2 * c + s % 2] = m;
        }
    }
    p
}

fn pack_q6k(col: [&Q6K; 8]) -> Q6Kx8 {
    // ggml's dequantize_row_q6_K: value 128h + 32q + l.
    let value = |c: usize, i: usize| {
        let blk = col[c];
        let (h, q, l) = (i / 128, (i % 128) / 32, i % 32);
        let ql = blk.ql[64 * h + l + 32 * (q % 2)];
        let low = if q < 2 { ql & 0xf } else { ql >> 4 };
        let high = (blk.qh[32 * h + l] >> (2 * q)) & 3;
        low | (high << 4)
    };
    let high_bits = |s: usize| -> [u8; 32] {
        std::array::from_fn(|x| {
            let (c, j) = (x / 4, x % 4);
            (0..4).fold(0u8, |byte, t| {
                byte | ((value(c, s * 16 + 4 * t + j) >> 4) << (2 * t))
            })
        })
    };
    let scale = |c: usize, s: usize| col[c].scales[s];
    Q6Kx8 {
        d: std::array::from_fn(|c| col[c].d),
        scales: std::array::from_fn(|s| std::array::from_fn(|c| scale(c, s))),
        scale_pairs: std::array::from_fn(|p| std::array::from_fn(|x| scale(x / 2, 2 * p + x % 2))),
        subs: std::array::from_fn(|s| Q6Sub {
            ql: interleave_nibbles::<2>(value, s * 16),
            qh: high_bits(s),
        }),
    }
}

/// Activations of one row and super-block, quantized to 8 bits: `x ≈ d · qs`, with the sums
/// of each 16- and 32-value sub-block.
#[derive(Clone, Copy)]
#[repr(C)]
struct Act {
    qs: [i8; QK_K],
    sums16: [i16; 16],
    sums32: [i16; 8],
    d: f32,
}

fn quantize(x: &[f32]) -> Vec<Act> {
    x.chunks_exact(QK_K)
        .map(|block| {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; QK_K];
            for (q, v) in qs.iter_mut().zip(block) {
                *q = (v * id).round() as i8;
            }
            let sum = |s: &[i8]| s.iter().map(|&q| q as i16).sum::<i16>();
            let sums16 = std::array::from_fn(|s| sum(&qs[16 * s..16 * s + 16]));
            let sums32 = std::array::from_fn(|s| sum(&qs[32 * s..32 * s + 32]));
            Act {
                qs,
                sums16,
                sums32,
                d,
            }
        })
        .collect()
}

/// Activation rows per tile.
const RM: usize = 4;

/// `dst (m, n) = x (m, k) · Wᵀ`, on `isa`'s kernels (the same results on either).
pub(crate) fn matmul(w: &Packed, isa: Isa, m: usize, n: usize, x: &[f32], dst: &mut [f32]) {
    let acts = quantize(x);
    match (w, isa) {
        (Packed::Q4K(blocks, kb), Isa::Avx2) => run(blocks, *kb, m, n, &acts, dst, q4k_tiles()),
        (Packed::Q4K(blocks, kb), Isa::AvxVnni) => {
            run(blocks, *kb, m, n, &acts, dst, q4k_vnni_tiles())
        }
        (Packed::Q6K(blocks, kb), Isa::Avx2) => run(blocks, *kb, m, n, &acts, dst, q6k_tiles()),
        (Packed::Q6K(blocks, kb), Isa::AvxVnni) => {
            run(blocks, *kb, m, n, &acts, dst, q6k_vnni_tiles())
        }
    }
}

/// A tile function; its contract is [`q4k`]'s (and the tile's features on the CPU).
type Tile<B> = unsafe fn(&[B], &[Act], usize, usize, *mut f32);

/// A kernel's tiles for 1 to [`RM`] rows.
type Tiles<B> = [Tile<B>; RM];

fn run<B: Sync>(
    blocks: &[B],
    kb: usize,
    m: usize,
    n: usize,
    acts: &[Act],
    dst: &mut [f32],
    tiles: Tiles<B>,
) {
    let dst_ptr = dst.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n / 8, |range| {
        for group in range {
            let col = &blocks[group * kb..(group + 1) * kb];
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(RM);
                let out = (dst_ptr as *mut f32).wrapping_add(r * n + group * 8);
                let a = &acts[r * kb..];
                // SAFETY: the tiles' instruction set was detected before this path was
                // chosen; `col` holds `kb` blocks and `a` the `rows * kb` of rows
                // `r..r + rows <= m`; each (row, 8-column group) of `dst` (`m × n`, `n` a
                // multiple of 8) is written by exactly one work item.
                unsafe { tiles[rows - 1](col, a, kb, n, out) };
                r += rows;
            }
        }
    });
}

/// The tile functions of one kernel: the generic body compiled for one instruction set.
macro_rules! tiles {
    ($name:ident, $tiles:ident, $body:ident, $block:ty, $dot:ty, $features:literal) => {
        /// The kernel body compiled for these features.
        ///
        /// # Safety
        /// The CPU has the features; otherwise as the body ([`q4k`]).
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(
            col: &[$block],
            acts: &[Act],
            kb: usize,
            n: usize,
            out: *mut f32,
        ) {
            // SAFETY: this function's contract is the body's own, and the features are
            // enabled here, which `$dot`'s instructions need.
            unsafe { $body::<$dot, R>(col, acts, kb, n, out) }
        }

        fn $tiles() -> Tiles<$block> {
            [$name::<1>, $name::<2>, $name::<3>, $name::<RM>]
        }
    };
}

tiles!(tile_q4k, q4k_tiles, q4k, Q4Kx8, Avx2, "avx2,fma,f16c");
tiles!(
    tile_q4k_vnni,
    q4k_vnni_tiles,
    q4k,
    Q4Kx8,
    AvxVnni,
    "avx2,fma,f16c,avxvnni"
);
tiles!(tile_q6k, q6k_tiles, q6k, Q6Kx8, Avx2, "avx2,fma,f16c");
tiles!(
    tile_q6k_vnni,
    q6k_vnni_tiles,
    q6k,
    Q6Kx8,
    AvxVnni,
    "avx2,fma,f16c,avxvnni"
);

/// Four activation bytes, broadcast.
///
/// # Safety
/// The CPU supports AVX; `a` is valid for reading 4 bytes (no alignment needed).
#[inline(always)]
unsafe fn four(a: *const i8) -> __m256i {
    // SAFETY: our contract: 4 readable bytes, read unaligned; AVX for the broadcast.
    unsafe { _mm256_set1_epi32(a.cast::<i32>().read_unaligned()) }
}

/// Two i16 sums as one broadcast i32 (lanes `2c`, `2c + 1` of a `madd`).
///
/// # Safety
/// The CPU supports AVX, and `2 * p + 1 < sums.len()` (not checked).
#[inline(always)]
unsafe fn two(sums: &[i16], p: usize) -> __m256i {
    // SAFETY: our contract keeps the two i16 read, unaligned, inside `sums`; AVX for the
    // broadcast.
    unsafe { _mm256_set1_epi32(sums.as_ptr().add(2 * p).cast::<i32>().read_unaligned()) }
}

/// Eight Q4_K columns times `R` activation rows; row `i` goes to `out + i * n`. Each row's
/// arithmetic is the same for every `R`, so results do not depend on batching.
///
/// # Safety
/// The CPU has `D`'s instruction set (AVX2, FMA, F16C at least); `col` holds `kb` blocks and
/// `acts` at least `R * kb`; `out.add(i * n)..+8` for `i < R` is valid for writes that no
/// other thread makes at the same time.
#[inline(always)]
unsafe fn q4k<D: Dot, const R: usize>(
    col: &[Q4Kx8],
    acts: &[Act],
    kb: usize,
    n: usize,
    out: *mut f32,
) {
    // SAFETY: our contract: `get_unchecked(i * kb + b)` stays below `R * kb`; the loads read
    // inside the borrowed blocks (each activation block's 256 bytes and its sums, each weight
    // block's arrays); the prefetches never fault; the stores are the `R` 8-float writes the
    // caller gave us; the intrinsics need `D`'s ISA, which it has.
    unsafe {
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [_mm256_setzero_ps(); R];
        for (b, blk) in col.iter().enumerate() {
            let row = |i: usize| acts.get_unchecked(i * kb + b);
            let mut sumi = [_mm256_setzero_si256(); R];
            for s in 0..8 {
                let scales = D::scales_u8(blk.scales[s].as_ptr());
                // Two chains of partial sums per row (low and high nibbles), so that VNNI's
                // accumulating products (5 cycles each) overlap.
                let mut p = [[_mm256_setzero_si256(); R]; 2];
                prefetch::<2>(blk.qs[s].as_ptr().cast());
                for g in 0..4 {
                    let v = _mm256_loadu_si256(blk.qs[s][g].as_ptr().cast());
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    for i in 0..R {
                        let a = row(i).qs.as_ptr().add(s * 32 + g * 8);
                        p[0][i] = D::acc(p[0][i], lo, four(a));
                        p[1][i] = D::acc(p[1][i], hi, four(a.add(4)));
                    }
                }
                for i in 0..R {
                    // In i16 lanes, each addition is two products of at most 15 · 127; eight
                    // of them stay below i16::MAX.
                    let p = D::merge(p[0][i], p[1][i]);
                    sumi[i] = _mm256_add_epi32(sumi[i], D::scale(p, scales));
                }
            }
            let mins: [__m256i; 4] = std::array::from_fn(|p| {
                _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.mins[p].as_ptr().cast()))
            });
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr().cast()));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.dmin.as_ptr().cast()));
            for i in 0..R {
                let a = row(i);
                let mut m = _mm256_setzero_si256();
                for (p, mins) in mins.iter().enumerate() {
                    m = _mm256_add_epi32(m, _mm256_madd_epi16(*mins, two(&a.sums32, p)));
                }
                let da = _mm256_set1_ps(a.d);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), _mm256_mul_ps(d, da), acc[i]);
                acc_min[i] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, da), acc_min[i]);
            }
        }
        for i in 0..R {
            _mm256_storeu_ps(out.add(i * n), _mm256_sub_ps(acc[i], acc_min[i]));
        }
    }
}

/// Eight Q6_K columns times `R` activation rows, as [`q4k`].
///
/// # Safety
/// As [`q4k`].
#[inline(always)]
unsafe fn q6k<D: Dot, const R: usize>(
    col: &[Q6Kx8],
    acts: &[Act],
    kb: usize,
    n: usize,
    out: *mut f32,
) {
    // SAFETY: as in `q4k`: indices below `R * kb`, loads inside the borrowed blocks,
    // prefetches that never fault, the caller's `R` 8-float writes, and `D`'s ISA present.
    unsafe {
        let low = _mm256_set1_epi8(0x0f);
        let high = _mm256_set1_epi8(0x30);
        let zero = _mm256_setzero_si256();
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, blk) in col.iter().enumerate() {
            let row = |i: usize| acts.get_unchecked(i * kb + b);
            let mut sumi = [_mm256_setzero_si256(); R];
            for s in 0..16 {
                let scales = D::scales_i8(blk.scales[s].as_ptr());
                let sub = &blk.subs[s];
                prefetch::<2>((sub as *const Q6Sub).cast());
                let h = _mm256_loadu_si256(sub.qh.as_ptr().cast());
                let v0 = _mm256_loadu_si256(sub.ql[0].as_ptr().cast());
                let v1 = _mm256_loadu_si256(sub.ql[1].as_ptr().cast());
                // Values j, 4 + j, 8 + j, 12 + j of each column: low nibble | two high bits.
                let w = [
                    _mm256_or_si256(
                        _mm256_and_si256(v0, low),
                        _mm256_and_si256(_mm256_slli_epi16(h, 4), high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(v0, 4), low),
                        _mm256_and_si256(_mm256_slli_epi16(h, 2), high),
                    ),
                    _mm256_or_si256(_mm256_and_si256(v1, low), _mm256_and_si256(h, high)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(v1, 4), low),
                        _mm256_and_si256(_mm256_srli_epi16(h, 2), high),
                    ),
                ];
                for i in 0..R {
                    let a = row(i).qs.as_ptr().add(s * 16);
                    let p0 = D::acc(D::acc(zero, w[0], four(a)), w[1], four(a.add(4)));
                    let p1 = D::acc(D::acc(zero, w[2], four(a.add(8))), w[3], four(a.add(12)));
                    let p = if D::WIDE {
                        D::scale(D::merge(p0, p1), scales)
                    } else {
                        // In i16 lanes, each addition is two products of at most 63 · 127;
                        // two of them stay below i16::MAX, so the halves meet only in i32.
                        _mm256_add_epi32(D::scale(p0, scales), D::scale(p1, scales))
                    };
                    sumi[i] = _mm256_add_epi32(sumi[i], p);
                }
            }
            let pairs: [__m256i; 8] = std::array::from_fn(|p| {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.scale_pairs[p].as_ptr().cast()))
            });
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr().cast()));
            for i in 0..R {
                let a = row(i);
                // The stored values are q + 32: subtract 32 · Σ scale · Σ a per sub-block.
                let mut offset = _mm256_setzero_si256();
                for (p, scales) in pairs.iter().enumerate() {
                    offset =
                        _mm256_add_epi32(offset, _mm256_madd_epi16(*scales, two(&a.sums16, p)));
                }
                let total = _mm256_sub_epi32(sumi[i], _mm256_slli_epi32(offset, 5));
                let da = _mm256_set1_ps(a.d);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, da), acc[i]);
            }
        }
        for i in 0..R {
            _mm256_storeu_ps(out.add(i * n), acc[i]);
        }
    }
}
