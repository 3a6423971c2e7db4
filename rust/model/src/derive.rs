//! Deriving an on-device draft model from a GGUF: drop transformer blocks and requantize, so a
//! phone gets a smaller, faster model that shares the target's vocabulary (and therefore its
//! tokenizer fingerprint) and approximates its distribution.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::architecture::Architecture;
use crate::error::ModelError;
use crate::gemma3::SLIDING_PATTERN_KEY;
use crate::gguf::GgufFile;

/// Which blocks to keep and how to store the weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeriveOptions {
    /// Indices of the transformer blocks to keep, in order; `None` keeps all.
    pub keep_layers: Option<Vec<usize>>,
    /// Requantize every weight matrix whose rows fit the type's block size; `None` keeps
    /// each tensor's type. Norms and other 1-D tensors always stay as they are.
    pub quant: Option<GgmlDType>,
}

impl DeriveOptions {
    /// The measured default for SmolLM2-135M: every block, requantized to Q4_0, for a mean
    /// acceptance of about 0.7 against the Q4_1 original. Dropping blocks as well (15 and 27:
    /// acceptance 0.5) makes a draft whose confidence barely predicts rejection (Pearson r 0.2
    /// against 0.33), so almost nothing could be skipped safely (docs/MODELS.md).
    pub fn default_draft() -> Self {
        Self {
            keep_layers: None,
            quant: Some(GgmlDType::Q4_0),
        }
    }
}

/// What [`derive_draft`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct DeriveReport {
    pub source: PathBuf,
    pub output: PathBuf,
    pub architecture: Architecture,
    pub layers_before: usize,
    /// Source indices of the kept blocks; block `i` of the output is `kept_layers[i]`.
    pub kept_layers: Vec<usize>,
    pub quant: Option<GgmlDType>,
    pub tensors_requantized: usize,
    pub tensors_unchanged: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Derives the default draft ([`DeriveOptions::default_draft`]) of `llm` at `draft` unless a file
/// is there already; returns whether it derived one. It writes under a temporary name beside
/// `draft` and renames, so neither an interrupted run nor a caller deriving at the same time
/// ever sees a half-written model in its place.
pub fn ensure_default_draft(llm: &Path, draft: &Path) -> Result<bool, ModelError> {
    if draft.is_file() {
        return Ok(false);
    }
    // A name of its own per call, so that callers deriving at once never share a file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = draft.with_extension(format!("tmp{}-{call}", std::process::id()));
    let derived = derive_draft(llm, &tmp, &DeriveOptions::default_draft())
        .and_then(|_| std::fs::rename(&tmp, draft).map_err(|e| ModelError::io(draft, e)));
    if derived.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    derived.map(|()| true)
}

