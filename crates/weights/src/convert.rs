//! `convert`: dtype changes of HF checkpoints, HF safetensors -> GGUF (llama
//! family, tokenizer and chat template in the metadata, optional quantization to
//! Q8_0 / Q4_0 / Q4_K), and GGUF -> HF safetensors (dequantized).
//!
//! GGUF conventions follow llama.cpp's `convert_hf_to_gguf.py`: llama.cpp names,
//! q/k rows permuted per head for its RoPE (not for qwen2), norms kept in F32, and
//! a `gpt2` (byte-level BPE) vocabulary with merges, token types and special ids.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use vicugna_engine::config::{Arch, ModelConfig, RopeScaling};
use vicugna_engine::model::names;
use vicugna_engine::weights::{GgufSource, WeightSource};

use crate::atomic_output::{copy_side_files, set_config_dtype, AtomicOutput};
use crate::delta::{JobOptions, JobReport};
use crate::elementwise::encode;
use crate::error::{Result, WeightsError};
use crate::gguf_write::{GgufTensor, GgufWriter, Meta};
use crate::safetensors_io::TensorInfo;
use crate::safetensors_io::{drop_page_cache, verify_checkpoint, Checkpoint, Float, OutTensor, ShardedWriter};
use crate::{copy_tensor, Progress};

/// f32 elements per chunk when writing a GGUF tensor.
const CONVERT_CHUNK: usize = 1 << 22;

/// ggml quantization a GGUF output can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Q8_0,
    Q4_0,
    /// Q4_K everywhere.
    Q4K,
    /// llama.cpp's Q4_K_M recipe: Q4_K, with Q6_K for the output matrix (the
    /// embedding where it is tied) and for `attn_v` / `ffn_down` in the first and
    /// last eighth of the layers and every third layer between.
    Q4KM,
}

impl Quant {
    /// Parses `q8_0`, `q4_0`, `q4_k`, `q4_k_m` (any case).
    pub fn parse(s: &str) -> Option<Quant> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Some(Quant::Q8_0),
            "q4_0" => Some(Quant::Q4_0),
            "q4_k" | "q4k" | "q4_k_s" => Some(Quant::Q4K),
            "q4_k_m" => Some(Quant::Q4KM),
            _ => None,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4_0 => GgmlDType::Q4_0,
            Quant::Q4K | Quant::Q4KM => GgmlDType::Q4K,
        }
    }

    /// The block type of GGUF tensor `name` (of `layers` layers; `tied`: the
    /// embedding is also the output matrix) under this recipe.
    fn for_tensor(self, name: &str, layers: usize, tied: bool) -> GgmlDType {
        if self != Quant::Q4KM {
            return self.ggml();
        }
        if name == "output.weight" || (tied && name == "token_embd.weight") {
            return GgmlDType::Q6K;
        }
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)));
        match layer {
            Some((i, rest)) if rest.starts_with("attn_v.") || rest.starts_with("ffn_down.") => {
                // llama.cpp's `use_more_bits`.
                let more = i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2;
                if more {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                }
            }
            _ => GgmlDType::Q4K,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            Quant::Q8_0 => 7,
            Quant::Q4_0 => 2,
            Quant::Q4K => 14,
            Quant::Q4KM => 15,
        }
    }
}

/// Options of `convert`.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    pub job: JobOptions,
    pub quant: Option<Quant>,
}

/// Converts `input` (an HF directory or a `.gguf` file) to `output` (a directory,
/// or a file ending in `.gguf`).
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions, progress: &dyn Progress) -> Result<JobReport> {
    let in_gguf = input.extension().is_some_and(|e| e == "gguf");
    let out_gguf = output.extension().is_some_and(|e| e == "gguf");
    match (in_gguf, out_gguf) {
        (false, false) => {
            if opts.quant.is_some() {
                return Err(WeightsError::Unsupported(format!(
                    "{}: quantized weights are written as GGUF; give an output path ending in .gguf",
                    output.display()
                )));
            }
            hf_to_hf(input, output, &opts.job, progress)
        }
        (false, true) => hf_to_gguf(input, output, opts, progress),
        (true, false) => {
            if opts.quant.is_some() {
                return Err(WeightsError::Unsupported(
                    "--quant applies to GGUF output; GGUF -> HF dequantizes".into(),
                ));
            }
            gguf_to_hf(input, output, &opts.job, progress)
        }
        (true, true) => Err(WeightsError::Unsupported(format!(
            "{} -> {}: GGUF to GGUF is not supported; convert to an HF directory first",
            input.display(),
            output.display()
        ))),
    }
}

