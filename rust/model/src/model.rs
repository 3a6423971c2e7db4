//! A loaded model ([`Model`]): the handle sessions share, what it is ([`ModelInfo`]), and loading
//! it from a GGUF file (architecture dispatch, tokenizer, chat template, the kernel thread pool
//! sized on the first load).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::architecture::Architecture;
use crate::chat_template::ChatTemplate;
use crate::device::Device;
use crate::error::ModelError;
use crate::forward_pass::{Part, PassCost};
use crate::gemma3::Gemma3;
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::load_options::LoadOptions;
use crate::tokenizer::Tokenizer;

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
    /// Bytes one context token takes in a session's KV cache: keys and values, f32, every
    /// layer, each layer's own heads and head size (Gemma 3's `attention.key_length` is not
    /// `n_embd / n_heads`).
    #[serde(default)]
    pub kv_bytes_per_token: u64,
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

enum Weights {
    Llama(Llama),
    Gemma3(Gemma3),
}

/// A loaded model. Immutable and shared through `Arc`: any number of
/// [`Session`](crate::Session)s decode against the same weights.
pub struct Model {
    info: ModelInfo,
    pass_cost: PassCost,
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
        let (dims, kv_shapes) = match &weights {
            Weights::Llama(m) => (m.dims(), m.kv_shapes()),
            Weights::Gemma3(m) => (m.dims(), m.kv_shapes()),
        };
        let pass_cost = dims.pass_cost;
        let info = ModelInfo {
            architecture: arch,
            name: g.model_name(),
            vocab_size: dims.vocab_size,
            context_length: dims.context_length,
            n_layers: dims.n_layers,
            n_embd: dims.n_embd,
            n_heads: dims.n_heads,
            n_kv_heads: dims.n_kv_heads,
            kv_bytes_per_token: KvCache::bytes_per_token(&kv_shapes) as u64,
            file_bytes: g.file_bytes,
            dtypes: dtype_summary(&g),
            stand_in_for: g.opt_string(STAND_IN_KEY).map(str::to_string),
        };
        if let Some(progress) = &opts.progress {
            (progress.0)(1.0);
        }
        tracing::info!(path = %path.display(), ?info, "model loaded");
        Ok(Arc::new(Model {
            pass_cost,
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

    /// What a forward pass allocates beyond the weights and the caches, per row.
    pub fn pass_cost(&self) -> PassCost {
        self.pass_cost
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
/// has no effect), sized from `CANDLE_NUM_THREADS` when first used, and candle offers no other
/// way to size it. The first load therefore sets that variable, unless the user already did
/// or it would not change the count. A host that cannot rule out foreign threads reading the
/// environment (a JVM, a server resolving names) sets `CANDLE_NUM_THREADS` itself before it
/// starts threads, and then no variable is written here.
fn configure_threads(requested: Option<usize>) {
    let actual = *KERNEL_THREADS.get_or_init(|| {
        if let Some(n) = requested.filter(|n| *n > 0)
            && std::env::var_os("CANDLE_NUM_THREADS").is_none()
            && n != kernel_threads_from_env()
        {
            // SAFETY: `set_var` is sound only while no other thread reads or writes the
            // environment outside std's lock. Rust code goes through `std::env`, which takes
            // that lock, so the hazard is non-Rust code calling `getenv`/`setenv` at the same
            // time (libc's name resolution and time-zone code, a JVM's threads). This crate
            // cannot see its host's threads; it narrows the window to one call per process, on
            // the first load, only when a thread count is asked for that the environment does
            // not already give, and `LoadOptions::threads` tells a host with such threads to
            // set `CANDLE_NUM_THREADS` before starting them, which skips this call.
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
