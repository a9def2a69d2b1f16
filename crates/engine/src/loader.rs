//! Opens a model by path: an HF-layout directory or a single `.gguf` file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{Model, WeightDType};
use crate::tokenizer::Tokenizer;
use crate::torch_bin::{find_weight_files, WeightFiles};
use crate::weights::{GgufSource, SafetensorsSource, TorchBinSource};

/// Sampling defaults a model ships with (`generation_config.json`).
#[derive(Debug, Clone, Default)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub eos_token_ids: Vec<u32>,
}

/// A model with everything needed to talk to it.
pub struct LoadedModel {
    pub model: Model,
    /// Absent for weight-only directories (no `tokenizer.json`).
    pub tokenizer: Option<Tokenizer>,
    pub defaults: GenerationDefaults,
    /// A short name: the directory or file name.
    pub name: String,
    pub path: PathBuf,
    /// The format the weights came in, e.g. "safetensors bf16" or "gguf Q4_1".
    pub format: String,
    pub load_seconds: f64,
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub dtype: WeightDType,
}

impl LoadedModel {
    /// Loads a model directory or GGUF file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let started = Instant::now();
        large_allocations_return_to_the_system_once();
        let device = Device::Cpu;
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::MissingFile {
                path: path.into(),
                what: "model path: expected an HF model directory or a .gguf file".into(),
            },
            _ => EngineError::io(path, e),
        })?;
        let mut loaded = if meta.is_dir() {
            Self::load_dir(path, opts, &device)?
        } else {
            Self::load_gguf(path, opts, &device)?
        };
        loaded.load_seconds = started.elapsed().as_secs_f64();
        Ok(loaded)
    }

    fn load_dir(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(EngineError::MissingFile {
                path: config_path,
                what: "an HF model directory needs config.json".into(),
            });
        }
        let mut cfg = ModelConfig::from_hf_file(&config_path)?;
        let defaults = read_generation_config(&dir.join("generation_config.json"))?;
        let tokenizer = if dir.join("tokenizer.json").exists() || dir.join("tokenizer.model").exists() {
            Some(Tokenizer::from_hf_dir(dir)?)
        } else {
            None
        };
        merge_eos(&mut cfg, &defaults, tokenizer.as_ref());
        let dense = match opts.dtype {
            WeightDType::Auto | WeightDType::F32 => DType::F32,
            WeightDType::F16 => DType::F16,
            WeightDType::BF16 => DType::BF16,
        };
        let files = find_weight_files(dir)?;
        let n = files.paths().len();
        let (kind, model) = match &files {
            WeightFiles::Safetensors(paths) => {
                let src = SafetensorsSource::open_files(paths, device)?;
                ("safetensors", Model::load(cfg, &src, Some(dense), device)?)
            }
            WeightFiles::Bin(paths) => {
                let src = TorchBinSource::open_files(paths, device)?;
                ("PyTorch .bin", Model::load(cfg, &src, Some(dense), device)?)
            }
        };
        let format = format!("{kind} ({n} file{})", if n == 1 { "" } else { "s" });
        Ok(LoadedModel {
            model,
            tokenizer,
            defaults,
            name: file_name(dir),
            path: dir.into(),
            format,
            load_seconds: 0.0,
        })
    }

    fn load_gguf(path: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let mut src = GgufSource::open(path, device)?;
        let mut cfg = src.config()?;
        if let Some(scaling) = llama3_rope_from_gguf(&src.content.metadata) {
            cfg.rope_scaling = scaling;
        }
        // A GGUF written from a weight-only directory has no vocabulary.
        let tokenizer = if src.content.metadata.contains_key("tokenizer.ggml.tokens") {
            Some(Tokenizer::from_gguf(&src.content, path)?)
        } else {
            None
        };
        let defaults = GenerationDefaults::default();
        merge_eos(&mut cfg, &defaults, tokenizer.as_ref());
        let dense = match opts.dtype {
            WeightDType::Auto => None,
            WeightDType::F32 => Some(DType::F32),
            WeightDType::F16 => Some(DType::F16),
            WeightDType::BF16 => Some(DType::BF16),
        };
        let qtype = src
            .content
            .tensor_infos
            .get("blk.0.attn_q.weight")
            .map(|i| format!("{:?}", i.ggml_dtype))
            .unwrap_or_default();
        let model = Model::load(cfg, &src, dense, device)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            defaults,
            name: file_name(path),
            path: path.into(),
            format: format!("gguf {qtype}{}", if dense.is_some() { " (dequantized)" } else { "" }),
            load_seconds: 0.0,
        })
    }

    /// The tokenizer, or a clear error for weight-only directories.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            EngineError::Tokenizer(format!(
                "{} has no tokenizer (no tokenizer.json, or a GGUF without a vocabulary): give prompts as token ids",
                self.path.display()
            ))
        })
    }
}