fn hf_to_hf(input: &Path, output: &Path, opts: &JobOptions, progress: &dyn Progress) -> Result<JobReport> {
    let dtype = opts.dtype.ok_or_else(|| {
        WeightsError::Unsupported("HF -> HF conversion changes the dtype: pass --dtype f32, f16 or bf16".into())
    })?;
    let ck = Checkpoint::open_dir(input)?;
    let outs: Vec<OutTensor> = ck
        .tensors
        .iter()
        .map(|t| {
            let dt = if t.float().is_some() {
                dtype.as_str().to_string()
            } else {
                t.dtype.clone()
            };
            OutTensor {
                name: t.name.clone(),
                dtype: dt,
                shape: t.shape.clone(),
            }
        })
        .collect();
    let out = AtomicOutput::dir(output)?;
    let mut writer = ShardedWriter::new(out.path(), outs.clone(), opts.max_shard_bytes, opts.verify);
    out.check_space(writer.total_bytes())?;
    let total: u64 = outs.iter().map(OutTensor::len).sum();
    progress.start("convert", total);
    for t in &ck.tensors {
        writer.begin(&t.name)?;
        if t.float().is_some() {
            copy_tensor(&ck, t, dtype, &mut writer, progress)?;
        } else {
            let mut buf = vec![0u8; t.len as usize];
            ck.read_bytes(t, 0, &mut buf)?;
            writer.write(&buf)?;
        }
        writer.end()?;
    }
    let sums = writer.finish()?;
    progress.finish();
    let side_files = copy_side_files(input, out.path())?;
    set_config_dtype(out.path(), dtype.torch_name())?;
    if opts.verify {
        verify_checkpoint(out.path(), &sums, progress)?;
    }
    let shards = crate::safetensors_io::plan_shards(&outs, opts.max_shard_bytes.max(1)).len();
    out.commit()?;
    Ok(JobReport {
        tensors: outs.len(),
        bytes: total,
        shards,
        verified: opts.verify,
        side_files,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| WeightsError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| WeightsError::BadFile {
        path: path.into(),
        format: "JSON",
        message: e.to_string(),
    })
}

/// `tokenizer.ggml.pre` of a byte-level BPE tokenizer.json, from its pre-tokenizer.
fn pre_tokenizer_name(pre: &Value, path: &Path) -> Result<&'static str> {
    let text = pre.to_string();
    let byte_level = text.contains("\"ByteLevel\"");
    if !byte_level {
        return Err(WeightsError::Unsupported(format!(
            "{}: pre_tokenizer without ByteLevel; GGUF export supports byte-level BPE (gpt2-style) tokenizers",
            path.display()
        )));
    }
    if pre.get("type").and_then(Value::as_str) == Some("ByteLevel") {
        return Ok("gpt-2");
    }
    if text.contains("\"Digits\"") && text.contains("\"individual_digits\":true") && !text.contains("\"Split\"") {
        return Ok("smollm");
    }
    // The same split as the engine writes it back from a GGUF: digits one by one,
    // then GPT-2's regex.
    if text.contains(r#"{"Regex":"\\p{N}"}"#) {
        return Ok("smollm");
    }
    if text.contains(r"\\p{N}{1,3}") {
        return Ok("llama-bpe");
    }
    if text.contains(r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|") {
        return Ok("qwen2");
    }
    Err(WeightsError::Unsupported(format!(
        "{}: this pre-tokenizer has no llama.cpp name vicugna knows (gpt-2, smollm, llama-bpe, qwen2)",
        path.display()
    )))
}

