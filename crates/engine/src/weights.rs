//! Where tensors come from: memory-mapped safetensors (single or sharded) or a GGUF
//! file. Every tensor is asked for by its HF name and checked against the shape the
//! model expects, so a bad file is reported by file and tensor, never by a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::MappedBlocks;
use crate::model::names;

/// A weight as stored: plain values, or ggml-quantized blocks.
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    /// ggml blocks left where the GGUF file is mapped.
    Mapped(Arc<MappedBlocks>),
}

impl Weight {
    /// The weight as a plain tensor of `dtype` (dequantizing when needed).
    pub fn to_dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.to_dtype(dtype)?,
            Weight::Quantized(q) => q.dequantize(device)?.to_dtype(dtype)?,
            Weight::Mapped(m) => {
                let t = m.to_qtensor()?.dequantize(device)?.to_dtype(dtype)?;
                m.release_pages();
                t
            }
        })
    }

    /// Mapped blocks as an owned `QTensor` (a copy); other weights as they are.
    pub fn owned(self) -> Result<Weight> {
        Ok(match self {
            Weight::Mapped(m) => Weight::Quantized(m.to_qtensor()?),
            w => w,
        })
    }

    /// Rows `start .. start + len` of the weight seen as a matrix `[rows, cols]`
    /// (leading dimensions flattened: expert `e` of a stacked `[experts, r, c]`
    /// is rows `e·r .. (e+1)·r`). Quantized rows are whole blocks, so they are
    /// sliced as bytes.
    pub fn rows(&self, start: usize, len: usize) -> Result<Weight> {
        match self {
            Weight::Dense(t) => {
                let cols = t.dims().last().copied().unwrap_or(1);
                let rows = t.elem_count() / cols.max(1);
                Ok(Weight::Dense(
                    t.reshape((rows, cols))?.narrow(0, start, len)?.contiguous()?,
                ))
            }
            Weight::Quantized(q) => {
                let dims = q.shape().dims();
                let cols = dims.last().copied().unwrap_or(1);
                let rows = q.shape().elem_count() / cols.max(1);
                let data = q.data()?;
                let row_bytes = data.len() / rows.max(1);
                let bytes = data[start * row_bytes..(start + len) * row_bytes].to_vec();
                let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, q.dtype())?;
                Ok(Weight::Quantized(Arc::new(QTensor::new(storage, (len, cols))?)))
            }
            Weight::Mapped(m) => m.rows(start, len).map(|m| Weight::Mapped(Arc::new(m))).ok_or_else(|| {
                candle_core::Error::Msg(format!("rows {start}..{} outside a {:?} weight", start + len, m.dims())).into()
            }),
        }
    }
}

/// A file of tensors, addressed by HF tensor names.
pub trait WeightSource {
    /// The tensor `name`, checked to have `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Weight>;
    /// Whether the file holds `name`.
    fn contains(&self, name: &str) -> bool;
}

fn shape_error(path: &Path, name: &str, expected: &[usize], found: &[usize]) -> EngineError {
    EngineError::BadTensor {
        path: path.into(),
        tensor: name.into(),
        message: format!("expected shape {expected:?}, found {found:?}"),
    }
}

/// HF-layout weights: `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`. Memory-mapped.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    device: Device,
}

impl SafetensorsSource {
    /// Finds and maps the weight files of an HF model directory.
    pub fn open_dir(dir: &Path, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::BadJson {
                path: index.clone(),
                message: e.to_string(),
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::BadConfig {
                    path: index.clone(),
                    field: "weight_map".into(),
                    message: "missing; expected an object of tensor name -> shard file".into(),
                })?;
            let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(EngineError::MissingFile {
                path: single,
                what: "no model.safetensors and no model.safetensors.index.json in the model directory".into(),
            });
        };
        Self::open_files(&paths, device)
    }

    /// Maps the given safetensors files.
    pub fn open_files(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            if !path.exists() {
                return Err(EngineError::MissingFile {
                    path: path.clone(),
                    what: "weight shard listed in the index".into(),
                });
            }
            // SAFETY: the file is mapped read-only; a model file changed under a running
            // engine is outside what we can guard against, as with every mmap loader.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| EngineError::BadFile {
                path: path.clone(),
                format: "safetensors",
                message: root_message(&e),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((path.clone(), st));
        }
        Ok(SafetensorsSource {
            files,
            routing,
            device: device.clone(),
        })
    }

    /// The files behind this source.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }
}

