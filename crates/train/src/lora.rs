//! LoRA adapters: attached to the engine's own `Linear` layers (never merged
//! into the base weights), saved and read in PEFT's layout
//! (`adapter_config.json`, `adapter_model.safetensors`) so Python `peft` loads
//! what vicugna trains.
//!
//! PEFT names the modules the checkpoint has. Where the engine keeps apart what
//! the checkpoint stores fused (phi3's `qkv_proj` and `gate_up_proj`), the
//! adapter of the fused module is one `A` `[r, in]` shared by the parts and one
//! `B` `[Σ out, r]` whose rows are split among them (see `Model::stored_as`), in
//! reading and in training alike. Mixtral's experts are also found under
//! transformers 4's names (`block_sparse_moe.experts.E.w1/w3/w2`,
//! `block_sparse_moe.gate`).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use vicugna_engine::model::{Lora, LINEAR_MODULES};
use vicugna_engine::Model;

use crate::data::write_atomic;
use crate::error::{Result, TrainError};

/// Module names of the projections checkpoints store fused (phi3).
pub const FUSED_MODULES: [&str; 2] = ["qkv_proj", "gate_up_proj"];

/// LoRA settings, written as PEFT's `adapter_config.json`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    /// Module names (`q_proj`, `v_proj`, …).
    pub target_modules: Vec<String>,
    /// Only these decoder layers are adapted (PEFT's `layers_to_transform`); all when `None`.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
}

// Written by hand so that settings without a layer list print as they did
// before there was one: a checkpoint's settings digest is made from this text.
impl std::fmt::Debug for LoraConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("LoraConfig");
        d.field("r", &self.r)
            .field("lora_alpha", &self.lora_alpha)
            .field("lora_dropout", &self.lora_dropout)
            .field("target_modules", &self.target_modules);
        if let Some(l) = &self.layers_to_transform {
            d.field("layers_to_transform", l);
        }
        d.finish()
    }
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
            if !LINEAR_MODULES.contains(&m.as_str()) && !FUSED_MODULES.contains(&m.as_str()) {
                return Err(TrainError::setting(
                    "--lora-target-modules",
                    format!(
                        "unknown module {m:?}; expected some of {}, {} (phi3's fused projections) or all-linear",
                        LINEAR_MODULES.join(", "),
                        FUSED_MODULES.join(", ")
                    ),
                ));
            }
        }
        if self.target_modules.is_empty() {
            return Err(TrainError::setting("--lora-target-modules", "name at least one module"));
        }
        if self.layers_to_transform.as_ref().is_some_and(Vec::is_empty) {
            return Err(TrainError::setting("layers_to_transform", "name at least one layer"));
        }
        Ok(self)
    }

    /// Whether the projection at `path` (`model.layers.N.…`) is in an adapted layer.
    pub fn adapts_layer_of(&self, path: &str) -> bool {
        match (&self.layers_to_transform, layer_of(path)) {
            (Some(keep), Some(l)) => keep.contains(&l),
            _ => true,
        }
    }
}

/// The decoder layer of a module path (`model.layers.N.…`), as PEFT finds it.
pub fn layer_of(path: &str) -> Option<usize> {
    let rest = path.split_once("layers.")?.1;
    rest.split('.').next()?.parse().ok()
}