/// Tokenizer and chat template as GGUF metadata (`tokenizer.ggml.*`), padded with
/// unused tokens up to `n_vocab` rows of the embedding, as llama.cpp's converter does.
fn tokenizer_metadata(dir: &Path, config: &Value, n_vocab: usize) -> Result<Vec<(String, Meta)>> {
    let path = dir.join("tokenizer.json");
    let sp_path = dir.join("tokenizer.model");
    // LLaMA-era checkpoints: the SentencePiece model is the vocabulary (a
    // tokenizer.json beside it, if any, is HF's conversion of it).
    if sp_path.is_file() {
        let sp_style = !path.is_file() || read_json(&path)?.pointer("/model/byte_fallback") == Some(&json!(true));
        if sp_style {
            return sentencepiece_metadata(dir, &sp_path, config, n_vocab);
        }
    }
    if !path.is_file() {
        return Err(WeightsError::MissingFile {
            path,
            what: "missing; a GGUF carries the tokenizer, so the HF directory needs tokenizer.json".into(),
        });
    }
    let tj = read_json(&path)?;
    let bad = |field: &str, message: &str| WeightsError::BadConfig {
        path: path.clone(),
        field: field.into(),
        message: message.into(),
    };
    let model = tj.get("model").ok_or_else(|| bad("model", "missing"))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") || model.get("byte_fallback") == Some(&json!(true)) {
        return Err(WeightsError::Unsupported(format!(
            "{}: GGUF export supports byte-level BPE tokenizers (gpt2-style, e.g. SmolLM2, Qwen2, Llama 3); \
             this one is {} with byte_fallback {}",
            path.display(),
            model.get("type").and_then(Value::as_str).unwrap_or("?"),
            model.get("byte_fallback").unwrap_or(&json!(false))
        )));
    }
    let pre = pre_tokenizer_name(tj.get("pre_tokenizer").unwrap_or(&Value::Null), &path)?;
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("model.vocab", "missing"))?;
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad("model.vocab", "ids must be integers"))? as usize;
        by_id.insert(id, (tok.clone(), 1));
    }
    for a in tj.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Value::as_u64),
            a.get("content").and_then(Value::as_str),
        ) else {
            continue;
        };
        let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
        by_id.insert(id as usize, (content.into(), if special { 3 } else { 4 }));
    }
    let n_tok = by_id.keys().max().map_or(0, |m| m + 1);
    if n_tok > n_vocab {
        return Err(WeightsError::Mismatch {
            what: "tokenizer and embedding".into(),
            count: 1,
            list: format!(
                "  {} has {n_tok} tokens but the embedding has {n_vocab} rows",
                path.display()
            ),
        });
    }
    let (mut tokens, mut types) = (Vec::with_capacity(n_vocab), Vec::with_capacity(n_vocab));
    for i in 0..n_vocab {
        match by_id.get(&i) {
            Some((t, ty)) => {
                tokens.push(t.clone());
                types.push(*ty);
            }
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(5);
            }
        }
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("model.merges", "missing"))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad("model.merges", "expected \"a b\" strings or [a, b] pairs"))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        json!({})
    };
    let id_of = |key: &str| -> Option<u32> {
        let v = tc.get(key)?;
        let s = v.as_str().or_else(|| v.get("content").and_then(Value::as_str))?;
        tokens.iter().position(|t| t == s).map(|i| i as u32)
    };
    let cfg_id = |key: &str| -> Option<u32> {
        let v = config.get(key)?;
        v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()).map(|x| x as u32)
    };
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Meta::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Meta::Strs(tokens.clone())),
        ("tokenizer.ggml.token_type".to_string(), Meta::I32s(types)),
        ("tokenizer.ggml.merges".to_string(), Meta::Strs(merges)),
    ];
    for (key, tc_key, cfg_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token", "eos_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token", ""),
        ("tokenizer.ggml.padding_token_id", "pad_token", "pad_token_id"),
    ] {
        if let Some(id) = id_of(tc_key).or_else(|| cfg_id(cfg_key)) {
            md.push((key.into(), Meta::U32(id)));
        }
    }
    let add_bos = tc.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
    md.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(add_bos)));
    if let Some(t) = chat_template(dir, &tc) {
        md.push(("tokenizer.chat_template".into(), Meta::Str(t)));
    }
    Ok(md)
}

/// Where Llama 3 RoPE scaling parameters are kept in a GGUF (see the engine's
/// GGUF loader).
pub use vicugna_engine::loader::LLAMA3_ROPE_KEY;

/// Llama 3 RoPE scaling as llama.cpp's converter writes it: one divisor per
/// frequency (1 for short wavelengths, `factor` for long ones, a smooth blend
/// between), computed in f32 as its `generate_extra_tensors` does.
fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    } = cfg.rope_scaling
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    Some(
        (0..dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / base.powf(i as f32 / dim as f32);
                let wavelen = f64::from(2.0 * std::f32::consts::PI / freq);
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor as f32
                } else {
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect(),
    )
}

