//! How to load a model: the options a caller passes to [`crate::Model::load`], with the matmul
//! kernels to run and the progress callback they may carry.

use std::path::PathBuf;
use std::sync::Arc;

use crate::device::Device;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: Device,
    /// CPU threads for the matmul kernels. candle sizes its kernel thread pool once per
    /// process, so only the first load of a process can set it; later loads asking for a
    /// different count log a warning. `None` leaves candle's default (physical cores, or
    /// `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`).
    ///
    /// candle reads the count only from `CANDLE_NUM_THREADS`, so the first load sets that
    /// variable, which is undefined behaviour if non-Rust code (a JVM, libc's name resolution)
    /// reads the environment at that moment. A host that runs such threads sets
    /// `CANDLE_NUM_THREADS` itself before starting them and leaves this `None`.
    pub threads: Option<usize>,
    /// Use this HuggingFace `tokenizer.json` instead of the tokenizer embedded in the GGUF.
    pub tokenizer_json: Option<PathBuf>,
    /// Keep Q4_1/Q5_0/Q5_1 matmul weights as stored where this CPU has no fast kernel for
    /// them (aarch64 today: candle has only scalar code for those types). By default they are
    /// then requantized to Q8_0 at load, which decodes 3-5x faster at ~1.7x their memory,
    /// with logits that differ only in the last bits of the weights. On x86 with AVX2 they
    /// are always kept.
    pub keep_weight_types: bool,
    /// Which CPU matmul kernels run the weights. [`Kernels::Own`] by default.
    pub kernels: Kernels,
    /// Called as weights are read, with the fraction of tensor bytes loaded so far (ends at 1).
    pub progress: Option<LoadProgress>,
}

/// The CPU matmul kernels a model runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The runtime's own kernels, reading each weight once from the GGUF blocks (or an
    /// interleaved layout that replaces them): the fast, lean path.
    #[default]
    Own,
    /// candle's `QMatMul` for every weight: the reference the runtime's kernels are tested
    /// against (slower, and it keeps repacked copies of Q4_K/Q6_K weights).
    Candle,
}

/// A loading-progress callback (apps show a progress bar: a phone reads ~100 MB of weights).
#[derive(Clone)]
pub struct LoadProgress(pub Arc<dyn Fn(f32) + Send + Sync>);

impl LoadProgress {
    pub fn new(f: impl Fn(f32) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}