/// The last part of a module path (`q_proj` of `model.layers.0.self_attn.q_proj`).
fn last(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// Where a projection's adapter sits in PEFT's naming: the module and, when the
/// module is stored fused, this projection's rows of its `B`.
#[derive(Debug, Clone, PartialEq)]
struct Site {
    module: String,
    rows: Option<(usize, usize)>,
}

/// The checkpoint's module for the engine's projection `path`: the fused module
/// with this projection's rows, or the projection itself.
fn stored_site(model: &Model, path: &str) -> Site {
    match model.stored_as(path) {
        Some((module, start, len)) => Site {
            module,
            rows: Some((start, len)),
        },
        None => Site {
            module: path.to_string(),
            rows: None,
        },
    }
}

/// Rows of each fused module: the end of its last part.
fn fused_rows(stored: &[Site]) -> HashMap<&str, usize> {
    let mut out: HashMap<&str, usize> = HashMap::new();
    for s in stored {
        if let Some((start, len)) = s.rows {
            let e = out.entry(s.module.as_str()).or_default();
            *e = (*e).max(start + len);
        }
    }
    out
}

/// transformers 4's name of a mixtral expert or router (`None` for other modules).
fn moe_alias(path: &str) -> Option<String> {
    let (layer, rest) = path.split_once(".mlp.")?;
    if rest == "gate" {
        return Some(format!("{layer}.block_sparse_moe.gate"));
    }
    let (expert, proj) = rest.strip_prefix("experts.")?.split_once('.')?;
    let w = match proj {
        "gate_proj" => "w1",
        "up_proj" => "w3",
        "down_proj" => "w2",
        _ => return None,
    };
    Some(format!("{layer}.block_sparse_moe.experts.{expert}.{w}"))
}

/// Whether `path` is one expert's projection in a mixture of experts.
fn is_expert(path: &str) -> bool {
    path.contains(".mlp.experts.")
}

/// Every place an adapter of `path` may be stored, most likely first.
fn sites(model: &Model, path: &str) -> Vec<Site> {
    let mut out = vec![stored_site(model, path)];
    if out[0].rows.is_some() {
        out.push(Site {
            module: path.to_string(),
            rows: None,
        });
    }
    if let Some(alias) = moe_alias(path) {
        out.push(Site {
            module: alias,
            rows: None,
        });
    }
    out
}

/// PEFT's tensor names for the adapter of module `path`.
fn peft_names(path: &str) -> (String, String) {
    (
        format!("base_model.model.{path}.lora_A.weight"),
        format!("base_model.model.{path}.lora_B.weight"),
    )
}

/// Fresh trainable adapters on a model, with what to write in `adapter_config.json`.
pub struct Attached {
    /// The trainable tensors under their PEFT names.
    pub params: Vec<(String, Var)>,
    /// The settings with `target_modules` as the checkpoint names them (phi3's
    /// `qkv_proj` where `q_proj` was asked for).
    pub saved: LoraConfig,
    /// What the user should know about how the targets were applied.
    pub notes: Vec<String>,
}

/// Attaches fresh adapters (A uniform in ±1/√in as PEFT's Kaiming init, B zero,
/// so training starts from the base model) and returns them as trainable
/// variables under their PEFT names.
///
/// A projection the checkpoint stores fused gets the fused module's adapter:
/// one `A` shared with the other parts and its own rows of one `B`. Parts not
/// targeted (`k_proj` when only `q_proj` is) get no rows, so their rows of `B`
/// stay zero and the saved adapter is exactly the one that was asked for.
pub fn attach_new(model: &mut Model, cfg: &LoraConfig, seed: u64) -> Result<Attached> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x4C6F_5241);
    let device = model.device().clone();
    let paths: Vec<String> = model.linears_mut().into_iter().map(|(p, _)| p).collect();
    let stored: Vec<Site> = paths.iter().map(|p| stored_site(model, p)).collect();
    let fused_rows = fused_rows(&stored);
    let wanted = |name: &str| cfg.target_modules.iter().any(|m| m == name);
    let mut skipped_experts = false;
    let mut fused_notes: Vec<(String, String)> = Vec::new();
    // Per targeted projection: its index in `paths` and its site.
    let mut chosen: Vec<(usize, &Site)> = Vec::new();
    for (i, (p, s)) in paths.iter().zip(&stored).enumerate() {
        if !(wanted(last(p)) || wanted(last(&s.module))) || !cfg.adapts_layer_of(p) {
            continue;
        }
        if is_expert(p) {
            skipped_experts = true;
            continue;
        }
        if s.rows.is_some() && !wanted(last(&s.module)) {
            let pair = (last(p).to_string(), last(&s.module).to_string());
            if !fused_notes.contains(&pair) {
                fused_notes.push(pair);
            }
        }
        chosen.push((i, s));
    }
    // One A and one B per checkpoint module, made where its first part comes.
    let mut made: HashMap<String, (Tensor, Tensor)> = HashMap::new();
    let mut params = Vec::new();
    let mut saved_names: Vec<String> = Vec::new();
    let mut linears = model.linears_mut();
    for (i, site) in chosen {
        let (_, lin) = &mut linears[i];
        let Some(w) = lin.dense_weight() else {
            return Err(TrainError::setting(
                "--dtype",
                "LoRA training needs dense (f32) base weights",
            ));
        };
        let (dout, din) = w.dims2()?;
        if !made.contains_key(&site.module) {
            let bound = 1.0 / (din as f32).sqrt();
            let a: Vec<f32> = (0..cfg.r * din).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, din), &device)?)?;
            let rows = fused_rows.get(site.module.as_str()).copied().unwrap_or(dout);
            let b = Var::zeros((rows, cfg.r), DType::F32, &device)?;
            made.insert(site.module.clone(), (a.as_tensor().clone(), b.as_tensor().clone()));
            let (na, nb) = peft_names(&site.module);
            params.push((na, a));
            params.push((nb, b));
            let name = last(&site.module).to_string();
            if !saved_names.contains(&name) {
                saved_names.push(name);
            }
        }
        let (a, b) = &made[&site.module];
        let b = match site.rows {
            Some((start, len)) => b.narrow(0, start, len)?,
            None => b.clone(),
        };
        lin.set_lora(Some(Lora {
            a: a.clone(),
            b,
            scale: cfg.scale(),
        }));
    }
    let mut notes = Vec::new();
    for (part, fused) in fused_notes {
        notes.push(format!(
            "this model stores {part} inside {fused}: the adapter is saved on {fused} (as PEFT names it), \
             with zero rows for the parts not targeted"
        ));
    }
    if skipped_experts {
        notes.push(
            "the experts of the mixture-of-experts layers get no adapter (HF stores them as stacked tensors, \
             which PEFT's LoRA does not target); attention is adapted"
                .into(),
        );
    }
    if params.is_empty() {
        return Err(TrainError::setting(
            "--lora-target-modules",
            format!(
                "{} names no module this model has adapters for{}",
                cfg.target_modules.join(","),
                if skipped_experts {
                    " (its MLPs are experts, which get no adapter: target q_proj,k_proj,v_proj,o_proj)"
                } else {
                    ""
                }
            ),
        ));
    }
    // Keep the order the user gave, with fused names where they replaced a part.
    let mut ordered = Vec::new();
    for t in &cfg.target_modules {
        for n in &saved_names {
            let from_t = n == t
                || paths
                    .iter()
                    .zip(&stored)
                    .any(|(p, s)| last(p) == t && last(&s.module) == n);
            if from_t && !ordered.contains(n) {
                ordered.push(n.clone());
            }
        }
    }
    let saved = LoraConfig {
        target_modules: ordered,
        ..cfg.clone()
    };
    Ok(Attached { params, saved, notes })
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
    layers_to_transform: Option<&'a [usize]>,
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
        layers_to_transform: cfg.layers_to_transform.as_deref(),
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