/// A SentencePiece vocabulary as llama.cpp's converter writes it
/// (`tokenizer.ggml.model = llama`): pieces, scores and token types, padded with
/// unused `[PAD{i}]` entries up to the embedding's rows; special ids from
/// `tokenizer_config.json`'s strings, else `config.json`; add-bos/eos from the
/// config (SentencePiece's defaults: BOS yes, EOS no); the space prefix from the
/// model's normalizer.
fn sentencepiece_metadata(dir: &Path, sp_path: &Path, config: &Value, n_vocab: usize) -> Result<Vec<(String, Meta)>> {
    let v = vicugna_engine::tokenizer::read_sentencepiece_vocab(sp_path)?;
    if v.tokens.len() > n_vocab {
        return Err(WeightsError::Mismatch {
            what: "tokenizer and embedding".into(),
            count: 1,
            list: format!(
                "  {} has {} pieces but the embedding has {n_vocab} rows",
                sp_path.display(),
                v.tokens.len()
            ),
        });
    }
    let (mut tokens, mut scores, mut types) = (v.tokens, v.scores, v.token_types);
    for i in tokens.len()..n_vocab {
        tokens.push(format!("[PAD{i}]"));
        scores.push(-1000.0);
        types.push(5);
    }
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        json!({})
    };
    let id_of = |key: &str| -> Option<u32> {
        let v = tc.get(key)?;
        let s = v.as_str().or_else(|| v.get("content").and_then(Value::as_str))?;
        tokens.iter().position(|t| t == s).map(|i| i as u32)
    };
    let cfg_id = |key: &str| -> Option<u32> {
        let v = config.get(key)?;
        v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()).map(|x| x as u32)
    };
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens".to_string(), Meta::Strs(tokens.clone())),
        ("tokenizer.ggml.scores".to_string(), Meta::F32s(scores)),
        ("tokenizer.ggml.token_type".to_string(), Meta::I32s(types)),
    ];
    for (key, tc_key, cfg_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token", "eos_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token", ""),
        ("tokenizer.ggml.padding_token_id", "pad_token", "pad_token_id"),
    ] {
        if let Some(id) = id_of(tc_key).or_else(|| cfg_id(cfg_key)) {
            md.push((key.into(), Meta::U32(id)));
        }
    }
    let add_bos = tc.get("add_bos_token").and_then(Value::as_bool).unwrap_or(true);
    let add_eos = tc.get("add_eos_token").and_then(Value::as_bool).unwrap_or(false);
    let add_prefix = tc
        .get("add_prefix_space")
        .and_then(Value::as_bool)
        .unwrap_or(v.add_space_prefix);
    md.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(add_bos)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Meta::Bool(add_eos)));
    md.push(("tokenizer.ggml.add_space_prefix".into(), Meta::Bool(add_prefix)));
    if let Some(t) = chat_template(dir, &tc) {
        md.push(("tokenizer.chat_template".into(), Meta::Str(t)));
    }
    Ok(md)
}

/// The chat template of `tokenizer_config.json` (the default of a list), else
/// `chat_template.jinja`.
fn chat_template(dir: &Path, tc: &Value) -> Option<String> {
    match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template").and_then(Value::as_str).map(String::from)),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    }
}

/// GGUF type of an HF tensor: norms and vectors stay F32, matrices take the
/// quantization when their rows are whole blocks (else Q8_0, else the float dtype).
fn gguf_dtype(shape: &[usize], float: Float, quant: Option<GgmlDType>) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = shape[shape.len() - 1];
    let fallback = match float {
        Float::F32 => GgmlDType::F32,
        Float::F16 => GgmlDType::F16,
        Float::BF16 => GgmlDType::BF16,
    };
    match quant {
        None => fallback,
        Some(q) if cols.is_multiple_of(q.block_size()) => q,
        Some(_) if cols.is_multiple_of(32) => GgmlDType::Q8_0,
        Some(_) => fallback,
    }
}

/// Rows `row .. row + rows` of a stored tensor (seen as `[rows, cols]`): a GGUF
/// tensor is written from one or more of these (llama.cpp's experts are stacked
/// from, or split out of, HF's).
struct Segment<'a> {
    t: &'a TensorInfo,
    row: usize,
    rows: usize,
}

/// Values per row of a stored tensor: its last dimension (1 for a vector, whose
/// values are its rows).
fn row_len(t: &TensorInfo) -> usize {
    if t.shape.len() >= 2 {
        t.shape[t.shape.len() - 1].max(1)
    } else {
        1
    }
}

