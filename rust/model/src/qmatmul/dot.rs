//! The byte dot products of the x86 tile kernels: AVX2 alone, or with AVX-VNNI.
//!
//! Once a batch has more than a few rows the kernels are bound by arithmetic, not by reading
//! the weights, and most of that arithmetic is here. VNNI's `vpdpbusd` multiplies unsigned
//! by signed bytes and adds each four products into an i32 lane in one instruction, where
//! AVX2 takes `maddubs` (products in pairs into i16), `madd` (into i32) and an add. Every
//! partial sum the kernels form fits in i16 before AVX2 widens it, so both give the same
//! integers: the logits are bit for bit the same on either.

use std::arch::x86_64::*;

/// Which instruction set the kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx2,
    /// AVX2 plus AVX-VNNI (Intel from Alder Lake and Sapphire Rapids, AMD from Zen 5).
    AvxVnni,
}

impl Isa {
    /// The best this CPU has; the caller has checked AVX2, FMA and F16C.
    pub fn detect() -> Self {
        if is_x86_feature_detected!("avxvnni") {
            Isa::AvxVnni
        } else {
            Isa::Avx2
        }
    }
}

/// The integer steps a tile takes; every method is inlined into a function compiled for
/// the matching instruction set.
///
/// # Safety
/// Every method is `unsafe` because it runs that instruction set's intrinsics: call it only
/// where the CPU has it (AVX2, plus AVX-VNNI for [`AvxVnni`]), which the kernels check once
/// with [`Isa::detect`] before choosing this path. The scale loaders read memory, as each
/// one's own `# Safety` says.
pub(super) trait Dot {
    /// Whether partial sums are i32 lanes, one per group of four bytes (VNNI), rather than
    /// i16 lanes, one per pair.
    const WIDE: bool;
    /// `acc` plus the products of unsigned `w` and signed `a`, in partial-sum lanes.
    ///
    /// # Safety
    /// The CPU has the implementor's instruction set.
    unsafe fn acc(acc: __m256i, w: __m256i, a: __m256i) -> __m256i;
    /// The sum of two partial sums, lane by lane (in i16 lanes, where it cannot overflow).
    ///
    /// # Safety
    /// The CPU has the implementor's instruction set.
    unsafe fn merge(p: __m256i, q: __m256i) -> __m256i;
    /// Eight per-column scales from bytes, zero-extended, in the form [`Dot::scale`] takes.
    ///
    /// # Safety
    /// The CPU has the implementor's instruction set, and `bytes` is valid for reading 8
    /// bytes (no alignment needed).
    unsafe fn scales_u8(bytes: *const u8) -> __m256i;
    /// Eight per-column scales from bytes, sign-extended, in the form [`Dot::scale`] takes.
    ///
    /// # Safety
    /// The CPU has the implementor's instruction set, and `bytes` is valid for reading 8
    /// bytes (no alignment needed).
    unsafe fn scales_i8(bytes: *const i8) -> __m256i;
    /// i32 lane `c` = scale `c` times the partial sums of bytes `4c..4c + 4`.
    ///
    /// # Safety
    /// The CPU has the implementor's instruction set.
    unsafe fn scale(p: __m256i, scales: __m256i) -> __m256i;
    /// i32 lane `c` = the sum of the products of bytes `4c..4c + 4`.
    ///
    /// # Safety
    /// The CPU has the implementor's instruction set.
    #[inline(always)]
    unsafe fn dot(w: __m256i, a: __m256i) -> __m256i {
        // SAFETY: this method's contract (the CPU has the implementor's instruction set,
        // of which AVX2's `madd` is part) is what `acc` and the intrinsics need.
        unsafe {
            let p = Self::acc(_mm256_setzero_si256(), w, a);
            if Self::WIDE {
                p
            } else {
                _mm256_madd_epi16(p, _mm256_set1_epi16(1))
            }
        }
    }
}

pub(super) struct Avx2;

impl Dot for Avx2 {
    const WIDE: bool = false;
    #[inline(always)]
    unsafe fn acc(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        // SAFETY: register-only AVX2 intrinsics; the caller guarantees AVX2 (`Dot`'s contract).
        unsafe { _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, a)) }
    }
    #[inline(always)]
    unsafe fn merge(p: __m256i, q: __m256i) -> __m256i {
        // SAFETY: register-only AVX2 intrinsic; the caller guarantees AVX2 (`Dot`'s contract).
        unsafe { _mm256_add_epi16(p, q) }
    }
    #[inline(always)]
    unsafe fn scales_u8(bytes: *const u8) -> __m256i {
        // SAFETY: the caller guarantees AVX2 and 8 readable bytes at `bytes`, all that the
        // unaligned 8-byte load and the register-only conversions need.
        unsafe { doubled(_mm_cvtepu8_epi16(_mm_loadl_epi64(bytes.cast()))) }
    }
    #[inline(always)]
    unsafe fn scales_i8(bytes: *const i8) -> __m256i {
        // SAFETY: the caller guarantees AVX2 and 8 readable bytes at `bytes`, all that the
        // unaligned 8-byte load and the register-only conversions need.
        unsafe { doubled(_mm_cvtepi8_epi16(_mm_loadl_epi64(bytes.cast()))) }
    }
    #[inline(always)]
    unsafe fn scale(p: __m256i, scales: __m256i) -> __m256i {
        // SAFETY: register-only AVX2 intrinsic; the caller guarantees AVX2 (`Dot`'s contract).
        unsafe { _mm256_madd_epi16(p, scales) }
    }
}

pub(super) struct AvxVnni;

impl Dot for AvxVnni {
    const WIDE: bool = true;
    #[inline(always)]
    unsafe fn acc(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        // SAFETY: register-only AVX-VNNI intrinsic; the caller guarantees AVX-VNNI (`Dot`'s
        // contract for `AvxVnni`).
        unsafe { _mm256_dpbusd_avx_epi32(acc, w, a) }
    }
    #[inline(always)]
    unsafe fn merge(p: __m256i, q: __m256i) -> __m256i {
        // SAFETY: register-only AVX2 intrinsic; the caller guarantees AVX2 (`Dot`'s contract).
        unsafe { _mm256_add_epi32(p, q) }
    }
    #[inline(always)]
    unsafe fn scales_u8(bytes: *const u8) -> __m256i {
        // SAFETY: the caller guarantees AVX2 and 8 readable bytes at `bytes`, all that the
        // unaligned 8-byte load and the register-only conversion need.
        unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.cast())) }
    }
    #[inline(always)]
    unsafe fn scales_i8(bytes: *const i8) -> __m256i {
        // SAFETY: the caller guarantees AVX2 and 8 readable bytes at `bytes`, all that the
        // unaligned 8-byte load and the register-only conversion need.
        unsafe { _mm256_cvtepi8_epi32(_mm_loadl_epi64(bytes.cast())) }
    }
    #[inline(always)]
    unsafe fn scale(p: __m256i, scales: __m256i) -> __m256i {
        // SAFETY: register-only AVX2 intrinsic; the caller guarantees AVX2 (`Dot`'s contract).
        unsafe { _mm256_mullo_epi32(p, scales) }
    }
}

/// 16 x i16: i16 `c` of `w` in lanes `2c` and `2c + 1`.
///
/// # Safety
/// The CPU supports AVX2.
#[inline(always)]
unsafe fn doubled(w: __m128i) -> __m256i {
    // SAFETY: register-only AVX/SSE2 intrinsics; the caller guarantees AVX2.
    unsafe { _mm256_set_m128i(_mm_unpackhi_epi16(w, w), _mm_unpacklo_epi16(w, w)) }
}