/// Writes a draft of `from` to `out`. Tokenizer and chat-template metadata are copied
/// verbatim, so the draft loads with [`crate::Model::load`] and has the same fingerprint.
pub fn derive_draft(
    from: &Path,
    out: &Path,
    opts: &DeriveOptions,
) -> Result<DeriveReport, ModelError> {
    let mut g = GgufFile::open(from)?;
    let arch_name = g.architecture()?;
    let arch = Architecture::from_gguf_name(&arch_name).ok_or_else(|| {
        ModelError::UnsupportedArchitecture {
            path: from.to_path_buf(),
            arch: arch_name.clone(),
        }
    })?;
    let block_key = format!("{arch_name}.block_count");
    let layers_before = g.usize(&block_key)?;
    let kept = match &opts.keep_layers {
        None => (0..layers_before).collect(),
        Some(k) => k.clone(),
    };
    validate_kept(&kept, layers_before)?;
    let renumber: HashMap<usize, usize> = kept.iter().enumerate().map(|(n, &o)| (o, n)).collect();

    let mut names: Vec<String> = g.content.tensor_infos.keys().cloned().collect();
    names.sort_by_key(|n| tensor_order(n));
    let cpu = candle_core::Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let (mut requantized, mut unchanged) = (0, 0);
    for name in names {
        let new_name = match block_index(&name) {
            Some((i, rest)) => match renumber.get(&i) {
                Some(n) => format!("blk.{n}.{rest}"),
                None => continue,
            },
            None => name.clone(),
        };
        let t = g.tensor(&name, None, &cpu)?;
        let t = match opts.quant {
            Some(q) if fits(&t, q) => {
                requantized += 1;
                QTensor::quantize(&t.dequantize(&cpu)?, q)?
            }
            _ => {
                unchanged += 1;
                t
            }
        };
        tensors.push((new_name, t));
    }

    let mut metadata: Vec<(String, Value)> = g
        .content
        .metadata
        .iter()
        // The writer always aligns to 32 bytes; a copied alignment key would misplace data.
        .filter(|(k, _)| k.as_str() != "general.alignment" && k.as_str() != SLIDING_PATTERN_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    set(&mut metadata, &block_key, Value::U32(kept.len() as u32));
    if arch == Architecture::Gemma3 {
        // Keep each surviving block's local/global kind explicit after renumbering.
        let sliding = crate::gemma3::sliding_layers(&g, layers_before)?;
        let flags = kept.iter().map(|&i| Value::Bool(sliding[i])).collect();
        set(&mut metadata, SLIDING_PATTERN_KEY, Value::Array(flags));
    }
    if let Some(q) = opts.quant
        && let Some(ft) = llama_file_type(q)
    {
        set(&mut metadata, "general.file_type", Value::U32(ft));
    }
    set(
        &mut metadata,
        "uhlm.draft.source",
        Value::String(
            from.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    );
    set(
        &mut metadata,
        "uhlm.draft.kept_layers",
        Value::Array(kept.iter().map(|&i| Value::U32(i as u32)).collect()),
    );
    metadata.sort_by(|a, b| a.0.cmp(&b.0));

    write_atomically(out, &metadata, &tensors)?;
    let bytes_after = std::fs::metadata(out)
        .map_err(|e| ModelError::io(out, e))?
        .len();
    Ok(DeriveReport {
        source: from.to_path_buf(),
        output: out.to_path_buf(),
        architecture: arch,
        layers_before,
        kept_layers: kept,
        quant: opts.quant,
        tensors_requantized: requantized,
        tensors_unchanged: unchanged,
        bytes_before: g.file_bytes,
        bytes_after,
    })
}

fn validate_kept(kept: &[usize], n: usize) -> Result<(), ModelError> {
    let bad = |reason: String| Err(ModelError::InvalidOptions(reason));
    if kept.is_empty() {
        return bad("keep_layers is empty: a draft needs at least one block".into());
    }
    if let Some(&i) = kept.iter().find(|&&i| i >= n) {
        return bad(format!("keep_layers names block {i}, the model has {n}"));
    }
    if kept.windows(2).any(|w| w[0] >= w[1]) {
        return bad(format!(
            "keep_layers must be strictly increasing, got {kept:?}"
        ));
    }
    Ok(())
}

/// `blk.12.attn_q.weight` -> `(12, "attn_q.weight")`.
fn block_index(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    Some((idx.parse().ok()?, rest))
}

/// Non-block tensors first, then blocks in numeric order: the order llama.cpp writes.
pub(crate) fn tensor_order(name: &str) -> (usize, String) {
    match block_index(name) {
        Some((i, rest)) => (i + 1, rest.to_string()),
        None => (0, name.to_string()),
    }
}

/// Whether `t` is a weight matrix whose rows split into whole `q` blocks.
fn fits(t: &QTensor, q: GgmlDType) -> bool {
    let dims = t.shape().dims();
    dims.len() >= 2 && t.dtype() != q && dims[dims.len() - 1].is_multiple_of(q.block_size())
}

pub(crate) fn set(metadata: &mut Vec<(String, Value)>, key: &str, value: Value) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => metadata.push((key.to_string(), value)),
    }
}

/// llama.cpp's `general.file_type` for a model stored mostly as `q`.
fn llama_file_type(q: GgmlDType) -> Option<u32> {
    Some(match q {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        GgmlDType::Q8_1 | GgmlDType::Q8K => return None,
    })
}

/// Writes to a sibling temporary file and renames it, so a crash never leaves a truncated
/// draft where a loader would find it.
pub(crate) fn write_atomically(
    out: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<(), ModelError> {
    let tmp = out.with_extension("gguf.partial");
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &md, &ts)?;
        use std::io::Write;
        w.flush().map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