/// The number of names listed in an error before "and N more".
const LISTED: usize = 5;

fn listed(names: &[String]) -> String {
    let mut s = names.iter().take(LISTED).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > LISTED {
        s.push_str(&format!(" and {} more", names.len() - LISTED));
    }
    s
}

/// Reads a PEFT adapter and attaches it to `model` (for serving; base weights
/// stay as they are, quantized or not).
///
/// The settings are read as `vicugna lora merge` reads them (one reading for
/// serving and merging: `use_rslora`'s scale, DoRA and per-module ranks
/// refused). Every targeted projection must have its tensors, and every tensor
/// must belong to a projection of this model.
pub fn load_peft(model: &mut Model, dir: &Path) -> Result<LoraConfig> {
    let cfg_path = dir.join("adapter_config.json");
    let bad = |m: String| TrainError::BadData {
        path: cfg_path.clone(),
        message: m,
    };
    // `lora merge` does not insist on peft_type; an adapter to serve must say it is LoRA.
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| TrainError::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if v.get("peft_type").and_then(|x| x.as_str()) != Some("LORA") {
        return Err(bad("peft_type must be \"LORA\"".into()));
    }
    let read = vicugna_weights::lora::LoraConfig::read(&cfg_path)?;
    if read.target_modules.is_empty() {
        return Err(bad("target_modules must be a list of module names".into()));
    }
    let all_linear = read.target_modules.iter().any(|m| m == "all-linear");
    let cfg = LoraConfig {
        r: read.r,
        lora_alpha: read.alpha,
        lora_dropout: v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
        target_modules: read.target_modules.clone(),
        layers_to_transform: read.layers_to_transform.clone(),
    };
    let scale = read.scale();
    let mut st_path = dir.join("adapter_model.safetensors");
    let bin_path = dir.join("adapter_model.bin");
    let tensors: HashMap<String, Tensor> = if !st_path.is_file() && bin_path.is_file() {
        // Chinese-Vicuna's and other early adapters are torch.save'd `.bin` files.
        st_path = bin_path;
        vicugna_engine::torch_bin::load_bin(&st_path, model.device()).map_err(|e| TrainError::BadData {
            path: st_path.clone(),
            message: e.to_string(),
        })?
    } else {
        candle_core::safetensors::load(&st_path, model.device()).map_err(|e| TrainError::BadData {
            path: st_path.clone(),
            message: e.to_string(),
        })?
    };
    let bad_st = |m: String| TrainError::BadData {
        path: st_path.clone(),
        message: m,
    };
    // PEFT writes `lora_A.weight` (newer) or `lora_A.default.weight` in some versions.
    let find = |module: &str, which: &str| -> Option<(String, Tensor)> {
        [
            format!("base_model.model.{module}.{which}.weight"),
            format!("base_model.model.{module}.{which}.default.weight"),
        ]
        .into_iter()
        .find_map(|k| tensors.get(&k).cloned().map(|t| (k, t)))
    };
    let paths: Vec<String> = model.linears_mut().into_iter().map(|(p, _)| p).collect();
    let all_sites: Vec<Vec<Site>> = paths.iter().map(|p| sites(model, p)).collect();
    let stored: Vec<Site> = all_sites.iter().map(|s| s[0].clone()).collect();
    let fused_rows = fused_rows(&stored);
    // PEFT reads a single string (other than all-linear) as a regular expression
    // that must match a module's whole path; a list names modules by their last part.
    let pattern = match v.get("target_modules") {
        Some(serde_json::Value::String(p)) if p != "all-linear" => Some(
            regex::Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| bad(format!("target_modules {p:?} is not a regular expression: {e}")))?,
        ),
        _ => None,
    };
    let wanted = |path: &str| match &pattern {
        Some(re) => re.is_match(path),
        None => all_linear || cfg.target_modules.iter().any(|m| m == last(path)),
    };
    let targeted = |path: &str, sites: &[Site]| {
        cfg.adapts_layer_of(path) && (wanted(path) || sites.iter().any(|s| wanted(&s.module)))
    };
    // A fused module reached through one of its parts (`q_proj` on phi3) is
    // applied whole, as merging its tensors into the stored weight does.
    let reached: HashSet<&str> = paths
        .iter()
        .zip(&all_sites)
        .filter(|(p, s)| s[0].rows.is_some() && targeted(p, s))
        .map(|(_, s)| s[0].module.as_str())
        .collect();
    let mut used: HashSet<String> = HashSet::new();
    let mut missing: Vec<String> = Vec::new();
    let mut attached = 0;
    for ((path, lin), sites) in model.linears_mut().into_iter().zip(&all_sites) {
        if !(targeted(&path, sites) || reached.contains(sites[0].module.as_str())) {
            continue;
        }
        let found = sites.iter().find_map(|s| {
            let a = find(&s.module, "lora_A")?;
            let b = find(&s.module, "lora_B")?;
            Some((s, a, b))
        });
        let Some((site, (ka, a), (kb, b))) = found else {
            // all-linear names every projection; only those the adapter has are applied.
            if !all_linear {
                missing.push(sites[0].module.clone());
            }
            continue;
        };
        let a = a.to_dtype(DType::F32)?;
        let b = b.to_dtype(DType::F32)?;
        let (out, cols) = (lin.out_features(), lin.weight_count() / lin.out_features().max(1));
        let (ar, ain) = a.dims2()?;
        let (brows, br) = b.dims2()?;
        let (start, len) = site.rows.unwrap_or((0, out));
        let rows = match site.rows {
            Some(_) => fused_rows.get(site.module.as_str()).copied().unwrap_or(start + len),
            None => out,
        };
        if ar != cfg.r || br != cfg.r {
            return Err(bad_st(format!(
                "{}: adapter rank {ar}/{br}, config says r={}",
                site.module, cfg.r
            )));
        }
        if ain != cols || brows != rows {
            return Err(bad_st(format!(
                "{}: lora_A is [{ar}, {ain}] and lora_B [{brows}, {br}]; this model's {} needs lora_A [{}, {cols}] \
                 and lora_B [{rows}, {}]",
                site.module, path, cfg.r, cfg.r
            )));
        }
        let b = match site.rows {
            Some(_) => b.narrow(0, start, len)?.contiguous()?,
            None => b,
        };
        lin.set_lora(Some(Lora { a, b, scale }));
        used.insert(ka);
        used.insert(kb);
        attached += 1;
    }
    if !missing.is_empty() {
        missing.dedup();
        return Err(bad_st(format!(
            "target_modules {} names {} module(s) with no lora_A/lora_B weights in the adapter: {}",
            cfg.target_modules.join(","),
            missing.len(),
            listed(&missing)
        )));
    }
    let mut unused: Vec<String> = tensors.keys().filter(|k| !used.contains(*k)).cloned().collect();
    if !unused.is_empty() {
        unused.sort();
        return Err(bad_st(format!(
            "{} tensor(s) belong to no module of this model targeted by target_modules {} (a different \
             base model?): {}",
            unused.len(),
            cfg.target_modules.join(","),
            listed(&unused)
        )));
    }
    if attached == 0 {
        return Err(bad("the adapter targets none of this model's modules".into()));
    }
    Ok(cfg)
}
