//! Where tensors come from: memory-mapped safetensors (single or sharded) or a GGUF
//! file. Every tensor is asked for by its HF name and checked against the shape the
//! model expects, so a bad file is reported by file and tensor, never by a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};

/// A weight as stored: plain values, or ggml-quantized blocks.
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// The weight as a plain tensor of `dtype` (dequantizing when needed).
    pub fn to_dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.to_dtype(dtype)?,
            Weight::Quantized(q) => q.dequantize(device)?.to_dtype(dtype)?,
        })
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
    mmap: memmap2::Mmap,
    device: Device,
    /// Heads of q and kv, to undo llama.cpp's row permutation of q/k weights.
    heads: Option<(usize, usize)>,
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
            mmap,
            device: device.clone(),
            heads: None,
        })
    }

    /// Drops the mapped pages of a tensor that has been copied out, so the file's
    /// pages and their copy are not both counted while the model loads (the page
    /// cache keeps them; a later read maps them again).
    fn release_pages(&self, start: usize, len: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let from = start / PAGE * PAGE;
            let to = (start + len).div_ceil(PAGE) * PAGE;
            let to = to.min(self.mmap.len());
            if to > from {
                // SAFETY: the mapping is read-only and file-backed; after DONTNEED a
                // read faults the same file bytes in again, so no slice changes.
                let _ = unsafe {
                    self.mmap
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
                };
            }
        }
    }

    fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    /// The model shape described by the metadata.
    pub fn config(&mut self) -> Result<ModelConfig> {
        let arch_name = self
            .meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(EngineError::UnsupportedArchitecture {
                    path: self.path.clone(),
                    arch: other.into(),
                })
            }
        };
        let path = self.path.clone();
        let get_u = |k: &str| -> Result<usize> {
            let key = format!("{arch_name}.{k}");
            self.meta(&key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::BadConfig {
                    path: path.clone(),
                    field: key,
                    message: "missing or not an integer".into(),
                })
        };
        let get_f = |k: &str| -> Option<f64> {
            self.meta(&format!("{arch_name}.{k}"))
                .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
        };
        let hidden = get_u("embedding_length")?;
        let heads = get_u("attention.head_count")?;
        let kv_heads = get_u("attention.head_count_kv").unwrap_or(heads);
        let vocab = get_u("vocab_size").ok().or_else(|| {
            self.meta("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
        });
        let head_dim = get_u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let rope_scaling = match self
            .meta(&format!("{arch_name}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("linear") => RopeScaling::Linear {
                factor: get_f("rope.scaling.factor").unwrap_or(1.0),
            },
            _ => RopeScaling::None,
        };
        let id = |k: &str| self.meta(k).and_then(|v| v.to_u32().ok());
        let cfg = ModelConfig {
            arch,
            vocab_size: vocab.ok_or_else(|| EngineError::BadConfig {
                path: path.clone(),
                field: format!("{arch_name}.vocab_size"),
                message: "missing, and no tokenizer.ggml.tokens to count".into(),
            })?,
            hidden_size: hidden,
            intermediate_size: get_u("feed_forward_length")?,
            num_layers: get_u("block_count")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        // Only llama-style conversions permute q/k; qwen2 keeps HF's row order.
        self.heads = (arch != Arch::Qwen2).then_some((heads, kv_heads));
        Ok(cfg)
    }

    /// The GGUF name of an HF tensor name.
    fn gguf_name(name: &str) -> String {
        let fixed = match name {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return f.into();
        }
        if let Some(rest) = name.strip_prefix("model.layers.") {
            if let Some((layer, tail)) = rest.split_once('.') {
                let mapped = tail
                    .replace("input_layernorm", "attn_norm")
                    .replace("post_attention_layernorm", "ffn_norm")
                    .replace("self_attn.q_proj", "attn_q")
                    .replace("self_attn.k_proj", "attn_k")
                    .replace("self_attn.v_proj", "attn_v")
                    .replace("self_attn.o_proj", "attn_output")
                    .replace("mlp.gate_proj", "ffn_gate")
                    .replace("mlp.up_proj", "ffn_up")
                    .replace("mlp.down_proj", "ffn_down");
                return format!("blk.{layer}.{mapped}");
            }
        }
        name.into()
    }

    /// Size in bytes of the tensor data of the file.
    pub fn tensor_bytes(&self, hf_name: &str) -> Option<usize> {
        let info = self.content.tensor_infos.get(&Self::gguf_name(hf_name))?;
        let d = info.ggml_dtype;
        Some(info.shape.elem_count() / d.block_size() * d.type_size())
    }
}

/// llama.cpp stores q/k rows interleaved per head for its RoPE; put them back in HF
/// order so that one RoPE implementation serves both formats. Rows are whole
/// quantized blocks, so this works on the raw bytes.
fn unpermute_rows(data: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

impl WeightSource for GgufSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let gname = Self::gguf_name(name);
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
        let bytes = match (self.heads, name) {
            (Some((h, _)), n) if n.ends_with("q_proj.weight") || n.ends_with("q_proj.bias") => {
                permuted = unpermute_rows(bytes, dims[0], h);
                &permuted[..]
            }
            (Some((_, kv)), n) if n.ends_with("k_proj.weight") || n.ends_with("k_proj.bias") => {
                permuted = unpermute_rows(bytes, dims[0], kv);
                &permuted[..]
            }
            _ => bytes,
        };
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &self.device, dtype)?;
        self.release_pages(start, size);
        let q = QTensor::new(storage, dims)?;
        Ok(match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Weight::Dense(q.dequantize(&self.device)?),
            _ => Weight::Quantized(Arc::new(q)),
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(&Self::gguf_name(name))
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
