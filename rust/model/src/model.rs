//! Loading a GGUF model: architecture dispatch, tokenizer, chat template, and the handle that
//! sessions share.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::chat_template::ChatTemplate;
use crate::error::ModelError;
use crate::gemma3::Gemma3;
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::session::Session;
use crate::tokenizer::Tokenizer;

/// Where the weights live and the forward passes run. Written `cpu`, `cuda` (GPU 0) or
/// `cuda:N`, in flags and config files alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; only in builds with the `cuda` feature.
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = ModelError;

    /// A build without the `cuda` feature refuses `cuda` by name, so that a server asked for
    /// a GPU says so at start instead of quietly running on the CPU.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let ordinal = match s {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => Some(0),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => Some(n.parse::<usize>().map_err(|_| {
                    ModelError::Device(format!("{s:?}: the GPU ordinal must be a number"))
                })?),
                None => None,
            },
        };
        match ordinal {
            None => Err(ModelError::Device(format!(
                "{s:?}: expected cpu, cuda or cuda:N"
            ))),
            #[cfg(feature = "cuda")]
            Some(i) => Ok(Device::Cuda(i)),
            #[cfg(not(feature = "cuda"))]
            Some(_) => Err(ModelError::Device(format!(
                "{s:?}: this build has no CUDA support (build with the `cuda` feature: \
                 cargo xtask cuda)"
            ))),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, ModelError> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl Device {
    fn to_candle(self) -> Result<candle_core::Device, ModelError> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => candle_core::Device::new_cuda(i)
                .map_err(|e| ModelError::Device(format!("CUDA device {i}: {e}"))),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: Device,
    /// CPU threads for the matmul kernels. candle sizes its kernel thread pool once per
    /// process, so only the first load of a process can set it; later loads asking for a
    /// different count log a warning. `None` leaves candle's default (physical cores, or
    /// `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`).
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

/// Architectures this runtime implements, by their GGUF `general.architecture` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// `llama`: SmolLM2, TinyLlama, Llama 2/3, Mistral.
    Llama,
    /// `qwen2`: llama with q/k/v biases and NeoX rope.
    Qwen2,
    /// `gemma3`.
    Gemma3,
}

impl Architecture {
    /// Parses a GGUF `general.architecture` value.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The name GGUF uses, also the prefix of its hyper-parameter keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// What a loaded model is, for display and for checking a draft against its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub architecture: Architecture,
    /// `general.name`, or the file stem when absent.
    pub name: String,
    /// Rows of the embedding table: valid token ids are `0..vocab_size`.
    pub vocab_size: usize,
    pub context_length: usize,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub file_bytes: u64,
    /// Tensor count per storage type, e.g. `"Q4_1×210 F32×61 Q8_0×1"`.
    pub dtypes: String,
    /// For a stand-in with random weights (`uhlm models stand-in`), the model it was made
    /// from: it runs at that model's speed and means nothing.
    #[serde(default)]
    pub stand_in_for: Option<String>,
}

/// Metadata key a stand-in carries: the file name of the model it was made from.
pub const STAND_IN_KEY: &str = "uhlm.stand_in.source";

/// Shape facts every architecture reports.
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    pub vocab_size: usize,
    pub context_length: usize,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

enum Weights {
    Llama(Llama),
    Gemma3(Gemma3),
}

/// A loaded model. Immutable and shared through `Arc`: any number of [`Session`]s decode
/// against the same weights.
pub struct Model {
    info: ModelInfo,
    path: PathBuf,
    weights: Weights,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    device: candle_core::Device,
    /// `device` as it was asked for.
    on: Device,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads a GGUF model, its tokenizer and its chat template.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Arc<Model>, ModelError> {
        configure_threads(opts.threads);
        let device = opts.device.to_candle()?;
        let mut g = GgufFile::open(path)?;
        g.progress = opts.progress.clone();
        let arch_name = g.architecture()?;
        let arch = Architecture::from_gguf_name(&arch_name).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.clone(),
            }
        })?;
        let tokenizer = match &opts.tokenizer_json {
            Some(json) => Tokenizer::from_file(json)?,
            None => Tokenizer::from_gguf(&g.content)
                .map_err(|e| ModelError::corrupt(path, format!("tokenizer metadata: {e}")))?,
        };
        let chat_template = ChatTemplate::from_gguf(&g.content)
            .map_err(|e| ModelError::corrupt(path, format!("chat template: {e}")))?;
        let weights = match arch {
            Architecture::Llama | Architecture::Qwen2 => {
                Weights::Llama(Llama::load(&mut g, arch, &device, opts.into())?)
            }
            Architecture::Gemma3 => Weights::Gemma3(Gemma3::load(&mut g, &device, opts.into())?),
        };
        let dims = match &weights {
            Weights::Llama(m) => m.dims(),
            Weights::Gemma3(m) => m.dims(),
        };
        let info = ModelInfo {
            architecture: arch,
            name: g.model_name(),
            vocab_size: dims.vocab_size,
            context_length: dims.context_length,
            n_layers: dims.n_layers,
            n_embd: dims.n_embd,
            n_heads: dims.n_heads,
            n_kv_heads: dims.n_kv_heads,
            file_bytes: g.file_bytes,
            dtypes: dtype_summary(&g),
            stand_in_for: g.opt_string(STAND_IN_KEY).map(str::to_string),
        };
        if let Some(progress) = &opts.progress {
            (progress.0)(1.0);
        }
        tracing::info!(path = %path.display(), ?info, "model loaded");
        Ok(Arc::new(Model {
            info,
            path: path.to_path_buf(),
            weights,
            tokenizer,
            chat_template,
            device,
            on: opts.device,
        }))
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Where the weights live and the forward passes run.
    pub fn device(&self) -> Device {
        self.on
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The GGUF's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Identifies the vocabulary: a draft and its target must agree on it.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.tokenizer.fingerprint()
    }

    /// A fresh decoding session with its own KV cache.
    pub fn session(self: &Arc<Self>) -> Session {
        Session::new(self.clone())
    }

    pub(crate) fn new_cache(&self) -> KvCache {
        let shapes = match &self.weights {
            Weights::Llama(m) => m.kv_shapes(),
            Weights::Gemma3(m) => m.kv_shapes(),
        };
        KvCache::new(shapes, self.info.context_length, &self.device)
    }

    /// One forward pass over every part: each part's new tokens at its own positions, with
    /// its own KV cache (whose length the caller then advances). Every weight matmul runs once
    /// over the rows of all parts; attention runs per part against its cache. Returns, per
    /// part, logits `(rows, vocab)` for the rows its `outputs` asks for. The kernels compute a
    /// row the same way whatever else is in the batch, so each part's logits equal those of
    /// running it alone.
    pub(crate) fn forward(&self, parts: &mut [Part<'_>]) -> candle_core::Result<Vec<Tensor>> {
        match &self.weights {
            Weights::Llama(m) => m.forward(parts),
            Weights::Gemma3(m) => m.forward(parts),
        }
    }
}