fn hf_to_gguf(input: &Path, output: &Path, opts: &ConvertOptions, progress: &dyn Progress) -> Result<JobReport> {
    let cfg_path = input.join("config.json");
    let cfg = ModelConfig::from_hf_file(&cfg_path)?;
    let cfg_json = read_json(&cfg_path)?;
    let ck = Checkpoint::open_dir(input)?;
    let float = opts.job.dtype.unwrap_or(Float::F16);
    let arch_name = cfg.arch.spec().gguf_arch;
    let mut problems = Vec::new();
    let mut plan = Vec::new();
    for t in &ck.tensors {
        if t.name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if t.float().is_none() {
            problems.push(format!("{}: dtype {} is not a float type", t.name, t.dtype));
            continue;
        }
        if let Some(p) = t.name.strip_suffix(".mlp.experts.gate_up_proj") {
            // transformers 5 stacks gate and up of every expert, [experts, 2·ffn,
            // hidden]; llama.cpp keeps gate and up apart, [experts, ffn, hidden].
            let (n, rows, cols) = match t.shape[..] {
                [n, rows, cols] if rows % 2 == 0 => (n, rows, cols),
                _ => {
                    problems.push(format!(
                        "{}: expected [experts, 2·ffn, hidden], found {:?}",
                        t.name, t.shape
                    ));
                    continue;
                }
            };
            let f = rows / 2;
            for (half, which) in [(0, "gate_proj"), (1, "up_proj")] {
                let hf = format!("{p}.mlp.experts.{which}");
                let segs = (0..n)
                    .map(|e| Segment {
                        t,
                        row: e * rows + half * f,
                        rows: f,
                    })
                    .collect();
                match names::gguf_name(cfg.arch, &hf) {
                    Some(g) => plan.push((g, vec![n, f, cols], segs, hf)),
                    None => problems.push(format!("{}: no llama.cpp tensor of this name", t.name)),
                }
            }
            continue;
        }
        if let Some((p, rest)) = t.name.split_once(".block_sparse_moe.experts.") {
            // transformers 4 keeps one tensor per expert (w1 gate, w3 up, w2 down);
            // llama.cpp stacks them. The stack is planned once, at expert 0.
            let (e, w) = rest.split_once('.').unwrap_or((rest, ""));
            let which = match w {
                "w1.weight" => "gate_proj",
                "w3.weight" => "up_proj",
                "w2.weight" => "down_proj",
                _ => {
                    problems.push(format!("{}: no llama.cpp tensor of this name", t.name));
                    continue;
                }
            };
            if e != "0" {
                continue;
            }
            let n = cfg.moe.map_or(0, |m| m.experts);
            let mut segs = Vec::with_capacity(n);
            for k in 0..n {
                match ck.get(&format!("{p}.block_sparse_moe.experts.{k}.{w}")) {
                    Some(x) if x.shape == t.shape => segs.push(Segment {
                        t: x,
                        row: 0,
                        rows: x.numel() / row_len(x),
                    }),
                    _ => problems.push(format!(
                        "{p}.block_sparse_moe.experts.{k}.{w}: missing or not shaped as expert 0's"
                    )),
                }
            }
            let hf = format!("{p}.mlp.experts.{which}");
            if let Some(g) = names::gguf_name(cfg.arch, &hf) {
                let mut shape = vec![n];
                shape.extend(&t.shape);
                plan.push((g, shape, segs, hf));
            }
            continue;
        }
        match names::gguf_name(cfg.arch, &t.name) {
            Some(g) => {
                let whole = vec![Segment {
                    t,
                    row: 0,
                    rows: t.numel() / row_len(t),
                }];
                plan.push((g, t.shape.clone(), whole, t.name.clone()))
            }
            None => problems.push(format!("{}: no llama.cpp tensor of this name", t.name)),
        }
    }
    if !problems.is_empty() {
        return Err(WeightsError::Mismatch {
            what: format!("tensors of {} and the GGUF llama layout", input.display()),
            count: problems.len(),
            list: problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"),
        });
    }
    let n_vocab = ck
        .get("model.embed_tokens.weight")
        .map(|t| t.shape[0])
        .unwrap_or(cfg.vocab_size);
    let a = |k: &str| format!("{arch_name}.{k}");
    let file_type = match opts.quant {
        Some(q) => q.file_type(),
        None => match float {
            Float::F32 => 0,
            Float::F16 => 1,
            Float::BF16 => 32,
        },
    };
    let name = input
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut md = vec![
        ("general.architecture".to_string(), Meta::Str(arch_name.into())),
        ("general.name".to_string(), Meta::Str(name)),
        ("general.file_type".to_string(), Meta::U32(file_type)),
        ("general.quantization_version".to_string(), Meta::U32(2)),
        (a("context_length"), Meta::U32(cfg.max_position_embeddings as u32)),
        (a("embedding_length"), Meta::U32(cfg.hidden_size as u32)),
        (a("block_count"), Meta::U32(cfg.num_layers as u32)),
        (a("feed_forward_length"), Meta::U32(cfg.intermediate_size as u32)),
        (a("attention.head_count"), Meta::U32(cfg.num_heads as u32)),
        (a("attention.head_count_kv"), Meta::U32(cfg.num_kv_heads as u32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Meta::F32(cfg.rms_norm_eps as f32),
        ),
        (a("rope.freq_base"), Meta::F32(cfg.rope_theta as f32)),
        (a("rope.dimension_count"), Meta::U32(cfg.head_dim as u32)),
        (a("vocab_size"), Meta::U32(n_vocab as u32)),
    ];
    if let Some(w) = cfg
        .sliding_window
        .filter(|_| (0..cfg.num_layers).any(|l| cfg.window_of(l).is_some()))
    {
        md.push((a("attention.sliding_window"), Meta::U32(w as u32)));
    }
    if let Some(m) = cfg.moe {
        md.push((a("expert_count"), Meta::U32(m.experts as u32)));
        md.push((a("expert_used_count"), Meta::U32(m.per_token as u32)));
    }
    if cfg.arch == Arch::Gemma3 {
        // llama.cpp fixes gemma3's layer pattern, local RoPE base and query scale;
        // a checkpoint that differs would run differently there.
        let pattern_ok = (0..cfg.num_layers).all(|l| cfg.window_of(l).is_some() == ((l + 1) % 6 != 0));
        let local_ok = cfg
            .local_rope
            .as_ref()
            .is_none_or(|(t, s)| *t == 10000.0 && *s == RopeScaling::None);
        let scale_ok = (cfg.attn_scale * (cfg.head_dim as f64).sqrt() - 1.0).abs() < 1e-9;
        if !(pattern_ok && local_ok && scale_ok) {
            return Err(WeightsError::Unsupported(format!(
                "{}: this gemma3 differs from what llama.cpp assumes (5 sliding layers then 1 global, local RoPE base 10000, query_pre_attn_scalar = head_dim)",
                cfg_path.display()
            )));
        }
    }
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        md.push((a("attention.key_length"), Meta::U32(cfg.head_dim as u32)));
        md.push((a("attention.value_length"), Meta::U32(cfg.head_dim as u32)));
    }
    match cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            md.push((a("rope.scaling.type"), Meta::Str("linear".into())));
            md.push((a("rope.scaling.factor"), Meta::F32(factor as f32)));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            // llama.cpp takes Llama 3's scaling as per-frequency divisors
            // (`rope_freqs.weight`, written below); the parameters themselves go
            // under vicugna's own keys, which llama.cpp ignores, so vicugna reads
            // the GGUF back exactly.
            for (k, v) in [
                ("factor", factor),
                ("low_freq_factor", low_freq_factor),
                ("high_freq_factor", high_freq_factor),
                ("original_max_position_embeddings", original_max_position_embeddings),
            ] {
                md.push((format!("{LLAMA3_ROPE_KEY}.{k}"), Meta::F32(v as f32)));
            }
        }
    }
    // A weight-only directory (no tokenizer.json) gives a GGUF without a
    // vocabulary, as the directory itself is: prompts are then given as ids.
    if ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]
        .iter()
        .any(|f| input.join(f).is_file())
    {
        md.extend(tokenizer_metadata(input, &cfg_json, n_vocab)?);
    }

    let mut tensors: Vec<GgufTensor> = plan
        .iter()
        .map(|(g, shape, _, _)| GgufTensor {
            name: g.clone(),
            shape: shape.clone(),
            dtype: gguf_dtype(
                shape,
                float,
                opts.quant.map(|q| {
                    q.for_tensor(
                        g,
                        cfg.num_layers,
                        cfg.tie_word_embeddings || ck.get("lm_head.weight").is_none(),
                    )
                }),
            ),
        })
        .collect();
    let rope_freqs = llama3_rope_factors(&cfg);
    if let Some(f) = &rope_freqs {
        tensors.push(GgufTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![f.len()],
            dtype: GgmlDType::F32,
        });
    }
    let out = AtomicOutput::file(output)?;
    let total: u64 = tensors.iter().map(GgufTensor::len).sum();
    out.check_space(total + (1 << 20))?;
    let mut w = GgufWriter::create(out.path(), &md, tensors.clone())?;
    progress.start(if opts.quant.is_some() { "quantize" } else { "convert" }, total);
    let mut sums = Vec::new();
    let device = Device::Cpu;
    let mut bytes = Vec::new();
    let mut scratch = Vec::new();
    for ((g, _, segs, hf), gt) in plan.iter().zip(&tensors) {
        let permute_heads = names::permuted_heads(cfg.arch, hf, cfg.num_heads, cfg.num_kv_heads);
        let shift = names::shifted_norm(cfg.arch, hf);
        let mut hasher = opts.job.verify.then(Sha256::new);
        w.begin(g)?;
        for seg in segs {
            let t = seg.t;
            // Whole rows at a time (quantization blocks never cross rows); q/k are
            // permuted across rows, so they are taken whole (they are small).
            let cols = row_len(t);
            let rows_per_chunk = match permute_heads {
                Some(_) => seg.rows,
                None => (CONVERT_CHUNK / cols.max(1)).clamp(1, seg.rows.max(1)),
            };
            let mut row = 0;
            while row < seg.rows {
                let n = rows_per_chunk.min(seg.rows - row);
                let mut v = vec![0f32; n * cols];
                ck.read_f32(t, (seg.row + row) * cols, &mut v, &mut scratch)?;
                if let Some(h) = permute_heads {
                    v = names::permute_rows(&v, seg.rows, h);
                }
                // llama.cpp stores gemma's norms as 1 + w.
                if let Some(s) = shift {
                    v.iter_mut().for_each(|x| *x += s);
                }
                match gt.dtype {
                    GgmlDType::F32 => encode(Float::F32, &v, &mut bytes),
                    GgmlDType::F16 => encode(Float::F16, &v, &mut bytes),
                    GgmlDType::BF16 => encode(Float::BF16, &v, &mut bytes),
                    q => {
                        let shape: Vec<usize> = if t.shape.len() == 1 {
                            vec![n * cols]
                        } else {
                            vec![n, cols]
                        };
                        let tensor = Tensor::from_vec(v, shape.as_slice(), &device)?;
                        bytes = QTensor::quantize(&tensor, q)?.data()?.into_owned();
                    }
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&bytes);
                }
                w.write(&bytes)?;
                progress.advance(bytes.len() as u64);
                row += n;
            }
        }
        w.end()?;
        if let Some(h) = hasher {
            sums.push((g.clone(), h.finalize()));
        }
    }
    if let Some(f) = &rope_freqs {
        encode(Float::F32, f, &mut bytes);
        w.begin("rope_freqs.weight")?;
        w.write(&bytes)?;
        w.end()?;
        if opts.job.verify {
            sums.push(("rope_freqs.weight".into(), Sha256::digest(&bytes)));
        }
    }
    w.finish()?;
    progress.finish();
    if opts.job.verify {
        verify_gguf(out.path(), &sums, progress)?;
    }
    out.commit()?;
    Ok(JobReport {
        tensors: tensors.len(),
        bytes: total,
        shards: 1,
        verified: opts.job.verify,
        side_files: Vec::new(),
    })
}