/// Metadata prefix under which `vicugna convert` keeps Llama 3 RoPE scaling
/// (`.factor`, `.low_freq_factor`, `.high_freq_factor`,
/// `.original_max_position_embeddings`): llama.cpp takes the scaling as the
/// `rope_freqs.weight` divisors and ignores these keys.
pub const LLAMA3_ROPE_KEY: &str = "vicugna.rope.llama3";

/// Llama 3 RoPE scaling written by `vicugna convert`, when the GGUF has it.
fn llama3_rope_from_gguf(
    md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
) -> Option<crate::config::RopeScaling> {
    let f = |k: &str| md.get(&format!("{LLAMA3_ROPE_KEY}.{k}"))?.to_f32().ok().map(f64::from);
    Some(crate::config::RopeScaling::Llama3 {
        factor: f("factor")?,
        low_freq_factor: f("low_freq_factor")?,
        high_freq_factor: f("high_freq_factor")?,
        original_max_position_embeddings: f("original_max_position_embeddings")?,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// End-of-sequence ids from every place a model declares them.
fn merge_eos(cfg: &mut ModelConfig, defaults: &GenerationDefaults, tok: Option<&Tokenizer>) {
    let mut ids = cfg.eos_token_ids.clone();
    ids.extend(&defaults.eos_token_ids);
    if let Some(t) = tok {
        ids.extend(t.eos_ids().iter().copied());
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    cfg.eos_token_ids = ids;
}

fn read_generation_config(path: &Path) -> Result<GenerationDefaults> {
    if !path.exists() {
        return Ok(GenerationDefaults::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::BadJson {
        path: path.into(),
        message: e.to_string(),
    })?;
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).map(|x| x as f32);
    Ok(GenerationDefaults {
        temperature: f("temperature"),
        top_p: f("top_p"),
        top_k: v.get("top_k").and_then(|x| x.as_u64()).map(|x| x as usize),
        repetition_penalty: f("repetition_penalty"),
        eos_token_ids: v
            .get("eos_token_id")
            .map(crate::config::ids_from_json)
            .unwrap_or_default(),
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mmap_threshold(bytes: i32) {
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold(_bytes: i32) {}

/// While alive, freed memory stays with the process for reuse instead of being
/// returned to the system.
///
/// Training allocates and frees the same large activation and gradient buffers
/// every step. With each one its own mapping, the kernel zeroes every page
/// again on first touch: on a 135M model a third of a training step's time was
/// page faults. Dropping the guard returns what is free and restores the
/// inference setting of [`LoadedModel::load`].
pub struct ReuseFreedMemory(());

impl ReuseFreedMemory {
    pub fn new() -> Self {
        large_allocations_return_to_the_system_once();
        // glibc's ceiling for the mapping threshold (64-bit): 32 MiB.
        set_mmap_threshold(32 << 20);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
        ReuseFreedMemory(())
    }
}

impl Default for ReuseFreedMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ReuseFreedMemory {
    fn drop(&mut self) {
        set_mmap_threshold(256 << 10);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above; malloc_trim only returns free memory.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
            libc::malloc_trim(0);
        }
    }
}

/// Makes glibc serve every allocation of 256 KiB or more with its own mapping,
/// returned to the system when freed.
///
/// Loading copies each quantized tensor and repacks it, freeing the copy; by
/// default glibc then raises its mapping threshold to the largest freed block (the
/// 30 MB vocabulary matrix), so later buffers (weights, prompt attention's
/// per-layer copies) come from the heap, whose freed holes stay resident: about
/// 20 MB more peak memory at a 2K context. A fixed threshold keeps memory at what
/// is live.
fn large_allocations_return_to_the_system_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // Once, before the first model's buffers exist.
    ONCE.call_once(|| set_mmap_threshold(256 << 10));
}