/// One sequence's share of a forward pass.
pub(crate) struct Part<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`.
    pub pos0: usize,
    pub cache: &'a mut KvCache,
    pub outputs: Outputs<'a>,
}

/// Where each part's rows sit in the batch: `(first row, rows)`.
pub(crate) fn row_spans(parts: &[Part<'_>]) -> Vec<(usize, usize)> {
    let mut r = 0;
    parts
        .iter()
        .map(|p| {
            let span = (r, p.tokens.len());
            r += p.tokens.len();
            span
        })
        .collect()
}

/// Rows `(rows, ..)` gathered per part, one tensor (no copy for a single part).
pub(crate) fn concat_rows(pieces: &[Tensor]) -> candle_core::Result<Tensor> {
    match pieces {
        [one] => Ok(one.clone()),
        many => Tensor::cat(many, 0),
    }
}

/// The hidden states whose logits the parts want, in one tensor, and how many rows each
/// part contributes.
pub(crate) fn output_rows(
    x: &Tensor,
    parts: &[Part<'_>],
) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let spans = row_spans(parts);
    let mut pieces = Vec::with_capacity(parts.len());
    let mut counts = Vec::with_capacity(parts.len());
    for (p, &(r0, seq)) in parts.iter().zip(&spans) {
        let rows = p.outputs.select(&x.narrow(0, r0, seq)?)?;
        counts.push(rows.dim(0)?);
        pieces.push(rows);
    }
    Ok((concat_rows(&pieces)?, counts))
}

/// Splits `(rows, vocab)` logits back into the parts' shares.
pub(crate) fn split_rows(logits: &Tensor, counts: &[usize]) -> candle_core::Result<Vec<Tensor>> {
    let mut r = 0;
    counts
        .iter()
        .map(|&n| {
            let t = logits.narrow(0, r, n);
            r += n;
            t
        })
        .collect()
}

/// Which positions of a forward pass get logits. The output projection over a 150k-262k
/// vocabulary costs as much as several blocks and its result is `rows x vocab` floats, so a
/// prefill that needs only the next token's distribution computes only that row, and a
/// verification only the rows it decides at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs<'a> {
    /// Every position (evaluation).
    All,
    /// The last position only (prefill, decode).
    Last,
    /// These positions of the new tokens, in this order (verifying a chain of drafts: the
    /// rows before each draft). Each must be below the number of new tokens.
    Rows(&'a [usize]),
}

impl Outputs<'_> {
    /// The hidden states `(seq, d)` whose logits are wanted.
    pub(crate) fn select(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Outputs::All => Ok(xs.clone()),
            Outputs::Last => {
                let seq = xs.dim(0)?;
                xs.narrow(0, seq - 1, 1)
            }
            Outputs::Rows(rows) => {
                let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                let ids = Tensor::from_vec(ids, rows.len(), xs.device())?;
                xs.index_select(&ids, 0)
            }
        }
    }
}

fn dtype_summary(g: &GgufFile) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for info in g.content.tensor_infos.values() {
        *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
        .iter()
        .map(|(t, n)| format!("{t}×{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Threads candle's CPU kernels use in this process.
static KERNEL_THREADS: OnceLock<usize> = OnceLock::new();

/// Sizes candle's kernel pool. candle 0.11's quantized matmuls and elementwise kernels run on
/// a process-global spin-barrier pool (not rayon's current pool, so `ThreadPool::install`
/// has no effect), sized from `CANDLE_NUM_THREADS` when first used. The first load therefore
/// sets that variable, unless the user already did.
fn configure_threads(requested: Option<usize>) {
    let actual = *KERNEL_THREADS.get_or_init(|| {
        if let Some(n) = requested.filter(|n| *n > 0)
            && std::env::var_os("CANDLE_NUM_THREADS").is_none()
        {
            // SAFETY: runs once, on the first model load, before candle has started its
            // pool; the runtime spawns no threads that read the environment concurrently.
            unsafe { std::env::set_var("CANDLE_NUM_THREADS", n.to_string()) };
        }
        kernel_threads_from_env()
    });
    if let Some(n) = requested
        && n != actual
    {
        tracing::warn!(
            requested = n,
            actual,
            "candle's kernel thread pool is per process and already sized; ignoring"
        );
    }
}

fn kernel_threads_from_env() -> usize {
    ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|k| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0)
        })
        .unwrap_or_else(candle_core::utils::get_num_threads)
}

/// Threads candle's CPU kernels use in this process (fixed after the first model load).
pub fn kernel_threads() -> usize {
    *KERNEL_THREADS.get_or_init(kernel_threads_from_env)
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn a_device_is_written_as_it_is_read() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!(Device::Cpu.to_string(), "cpu");
        for bad in ["", "gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?} was accepted");
        }
        #[cfg(feature = "cuda")]
        {
            assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
            assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
            assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        }
        #[cfg(not(feature = "cuda"))]
        for gpu in ["cuda", "cuda:1"] {
            let e = gpu.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("no CUDA support"), "{gpu:?}: {e}");
        }
    }
}