/// Re-reads a written GGUF and compares each tensor's bytes with what was written.
fn verify_gguf(path: &Path, sums: &[(String, impl AsRef<[u8]>)], progress: &dyn Progress) -> Result<()> {
    drop_page_cache(path);
    let mut file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| WeightsError::BadFile {
        path: path.into(),
        format: "GGUF",
        message: e.to_string(),
    })?;
    if content.tensor_infos.len() != sums.len() {
        return Err(WeightsError::Verify(format!(
            "{}: holds {} tensors, {} were written",
            path.display(),
            content.tensor_infos.len(),
            sums.len()
        )));
    }
    let total: u64 = content
        .tensor_infos
        .values()
        .map(|i| (i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()) as u64)
        .sum();
    progress.start("verify", total);
    use std::os::unix::fs::FileExt;
    for (name, want) in sums {
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| WeightsError::Verify(format!("{}: tensor {name} is missing", path.display())))?;
        let len = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, content.tensor_data_offset + info.offset)
            .map_err(|e| WeightsError::io(path, e))?;
        if Sha256::digest(&buf).as_slice() != want.as_ref() {
            return Err(WeightsError::Verify(format!(
                "{}: tensor {name}: checksum on disk differs from the bytes written",
                path.display()
            )));
        }
        progress.advance(len as u64);
    }
    progress.finish();
    Ok(())
}