/// The innermost message of a candle error, without its backtrace noise.
fn root_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_message(inner),
        candle_core::Error::WithBacktrace { inner, .. } => root_message(inner),
        candle_core::Error::Context { inner, .. } => root_message(inner),
        other => other.to_string(),
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let Some(&i) = self.routing.get(name) else {
            let path = self.files.first().map(|(p, _)| p.clone()).unwrap_or_default();
            return Err(EngineError::BadTensor {
                path,
                tensor: name.into(),
                message: "missing from the weight files".into(),
            });
        };
        let (path, st) = &self.files[i];
        let view = st.get(name).map_err(|e| EngineError::BadTensor {
            path: path.clone(),
            tensor: name.into(),
            message: root_message(&e),
        })?;
        if view.shape() != shape {
            return Err(shape_error(path, name, shape, view.shape()));
        }
        let t = st.load(name, &self.device).map_err(|e| EngineError::BadTensor {
            path: path.clone(),
            tensor: name.into(),
            message: root_message(&e),
        })?;
        Ok(Weight::Dense(t))
    }

    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

/// A GGUF file: metadata, and tensors kept in their quantized form.
pub struct GgufSource {
    path: PathBuf,
    pub content: gguf_file::Content,
    mmap: Arc<memmap2::Mmap>,
    device: Device,
    /// The family and its q and kv heads, once `config` has read them: the
    /// tensor names and llama.cpp's q/k row order depend on them.
    arch: Option<(Arch, usize, usize)>,
}

impl GgufSource {
    /// Reads the header and maps the file.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| EngineError::BadFile {
            path: path.into(),
            format: "GGUF",
            message: root_message(&e),
        })?;
        // SAFETY: read-only mapping of a model file; see SafetensorsSource.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        Ok(GgufSource {
            path: path.into(),
            content,
            mmap: Arc::new(mmap),
            device: device.clone(),
            arch: None,
        })
    }

    /// The model shape described by the metadata.
    pub fn config(&mut self) -> Result<ModelConfig> {
        let cfg = ModelConfig::from_gguf(&self.content, &self.path)?;
        self.arch = Some((cfg.arch, cfg.num_heads, cfg.num_kv_heads));
        Ok(cfg)
    }

    /// The GGUF name of an HF tensor name.
    fn gguf_name(&self, name: &str) -> String {
        let arch = self.arch.map_or(Arch::Llama, |a| a.0);
        names::gguf_name(arch, name).unwrap_or_else(|| name.into())
    }

    /// Size in bytes of the tensor data of the file.
    pub fn tensor_bytes(&self, hf_name: &str) -> Option<usize> {
        let info = self.content.tensor_infos.get(&self.gguf_name(hf_name))?;
        let d = info.ggml_dtype;
        Some(info.shape.elem_count() / d.block_size() * d.type_size())
    }
}

