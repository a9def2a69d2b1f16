//! The model's shape, normalised from an HF `config.json` or a GGUF file's metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

pub use super::arch::{Activation, Arch};

/// How rotary position frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything the model definition needs to know about its shape.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (qwen2).
    pub qkv_bias: bool,
    /// Keys further back than this are not attended to, on the layers that
    /// slide (`sliding_layers`): every layer of mistral, five in six of gemma3.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends within `sliding_window` (else globally).
    pub sliding_layers: Vec<bool>,
    /// RoPE base and scaling of the sliding layers where they differ from the
    /// global layers' (gemma3).
    pub local_rope: Option<(f64, RopeScaling)>,
    /// What attention scores are multiplied by: 1/√head_dim, or gemma's
    /// 1/√query_pre_attn_scalar.
    pub attn_scale: f64,
    /// The MLP's activation.
    pub activation: Activation,
    /// Experts per layer and per token (mixtral).
    pub moe: Option<Moe>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A mixture-of-experts MLP's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moe {
    pub experts: usize,
    pub per_token: usize,
}

impl ModelConfig {
    /// Whether layer `layer` attends within the sliding window.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    sliding_window_pattern_: Option<usize>,
    rope_local_base_freq: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    partial_rotary_factor: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

/// Token ids given as one integer or a list, as in HF configs.
pub(crate) fn ids_from_json(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).map(|n| n as u32).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| EngineError::BadJson {
            path: path.into(),
            message: e.to_string(),
        })?;
        Self::from_hf_json(&json, path)
    }

    /// Parses the JSON of an HF `config.json`; `path` is named in errors.
    pub fn from_hf_json(json: &Value, path: &Path) -> Result<Self> {
        let bad = |field: &str, message: String| EngineError::BadConfig {
            path: path.into(),
            field: field.into(),
            message,
        };
        let model_type = json
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("model_type", format!("missing; expected one of {}", Arch::supported())))?;
        let arch = Arch::from_model_type(model_type).ok_or_else(|| EngineError::UnsupportedArchitecture {
            path: path.into(),
            arch: model_type.into(),
            supported: Arch::supported(),
        })?;
        let spec = arch.spec();
        let c: HfConfig = serde_json::from_value(json.clone()).map_err(|e| EngineError::BadConfig {
            path: path.into(),
            field: "(config)".into(),
            message: e.to_string(),
        })?;
        let _ = (&c.model_type, &c.architectures);
        let activation = match c.hidden_activation.as_ref().or(c.hidden_act.as_ref()) {
            None => spec.activation,
            Some(name) => Activation::from_hf(name).ok_or_else(|| {
                bad(
                    "hidden_act",
                    format!("{name:?} is not supported (supported: silu, gelu_pytorch_tanh)"),
                )
            })?,
        };
        for (field, v) in [
            ("attn_logit_softcapping", c.attn_logit_softcapping),
            ("final_logit_softcapping", c.final_logit_softcapping),
        ] {
            if v.is_some() {
                return Err(bad(field, "logit soft-capping (gemma 2) is not supported".into()));
            }
        }
        if c.partial_rotary_factor.is_some_and(|f| f != 1.0)
            || c.rope_parameters
                .as_ref()
                .and_then(|p| p.get("partial_rotary_factor"))
                .and_then(|v| v.as_f64())
                .is_some_and(|f| f != 1.0)
        {
            return Err(bad(
                "partial_rotary_factor",
                "RoPE on part of each head is not supported (only 1.0)".into(),
            ));
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) && c.head_dim.is_none() {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    c.num_attention_heads, c.hidden_size
                ),
            ));
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if num_kv_heads == 0 || !c.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} must divide num_attention_heads {}",
                    c.num_attention_heads
                ),
            ));
        }
        // transformers 5 nests rope settings in `rope_parameters` (per layer type
        // where layers differ, as gemma3's); transformers 4 uses `rope_theta` +
        // `rope_scaling` (+ gemma3's `rope_local_base_freq`).
        let params = c.rope_parameters.as_ref().filter(|v| !v.is_null());
        let per_type =
            params.is_some_and(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        let global = if per_type {
            params.and_then(|p| p.get("full_attention"))
        } else {
            params
        };
        let theta_of = |p: Option<&Value>| p.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64());
        let rope_theta = c.rope_theta.or_else(|| theta_of(global)).unwrap_or(10000.0);
        let scaling_json = c.rope_scaling.as_ref().filter(|v| !v.is_null()).or(global);
        let rope_scaling = match scaling_json {
            None => RopeScaling::None,
            Some(s) => parse_rope_scaling(s).map_err(|m| bad("rope_scaling", m))?,
        };
        let local = if per_type {
            params.and_then(|p| p.get("sliding_attention"))
        } else {
            None
        };
        let local_rope = match (local, c.rope_local_base_freq) {
            (Some(p), _) => Some((
                theta_of(Some(p)).unwrap_or(10000.0),
                parse_rope_scaling(p).map_err(|m| bad("rope_parameters.sliding_attention", m))?,
            )),
            (None, Some(theta)) => Some((theta, RopeScaling::None)),
            (None, None) => None,
        };
        let sliding_window = match (&c.sliding_window, c.use_sliding_window, arch) {
            (_, Some(false), _) => None,
            (_, _, Arch::Qwen2 | Arch::Qwen3) if c.use_sliding_window != Some(true) => None,
            (Some(Value::Number(n)), _, _) => n.as_u64().map(|n| n as usize),
            _ => None,
        };
        let layers = c.num_hidden_layers;
        let sliding_layers: Vec<bool> = match (&c.layer_types, c.sliding_window_pattern.or(c.sliding_window_pattern_)) {
            (Some(types), _) => {
                if types.len() != layers {
                    return Err(bad(
                        "layer_types",
                        format!("{} entries for {layers} layers", types.len()),
                    ));
                }
                let mut v = Vec::with_capacity(layers);
                for t in types {
                    v.push(match t.as_str() {
                        "sliding_attention" => true,
                        "full_attention" => false,
                        other => {
                            return Err(bad(
                                "layer_types",
                                format!("{other:?} is not supported (full_attention, sliding_attention)"),
                            ))
                        }
                    });
                }
                v
            }
            // gemma3 as transformers 4 wrote it: every `pattern`-th layer is global.
            (None, Some(p)) if arch == Arch::Gemma3 && p > 0 => (0..layers).map(|i| (i + 1) % p != 0).collect(),
            _ => vec![sliding_window.is_some(); layers],
        };
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        let attn_scale = 1.0 / c.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt();
        let moe = if spec.moe {
            let experts = c
                .num_local_experts
                .ok_or_else(|| bad("num_local_experts", "missing".into()))?;
            let per_token = c
                .num_experts_per_tok
                .ok_or_else(|| bad("num_experts_per_tok", "missing".into()))?;
            if per_token == 0 || per_token > experts {
                return Err(bad(
                    "num_experts_per_tok",
                    format!("{per_token} must be between 1 and num_local_experts {experts}"),
                ));
            }
            Some(Moe { experts, per_token })
        } else {
            None
        };
        let mut eos_token_ids = c.eos_token_id.as_ref().map(ids_from_json).unwrap_or_default();
        eos_token_ids.dedup();
        Ok(ModelConfig {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias: c.attention_bias.unwrap_or(spec.qkv_bias),
            sliding_window,
            sliding_layers,
            local_rope,
            attn_scale,
            activation,
            moe,
            bos_token_id: c.bos_token_id.as_ref().and_then(|v| ids_from_json(v).first().copied()),
            eos_token_ids,
        })
    }
}