fn gguf_to_hf(input: &Path, output: &Path, opts: &JobOptions, progress: &dyn Progress) -> Result<JobReport> {
    let device = Device::Cpu;
    let mut src = GgufSource::open(input, &device)?;
    let cfg = src.config()?;
    if cfg.moe.is_some() {
        return Err(WeightsError::Unsupported(format!(
            "{}: GGUF to HF for a mixture of experts is not supported yet (HF stacks each expert's gate and up)",
            input.display()
        )));
    }
    let dtype = opts.dtype.unwrap_or(Float::F32);
    let mut infos: Vec<(String, Vec<usize>, u64)> = Vec::new();
    let mut problems = Vec::new();
    for (name, info) in &src.content.tensor_infos {
        match names::hf_name(cfg.arch, name) {
            Some(h) => infos.push((h, info.shape.dims().to_vec(), info.offset)),
            None => problems.push(format!("{name}: no HF tensor of this name")),
        }
    }
    if !problems.is_empty() {
        return Err(WeightsError::Mismatch {
            what: format!("tensors of {} and the HF llama layout", input.display()),
            count: problems.len(),
            list: problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"),
        });
    }
    infos.sort_by_key(|i| i.2);
    let outs: Vec<OutTensor> = infos
        .iter()
        .map(|(n, s, _)| OutTensor {
            name: n.clone(),
            dtype: dtype.as_str().into(),
            shape: s.clone(),
        })
        .collect();
    let out = AtomicOutput::dir(output)?;
    let mut writer = ShardedWriter::new(out.path(), outs.clone(), opts.max_shard_bytes, opts.verify);
    out.check_space(writer.total_bytes())?;
    let total: u64 = outs.iter().map(OutTensor::len).sum();
    progress.start("dequantize", total);
    let mut bytes = Vec::new();
    for (name, shape, _) in &infos {
        let w = src.get(name, shape)?;
        let v: Vec<f32> = w.to_dense(candle_core::DType::F32, &device)?.flatten_all()?.to_vec1()?;
        encode(dtype, &v, &mut bytes);
        writer.begin(name)?;
        writer.write(&bytes)?;
        writer.end()?;
        progress.advance(bytes.len() as u64);
    }
    let sums = writer.finish()?;
    progress.finish();
    write_hf_side_files(&src, input, &cfg, dtype, out.path())?;
    if opts.verify {
        verify_checkpoint(out.path(), &sums, progress)?;
    }
    let shards = crate::safetensors_io::plan_shards(&outs, opts.max_shard_bytes.max(1)).len();
    let side_files = std::fs::read_dir(out.path())
        .map_err(|e| WeightsError::io(out.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".json") && !n.ends_with("index.json"))
        .collect();
    out.commit()?;
    Ok(JobReport {
        tensors: outs.len(),
        bytes: total,
        shards,
        verified: opts.verify,
        side_files,
    })
}

