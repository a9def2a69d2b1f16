//! LoRA adapters: attached to the engine's own `Linear` layers (never merged
//! into the base weights), saved and read in PEFT's layout
//! (`adapter_config.json`, `adapter_model.safetensors`) so Python `peft` loads
//! what vicugna trains.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use vicugna_engine::model::{Lora, LINEAR_MODULES};
use vicugna_engine::Model;

use crate::data::write_atomic;
use crate::error::{Result, TrainError};

/// LoRA settings, written as PEFT's `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    /// Module names (`q_proj`, `v_proj`, …).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// `alpha / r`, the factor applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Checks the settings; `all-linear` expands to the seven projections.
    pub fn validated(mut self) -> Result<Self> {
        if self.r == 0 {
            return Err(TrainError::setting("--lora-r", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(TrainError::setting("--lora-dropout", "must be in [0, 1)"));
        }
        if self.target_modules.iter().any(|m| m == "all-linear") {
            self.target_modules = LINEAR_MODULES.iter().map(|s| s.to_string()).collect();
        }
        for m in &self.target_modules {
            if !LINEAR_MODULES.contains(&m.as_str()) {
                return Err(TrainError::setting(
                    "--lora-target-modules",
                    format!(
                        "unknown module {m:?}; expected some of {} or all-linear",
                        LINEAR_MODULES.join(", ")
                    ),
                ));
            }
        }
        if self.target_modules.is_empty() {
            return Err(TrainError::setting("--lora-target-modules", "name at least one module"));
        }
        Ok(self)
    }
}

fn targeted(path: &str, cfg: &LoraConfig) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    cfg.target_modules.iter().any(|m| m == last)
}

/// PEFT's tensor names for the adapter of module `path`.
fn peft_names(path: &str) -> (String, String) {
    (
        format!("base_model.model.{path}.lora_A.weight"),
        format!("base_model.model.{path}.lora_B.weight"),
    )
}

/// Attaches fresh adapters (A uniform in ±1/√in as PEFT's Kaiming init, B zero,
/// so training starts from the base model) and returns them as trainable
/// variables under their PEFT names.
pub fn attach_new(model: &mut Model, cfg: &LoraConfig, seed: u64) -> Result<Vec<(String, Var)>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x4C6F_5241);
    let device = model.device().clone();
    let mut out = Vec::new();
    for (path, lin) in model.linears_mut() {
        if !targeted(&path, cfg) {
            continue;
        }
        let Some(w) = lin.dense_weight() else {
            return Err(TrainError::setting(
                "--dtype",
                "LoRA training needs dense (f32) base weights",
            ));
        };
        let (dout, din) = w.dims2()?;
        let bound = 1.0 / (din as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * din).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, din), &device)?)?;
        let b = Var::zeros((dout, cfg.r), DType::F32, &device)?;
        lin.set_lora(Some(Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.scale(),
        }));
        let (na, nb) = peft_names(&path);
        out.push((na, a));
        out.push((nb, b));
    }
    Ok(out)
}

#[derive(Serialize)]
struct PeftConfig<'a> {
    peft_type: &'static str,
    task_type: &'static str,
    base_model_name_or_path: &'a str,
    r: usize,
    lora_alpha: f64,
    lora_dropout: f32,
    target_modules: &'a [String],
    bias: &'static str,
    fan_in_fan_out: bool,
    inference_mode: bool,
    init_lora_weights: bool,
    modules_to_save: Option<()>,
    use_rslora: bool,
    use_dora: bool,
}

/// Writes a PEFT adapter directory.
pub fn save_peft(dir: &Path, cfg: &LoraConfig, base: &str, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let pc = PeftConfig {
        peft_type: "LORA",
        task_type: "CAUSAL_LM",
        base_model_name_or_path: base,
        r: cfg.r,
        lora_alpha: cfg.lora_alpha,
        lora_dropout: cfg.lora_dropout,
        target_modules: &cfg.target_modules,
        bias: "none",
        fan_in_fan_out: false,
        inference_mode: true,
        init_lora_weights: true,
        modules_to_save: None,
        use_rslora: false,
        use_dora: false,
    };
    let json = serde_json::to_vec_pretty(&pc).map_err(|e| TrainError::setting("adapter", e.to_string()))?;
    write_atomic(&dir.join("adapter_config.json"), &json)?;
    crate::checkpoint::save_safetensors(&dir.join("adapter_model.safetensors"), tensors)
}

/// Reads a PEFT adapter and attaches it to `model` (for serving; base weights
/// stay as they are, quantized or not).
pub fn load_peft(model: &mut Model, dir: &Path) -> Result<LoraConfig> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| TrainError::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::BadData {
        path: cfg_path.clone(),
        message: e.to_string(),
    })?;
    let bad = |m: String| TrainError::BadData {
        path: cfg_path.clone(),
        message: m,
    };
    if v.get("peft_type").and_then(|x| x.as_str()) != Some("LORA") {
        return Err(bad("peft_type must be \"LORA\"".into()));
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .ok_or_else(|| bad("missing integer field r".into()))? as usize;
    let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(r as f64);
    let dropout = v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
    let targets: Vec<String> = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => return Err(bad("target_modules must be a list of module names".into())),
    };
    let cfg = LoraConfig {
        r,
        lora_alpha: alpha,
        lora_dropout: dropout,
        target_modules: targets,
    };
    let st_path = dir.join("adapter_model.safetensors");
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&st_path, model.device()).map_err(|e| TrainError::BadData {
            path: st_path.clone(),
            message: e.to_string(),
        })?;
    // PEFT writes `lora_A.weight` (newer) or `lora_A.default.weight` in some versions.
    let find = |path: &str, which: &str| -> Option<Tensor> {
        [
            format!("base_model.model.{path}.{which}.weight"),
            format!("base_model.model.{path}.{which}.default.weight"),
        ]
        .iter()
        .find_map(|k| tensors.get(k).cloned())
    };
    let mut attached = 0;
    for (path, lin) in model.linears_mut() {
        if !targeted(&path, &cfg) {
            continue;
        }
        let (Some(a), Some(b)) = (find(&path, "lora_A"), find(&path, "lora_B")) else {
            return Err(TrainError::BadData {
                path: st_path.clone(),
                message: format!("no lora_A/lora_B weights for {path}"),
            });
        };
        let a = a.to_dtype(DType::F32)?;
        let b = b.to_dtype(DType::F32)?;
        let (ar, _) = a.dims2()?;
        let (_, br) = b.dims2()?;
        if ar != r || br != r {
            return Err(TrainError::BadData {
                path: st_path.clone(),
                message: format!("{path}: adapter rank {ar}/{br}, config says r={r}"),
            });
        }
        lin.set_lora(Some(Lora {
            a,
            b,
            scale: cfg.scale(),
        }));
        attached += 1;
    }
    if attached == 0 {
        return Err(bad("the adapter targets none of this model's modules".into()));
    }
    Ok(cfg)
}
