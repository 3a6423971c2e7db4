//! Reading a GGUF file with errors that name the file and the missing or malformed piece.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::ModelError;

/// An open GGUF file: its parsed header plus a reader for tensor data.
pub(crate) struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub file_bytes: u64,
    /// Told the fraction of tensor bytes read after each tensor.
    pub progress: Option<crate::load_options::LoadProgress>,
    tensor_bytes: u64,
    read_bytes: u64,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and parses the header, checking that every tensor lies inside the file so a
    /// truncated download fails here rather than halfway through loading.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::ModelNotFound {
                path: path.to_path_buf(),
            },
            _ => ModelError::io(path, e),
        })?;
        let file_bytes = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| ModelError::corrupt(path, format!("unreadable GGUF header: {e}")))?;
        let mut tensor_bytes = 0u64;
        for (name, info) in &content.tensor_infos {
            let block = info.ggml_dtype.block_size();
            // Checked: the dimensions are the file's word, and their product must not wrap
            // into a small size that passes the bounds check below.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .ok_or_else(|| {
                    ModelError::corrupt(path, format!("tensor {name} has an impossible shape"))
                })?;
            if elems % block as u64 != 0 {
                return Err(ModelError::corrupt(
                    path,
                    format!("tensor {name} has {elems} elements, not a multiple of {block}"),
                ));
            }
            let bytes = (elems / block as u64).saturating_mul(info.ggml_dtype.type_size() as u64);
            tensor_bytes = tensor_bytes.saturating_add(bytes);
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_bytes {
                return Err(ModelError::corrupt(
                    path,
                    format!(
                        "truncated: tensor {name} ends at byte {end} but the file has {file_bytes}"
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file_bytes,
            progress: None,
            tensor_bytes,
            read_bytes: 0,
            reader,
        })
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String, ModelError> {
        Ok(self.string("general.architecture")?.to_string())
    }

    pub fn string(&self, key: &str) -> Result<&str, ModelError> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.bad_key(key, "is not a string")),
            None => Err(self.missing_key(key)),
        }
    }

    /// The model's name: `general.name`, or the file stem when absent.
    pub fn model_name(&self) -> String {
        self.opt_string("general.name")
            .map(str::to_string)
            .or_else(|| {
                self.path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .unwrap_or_default()
    }

    pub fn opt_string(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer key, whatever integer width the writer chose.
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing_key(key))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        let Some(v) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let n: i128 = match v {
            Value::U8(x) => (*x).into(),
            Value::I8(x) => (*x).into(),
            Value::U16(x) => (*x).into(),
            Value::I16(x) => (*x).into(),
            Value::U32(x) => (*x).into(),
            Value::I32(x) => (*x).into(),
            Value::U64(x) => (*x).into(),
            Value::I64(x) => (*x).into(),
            _ => return Err(self.bad_key(key, "is not an integer")),
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.bad_key(key, &format!("has out-of-range value {n}")))
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(_) => Err(self.bad_key(key, "is not a float")),
        }
    }

    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        self.opt_f32(key)?.ok_or_else(|| self.missing_key(key))
    }

    /// `{prefix}.block_count`, refused when the file cannot hold that many blocks (each has
    /// several tensors): the count sizes allocations before any block is read.
    pub fn block_count(&self, prefix: &str) -> Result<usize, ModelError> {
        let key = format!("{prefix}.block_count");
        let n = self.usize(&key)?;
        let tensors = self.content.tensor_infos.len();
        if n > tensors {
            return Err(self.bad_key(
                &key,
                &format!("is {n}, but the file holds only {tensors} tensors"),
            ));
        }
        Ok(n)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Dimensions of a tensor as candle orders them (outermost first).
    pub fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| self.missing_tensor(name))
    }

    /// Reads a tensor onto `device`, checking its shape when `dims` is given.
    pub fn tensor(
        &mut self,
        name: &str,
        dims: Option<&[usize]>,
        device: &candle_core::Device,
    ) -> Result<QTensor, ModelError> {
        if !self.has_tensor(name) {
            return Err(self.missing_tensor(name));
        }
        let t = if device.is_cpu() {
            self.read_cpu(name)
        } else {
            self.content.tensor(&mut self.reader, name, device)
        }
        .map_err(|e| ModelError::corrupt(&self.path, format!("tensor {name}: {e}")))?;
        if let Some(progress) = &self.progress {
            self.read_bytes += t.storage_size_in_bytes() as u64;
            // Below 1 until the model is assembled; `Model::load` reports the final 1.
            (progress.0)(
                (self.read_bytes as f64 / self.tensor_bytes.max(1) as f64).min(0.99) as f32,
            );
        }
        if let Some(dims) = dims
            && t.shape().dims() != dims
        {
            return Err(ModelError::corrupt(
                &self.path,
                format!(
                    "tensor {name} has shape {:?}, expected {dims:?}",
                    t.shape().dims()
                ),
            ));
        }
        Ok(t)
    }

    /// Reads a tensor straight into its block storage. candle's reader goes through a byte
    /// buffer and copies it, which doubles the peak for the largest tensor (the 30-190 MB
    /// embedding or output tables).
    fn read_cpu(&mut self, name: &str) -> candle_core::Result<QTensor> {
        use candle_core::quantized::k_quants::*;
        use candle_core::quantized::{GgmlDType as D, QStorage};
        let info = &self.content.tensor_infos[name];
        let (dtype, shape) = (info.ggml_dtype, info.shape.clone());
        let bytes = shape.elem_count() / dtype.block_size() * dtype.type_size();
        self.reader.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))?;
        let r = &mut self.reader;
        let storage: Box<dyn candle_core::quantized::QuantizedType> = match dtype {
            D::F32 => read_blocks::<f32>(r, bytes)?,
            D::F16 => read_blocks::<half::f16>(r, bytes)?,
            D::BF16 => read_blocks::<half::bf16>(r, bytes)?,
            D::Q4_0 => read_blocks::<BlockQ4_0>(r, bytes)?,
            D::Q4_1 => read_blocks::<BlockQ4_1>(r, bytes)?,
            D::Q5_0 => read_blocks::<BlockQ5_0>(r, bytes)?,
            D::Q5_1 => read_blocks::<BlockQ5_1>(r, bytes)?,
            D::Q8_0 => read_blocks::<BlockQ8_0>(r, bytes)?,
            D::Q8_1 => read_blocks::<BlockQ8_1>(r, bytes)?,
            D::Q2K => read_blocks::<BlockQ2K>(r, bytes)?,
            D::Q3K => read_blocks::<BlockQ3K>(r, bytes)?,
            D::Q4K => read_blocks::<BlockQ4K>(r, bytes)?,
            D::Q5K => read_blocks::<BlockQ5K>(r, bytes)?,
            D::Q6K => read_blocks::<BlockQ6K>(r, bytes)?,
            D::Q8K => read_blocks::<BlockQ8K>(r, bytes)?,
            #[allow(unreachable_patterns)]
            _ => {
                return self
                    .content
                    .tensor(&mut self.reader, name, &candle_core::Device::Cpu);
            }
        };
        QTensor::new(QStorage::Cpu(storage), shape)
    }

    pub fn missing_key(&self, key: &str) -> ModelError {
        ModelError::corrupt(&self.path, format!("missing metadata key {key}"))
    }

    fn bad_key(&self, key: &str, what: &str) -> ModelError {
        ModelError::corrupt(&self.path, format!("metadata key {key} {what}"))
    }

    fn missing_tensor(&self, name: &str) -> ModelError {
        ModelError::corrupt(&self.path, format!("missing tensor {name}"))
    }
}

/// `bytes` of blocks of `T` from `r`, in a `Vec<T>` (so aligned for `T`).
fn read_blocks<T>(
    r: &mut impl Read,
    bytes: usize,
) -> candle_core::Result<Box<dyn candle_core::quantized::QuantizedType>>
where
    T: candle_core::quantized::k_quants::GgmlType + Send + Sync + 'static,
{
    let n = bytes / std::mem::size_of::<T>();
    let mut blocks = vec![T::zeros(); n];
    // SAFETY: the block types are plain old data (integers, f16/f32) for which any bytes are
    // a valid value; the slice covers exactly the vector's initialised elements.
    let raw = unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), n * size_of::<T>())
    };
    r.read_exact(raw)?;
    Ok(Box::new(blocks))
}
