//! Reading a GGUF file with errors that name the file and the missing or malformed piece.

use std::fs::File;
use std::io::BufReader;
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
    pub progress: Option<crate::model::LoadProgress>,
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
            let elems = info.shape.elem_count();
            if elems % block != 0 {
                return Err(ModelError::corrupt(
                    path,
                    format!("tensor {name} has {elems} elements, not a multiple of {block}"),
                ));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            tensor_bytes += bytes;
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
        let t = self
            .content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| ModelError::corrupt(&self.path, format!("tensor {name}: {e}")))?;
        if let Some(progress) = &self.progress {
            self.read_bytes += t.storage_size_in_bytes() as u64;
            // Below 1 until the model is assembled; `Model::load` reports the final 1.
            (progress.0)(
                (self.read_bytes as f64 / self.tensor_bytes.max(1) as f64).min(0.99) as f32,
            );
        }
        if let Some(dims) = dims {
            if t.shape().dims() != dims {
                return Err(ModelError::corrupt(
                    &self.path,
                    format!(
                        "tensor {name} has shape {:?}, expected {dims:?}",
                        t.shape().dims()
                    ),
                ));
            }
        }
        Ok(t)
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