fn parse_rope_scaling(s: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f64, String> {
        s.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| format!("rope_type {kind:?} needs a number `{k}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope_type {other:?} is not supported (supported: default, linear, llama3)"
        )),
    }
}

/// Inverse rotary frequencies, as HF computes them in float32.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    inv_freq(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling)
}

/// Inverse rotary frequencies of layer `layer` (its own base where sliding
/// layers have one).
pub fn layer_inv_freq(cfg: &ModelConfig, layer: usize) -> Vec<f32> {
    match (&cfg.local_rope, cfg.window_of(layer)) {
        (Some((theta, scaling)), Some(_)) => inv_freq(cfg.head_dim, *theta, scaling),
        _ => rope_inv_freq(cfg),
    }
}

fn inv_freq(dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let mut inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / (theta as f32).powf(i as f32 / dim as f32))
        .collect();
    match *scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor as f32),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                *f = if medium {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
    }
    inv
}

impl ModelConfig {
    /// The HF `config.json` that describes this shape (what a fine-tune writes
    /// next to its safetensors, so HF transformers and the engine both load it).
    pub fn to_hf_json(&self, tied_embeddings: bool) -> Value {
        let mut v = self.to_hf_json_common(tied_embeddings);
        let spec = self.arch.spec();
        let map = v.as_object_mut().unwrap_or_else(|| unreachable!("built as an object"));
        let layer_types: Vec<&str> = (0..self.num_layers)
            .map(|i| {
                if self.window_of(i).is_some() {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        map.insert("layer_types".into(), serde_json::json!(layer_types));
        if spec.arch == Arch::Gemma3 {
            map.insert("hidden_activation".into(), self.activation.hf_name().into());
            map.insert(
                "query_pre_attn_scalar".into(),
                serde_json::json!((1.0 / (self.attn_scale * self.attn_scale)).round()),
            );
            if let Some((theta, _)) = &self.local_rope {
                map.insert("rope_local_base_freq".into(), serde_json::json!(theta));
            }
        }
        if let Some(m) = self.moe {
            map.insert("num_local_experts".into(), m.experts.into());
            map.insert("num_experts_per_tok".into(), m.per_token.into());
        }
        v
    }

    fn to_hf_json_common(&self, tied_embeddings: bool) -> Value {
        let spec = self.arch.spec();
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        serde_json::json!({
            "architectures": [spec.hf_class],
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.activation.hf_name(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": tied_embeddings,
            "attention_bias": self.qkv_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }
}

impl ModelConfig {
    /// The shape described by a GGUF file's metadata (llama.cpp's keys).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let meta = |k: &str| content.metadata.get(k);
        let gguf_arch = meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let key = |k: &str| format!("{gguf_arch}.{k}");
        let get_u = |k: &str| -> Option<usize> {
            meta(&key(k))
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
        };
        let need_u = |k: &str| -> Result<usize> {
            get_u(k).ok_or_else(|| EngineError::BadConfig {
                path: path.into(),
                field: key(k),
                message: "missing or not an integer".into(),
            })
        };
        let get_f = |k: &str| -> Option<f64> {
            meta(&key(k)).and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
        };
        let experts = get_u("expert_count").filter(|&n| n > 0);
        let arch = match gguf_arch.as_str() {
            "llama" if experts.is_some() => Arch::Mixtral,
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            other => {
                return Err(EngineError::UnsupportedArchitecture {
                    path: path.into(),
                    arch: other.into(),
                    supported: "llama, mistral, qwen2, qwen3, gemma3, phi3, and llama with experts (mixtral)".into(),
                })
            }
        };
        let spec = arch.spec();
        let hidden = need_u("embedding_length")?;
        let heads = need_u("attention.head_count")?;
        let kv_heads = get_u("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(EngineError::BadConfig {
                path: path.into(),
                field: key("attention.head_count_kv"),
                message: format!("{kv_heads} must divide attention.head_count {heads}"),
            });
        }
        let vocab = get_u("vocab_size").or_else(|| {
            meta("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
        });
        let head_dim = get_u("attention.key_length").unwrap_or(hidden / heads);
        let rope_scaling = match meta(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("linear") => RopeScaling::Linear {
                factor: get_f("rope.scaling.factor").unwrap_or(1.0),
            },
            _ => RopeScaling::None,
        };
        let layers = need_u("block_count")?;
        let sliding_window = get_u("attention.sliding_window").filter(|&w| w > 0);
        // llama.cpp fixes gemma3's layer pattern (5 sliding, 1 global), its local
        // RoPE base (10000) and its query scale (1/√head_dim, except the 62-layer
        // 27B's 1/√(hidden/heads)).
        let (sliding_layers, local_rope, attn_scale) = if arch == Arch::Gemma3 {
            let pattern = get_u("attention.sliding_window_pattern").unwrap_or(6).max(1);
            let scalar = if layers == 62 { hidden / heads } else { head_dim };
            (
                (0..layers).map(|i| (i + 1) % pattern != 0).collect(),
                Some((10000.0, RopeScaling::None)),
                1.0 / (scalar as f64).sqrt(),
            )
        } else {
            (
                vec![sliding_window.is_some(); layers],
                None,
                1.0 / (head_dim as f64).sqrt(),
            )
        };
        let moe = match (spec.moe, experts) {
            (true, Some(experts)) => Some(Moe {
                experts,
                per_token: need_u("expert_used_count")?,
            }),
            _ => None,
        };
        let id = |k: &str| meta(k).and_then(|v| v.to_u32().ok());
        Ok(ModelConfig {
            arch,
            vocab_size: vocab.ok_or_else(|| EngineError::BadConfig {
                path: path.into(),
                field: key("vocab_size"),
                message: "missing, and no tokenizer.ggml.tokens to count".into(),
            })?,
            hidden_size: hidden,
            intermediate_size: need_u("feed_forward_length")?,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias")
                || content.tensor_infos.contains_key("blk.0.attn_qkv.bias"),
            sliding_window,
            sliding_layers,
            local_rope,
            attn_scale,
            activation: spec.activation,
            moe,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
            .join("config.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// The same gemma3 as transformers 5 writes it (`rope_parameters` per layer
    /// type, `layer_types`) and as transformers 4 did (`rope_theta`,
    /// `rope_local_base_freq`, `sliding_window_pattern`).
    #[test]
    fn gemma3_reads_the_same_in_both_config_forms() {
        let v5 = fixture("tiny-gemma3");
        let mut v4 = v5.clone();
        let m = v4.as_object_mut().unwrap();
        for k in ["rope_parameters", "layer_types", "_sliding_window_pattern"] {
            m.remove(k);
        }
        m.insert("rope_theta".into(), 1_000_000.0.into());
        m.insert("rope_local_base_freq".into(), 10_000.0.into());
        m.insert("sliding_window_pattern".into(), 3.into());
        m.insert("rope_scaling".into(), Value::Null);
        let path = Path::new("config.json");
        let (a, b) = (
            ModelConfig::from_hf_json(&v5, path).unwrap(),
            ModelConfig::from_hf_json(&v4, path).unwrap(),
        );
        assert_eq!(a.sliding_layers, vec![true, true, false]);
        for c in [&a, &b] {
            assert_eq!(c.arch, Arch::Gemma3);
            assert_eq!(c.sliding_layers, a.sliding_layers);
            assert_eq!(c.sliding_window, Some(4));
            assert_eq!(c.rope_theta, 1_000_000.0);
            assert_eq!(c.local_rope, Some((10_000.0, RopeScaling::None)));
            assert_eq!(c.activation, Activation::GeluTanh);
            assert!((c.attn_scale - 1.0 / 24f64.sqrt()).abs() < 1e-12);
        }
        assert_eq!(layer_inv_freq(&a, 0)[1], layer_inv_freq(&b, 0)[1]);
        assert_ne!(layer_inv_freq(&a, 0)[1], layer_inv_freq(&a, 2)[1]);
        // And what a fine-tune writes reads back the same.
        let back = ModelConfig::from_hf_json(&a.to_hf_json(true), path).unwrap();
        assert_eq!(back.sliding_layers, a.sliding_layers);
        assert_eq!(back.local_rope, a.local_rope);
        assert!((back.attn_scale - a.attn_scale).abs() < 1e-12);
    }

    #[test]
    fn unsupported_settings_are_named() {
        let mut v = fixture("tiny-phi3");
        v["rope_parameters"]["partial_rotary_factor"] = 0.5.into();
        let e = ModelConfig::from_hf_json(&v, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/config.json") && e.contains("partial_rotary_factor"),
            "{e}"
        );
        let mut v = fixture("tiny-gemma3");
        v["hidden_activation"] = "relu".into();
        let e = ModelConfig::from_hf_json(&v, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("relu") && e.contains("gelu_pytorch_tanh"), "{e}");
        let mut v = fixture("tiny-mixtral");
        v["num_experts_per_tok"] = 9.into();
        let e = ModelConfig::from_hf_json(&v, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
    }
}
