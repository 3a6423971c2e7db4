//! A stand-in for a model whose weights cannot travel: its header (hyper-parameters,
//! tokenizer, chat template, every tensor's name, shape and type) with random weights.
//!
//! A forward pass costs what the real model's costs (the same shapes, the same quantized
//! types, the same kernels), so a stand-in times a server where a 1 GB model cannot be
//! carried (the lent GPU machine reaches no package registry). Its distributions are
//! nonsense: it measures speed, never quality. The header alone ([`strip_weights`]) is a few
//! MB; [`random_weights`] rebuilds a loadable file from it, or from the full model.

use std::io::{Read, Seek, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::derive::{set, tensor_order, write_atomically};
use crate::error::ModelError;
use crate::model::STAND_IN_KEY;

/// Distinct rows quantized per weight matrix; the rest repeat them. Enough that rows differ
/// within every kernel tile, cheap enough for a 1.5B model in seconds.
const SAMPLE_ROWS: usize = 64;

/// Writes `from`'s header (everything before the tensor data) to `out`; returns its bytes.
pub fn strip_weights(from: &Path, out: &Path) -> Result<u64, ModelError> {
    let mut file = std::fs::File::open(from).map_err(|e| ModelError::io(from, e))?;
    let content = read_header(from, &mut file)?;
    let bytes = content.tensor_data_offset;
    file.rewind().map_err(|e| ModelError::io(from, e))?;
    let mut header = Vec::with_capacity(bytes as usize);
    file.take(bytes)
        .read_to_end(&mut header)
        .map_err(|e| ModelError::io(from, e))?;
    let tmp = out.with_extension("partial");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&header))
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|e| ModelError::io(out, e))?;
    Ok(bytes)
}

/// Writes a loadable model to `out` with `like`'s header and random weights drawn from
/// `seed`. `like` is a model or a header written by [`strip_weights`].
pub fn random_weights(like: &Path, out: &Path, seed: u64) -> Result<(), ModelError> {
    let mut file = std::fs::File::open(like).map_err(|e| ModelError::io(like, e))?;
    let content = read_header(like, &mut file)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| tensor_order(n));
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let info = &content.tensor_infos[name];
        let t = random_tensor(name, info.shape.dims(), info.ggml_dtype, &mut rng)
            .map_err(|e| ModelError::corrupt(like, format!("tensor {name}: {e}")))?;
        tensors.push((name.clone(), t));
    }
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .into_iter()
        .filter(|(k, _)| k != "general.alignment")
        .collect();
    let source = like.file_name().map(|s| s.to_string_lossy().into_owned());
    set(
        &mut metadata,
        STAND_IN_KEY,
        Value::String(source.unwrap_or_default()),
    );
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    write_atomically(out, &metadata, &tensors)
}

fn read_header(path: &Path, file: &mut std::fs::File) -> Result<Content, ModelError> {
    Content::read(file)
        .map_err(|e| ModelError::corrupt(path, format!("unreadable GGUF header: {e}")))
}

/// A tensor of `dims` stored as `dtype`: norm weights 1 (as a trained model's are, roughly),
/// everything else uniform in ±0.05, quantized from [`SAMPLE_ROWS`] rows that then repeat.
fn random_tensor(
    name: &str,
    dims: &[usize],
    dtype: GgmlDType,
    rng: &mut StdRng,
) -> candle_core::Result<QTensor> {
    let cpu = Device::Cpu;
    let elems: usize = dims.iter().product();
    let Some((&k, rows)) = dims.split_last() else {
        candle_core::bail!("a tensor with no dimensions");
    };
    let n: usize = rows.iter().product();
    let sample_rows = n.clamp(1, SAMPLE_ROWS);
    let values: Vec<f32> = if name.contains("norm") {
        vec![1.0; sample_rows * k]
    } else {
        (0..sample_rows * k)
            .map(|_| rng.random_range(-0.05..0.05))
            .collect()
    };
    if !k.is_multiple_of(dtype.block_size()) {
        candle_core::bail!("rows of {k} do not split into {dtype:?} blocks")
    }
    let sample = Tensor::from_vec(values, (sample_rows, k), &cpu)?;
    let sample = QTensor::quantize(&sample, dtype)?;
    let sample = sample.data()?;
    let bytes = elems / dtype.block_size() * dtype.type_size();
    let data: Vec<u8> = sample.iter().copied().cycle().take(bytes).collect();
    candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &data, dims.to_vec(), &cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tensor type a model of the pairs holds survives the round trip at its shape.
    #[test]
    fn a_random_tensor_has_the_shape_and_type_asked_for() {
        let mut rng = StdRng::seed_from_u64(1);
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let t = random_tensor("blk.0.ffn_up.weight", &[300, 512], dtype, &mut rng).unwrap();
            assert_eq!(t.shape().dims(), &[300, 512]);
            assert_eq!(t.dtype(), dtype);
            let w = t.dequantize(&Device::Cpu).unwrap();
            let max = w
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(max > 0.0 && max < 0.06, "{dtype:?}: |w| up to {max}");
            // Rows repeat with period SAMPLE_ROWS and differ within it.
            let rows = |a: usize| w.get(a).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(rows(3), rows(3 + SAMPLE_ROWS));
            assert_ne!(rows(3), rows(4));
        }
        let norm = random_tensor("blk.0.attn_norm.weight", &[512], GgmlDType::F32, &mut rng)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(norm.to_vec1::<f32>().unwrap(), vec![1.0; 512]);
    }
}