impl WeightSource for GgufSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let gname = self.gguf_name(name);
        let info = self
            .content
            .tensor_infos
            .get(&gname)
            .ok_or_else(|| EngineError::BadTensor {
                path: self.path.clone(),
                tensor: gname.clone(),
                message: "missing from the GGUF file".into(),
            })?;
        let dims = info.shape.dims();
        if dims != shape {
            return Err(shape_error(&self.path, &gname, shape, dims));
        }
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count();
        if elems % dtype.block_size() != 0 {
            return Err(EngineError::BadTensor {
                path: self.path.clone(),
                tensor: gname,
                message: format!("{elems} elements is not a whole number of {dtype:?} blocks"),
            });
        }
        let size = elems / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        let bytes = self
            .mmap
            .get(start..start + size)
            .ok_or_else(|| EngineError::BadTensor {
                path: self.path.clone(),
                tensor: gname.clone(),
                message: format!(
                    "needs bytes {start}..{} but the file has {} (truncated?)",
                    start + size,
                    self.mmap.len()
                ),
            })?;
        let permuted;
        let heads = self
            .arch
            .and_then(|(arch, h, kv)| names::permuted_heads(arch, name, h, kv));
        let quantized = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if quantized && heads.is_none() && self.device.is_cpu() {
            // Left in the file: the model reads these blocks where they are mapped.
            if let Some(m) = MappedBlocks::new(self.mmap.clone(), start, size, dtype, dims) {
                return Ok(Weight::Mapped(Arc::new(m)));
            }
        }
        let bytes = match heads {
            Some(h) => {
                permuted = names::unpermute_rows(bytes, dims[0], h);
                &permuted[..]
            }
            None => bytes,
        };
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &self.device, dtype)?;
        crate::kernels::release_mapped(&self.mmap, start, size);
        let q = QTensor::new(storage, dims)?;
        let shift = self.arch.and_then(|(arch, _, _)| names::shifted_norm(arch, name));
        Ok(match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let t = q.dequantize(&self.device)?;
                // llama.cpp stores gemma's norms as 1 + w; the model takes HF's w.
                Weight::Dense(match shift {
                    Some(s) => t.affine(1.0, -f64::from(s))?,
                    None => t,
                })
            }
            _ => Weight::Quantized(Arc::new(q)),
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(&self.gguf_name(name))
    }
}

impl SafetensorsSource {
    /// Total bytes of all tensors (for reporting).
    pub fn total_bytes(&self) -> usize {
        self.files
            .iter()
            .flat_map(|(_, st)| st.tensors())
            .map(|(_, v)| v.data().len())
            .sum()
    }
}

/// HF-layout weights saved by PyTorch: `pytorch_model.bin`, or the shards listed
/// in `pytorch_model.bin.index.json`. The pickles are checked and read (see
/// [`crate::torch_bin`]); the tensor data is memory-mapped, as for safetensors.
pub struct TorchBinSource {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    routing: HashMap<String, (usize, crate::torch_bin::BinTensor)>,
    device: Device,
}

impl TorchBinSource {
    /// Reads the given `.bin` files' pickles and maps their data.
    pub fn open_files(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let tensors = crate::torch_bin::read_bin(path)?;
            let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
            // SAFETY: read-only mapping of a model file; see SafetensorsSource.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
            for t in tensors {
                routing.insert(t.name.clone(), (i, t));
            }
            files.push((path.clone(), mmap));
        }
        Ok(TorchBinSource {
            files,
            routing,
            device: device.clone(),
        })
    }

    /// The files behind this source.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }
}

impl WeightSource for TorchBinSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let Some((i, t)) = self.routing.get(name) else {
            let path = self.files.first().map(|(p, _)| p.clone()).unwrap_or_default();
            return Err(EngineError::BadTensor {
                path,
                tensor: name.into(),
                message: "missing from the weight files".into(),
            });
        };
        let (path, mmap) = &self.files[*i];
        if t.shape != shape {
            return Err(shape_error(path, name, shape, &t.shape));
        }
        let (start, end) = (t.offset as usize, (t.offset + t.len) as usize);
        let bytes = mmap.get(start..end).ok_or_else(|| EngineError::BadTensor {
            path: path.clone(),
            tensor: name.into(),
            message: format!(
                "needs bytes {start}..{end} but the file has {} (truncated?)",
                mmap.len()
            ),
        })?;
        let tensor =
            Tensor::from_raw_buffer(bytes, t.dtype, &t.shape, &self.device).map_err(|e| EngineError::BadTensor {
                path: path.clone(),
                tensor: name.into(),
                message: root_message(&e),
            })?;
        Ok(Weight::Dense(tensor))
    }

    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}