/// config.json, tokenizer.json and tokenizer_config.json from GGUF metadata.
fn write_hf_side_files(src: &GgufSource, input: &Path, cfg: &ModelConfig, dtype: Float, out: &Path) -> Result<()> {
    let mut config = cfg.to_hf_json(cfg.tie_word_embeddings);
    config["torch_dtype"] = json!(dtype.torch_name());
    let write = |name: &str, v: &Value| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).expect("JSON serializes") + "\n")
            .map_err(|e| WeightsError::io(&p, e))
    };
    write("config.json", &config)?;
    if src.content.metadata.contains_key("tokenizer.ggml.tokens") {
        let tok = vicugna_engine::tokenizer::Tokenizer::from_gguf(&src.content, input)?;
        let p = out.join("tokenizer.json");
        tok.inner()
            .save(&p, false)
            .map_err(|e| WeightsError::Unsupported(format!("{}: writing the tokenizer: {e}", p.display())))?;
        let mut tc = json!({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos()});
        if let Some(t) = tok.chat_template() {
            tc["chat_template"] = json!(t);
        }
        if let Some(b) = tok.bos_token() {
            tc["bos_token"] = json!(b);
        }
        if let Some(e) = tok.eos_token() {
            tc["eos_token"] = json!(e);
        }
        write("tokenizer_config.json", &tc)?;
    }
    Ok(())
}
