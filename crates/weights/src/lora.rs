//! `lora merge`: folds a PEFT LoRA adapter (`adapter_config.json` +
//! `adapter_model.safetensors`) into its base model, as peft's `merge_and_unload`
//! does: W += scale * (B @ A) (transposed when `fan_in_fan_out`), with
//! scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`. The product
//! is computed in f32, cast to the adapter's dtype, then added to the weight, as
//! peft does on CPU.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::atomic_output::{copy_side_files, set_config_dtype, AtomicOutput};
use crate::delta::{JobOptions, JobReport};
use crate::elementwise::{encode, round_to};
use crate::error::{Result, WeightsError};
use crate::safetensors_io::{verify_checkpoint, Checkpoint, OutTensor, ShardedWriter};
use crate::{copy_tensor, Progress};

/// The parts of `adapter_config.json` a merge needs.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub fan_in_fan_out: bool,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    /// Only these decoder layers are adapted; all when `None`. A merge applies
    /// the tensors the adapter holds, so this only reaches the checks of loaders.
    pub layers_to_transform: Option<Vec<usize>>,
}

impl LoraConfig {
    /// Reads and checks `adapter_config.json`; features a plain merge cannot honour are refused.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| WeightsError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| WeightsError::BadFile {
            path: path.into(),
            format: "JSON",
            message: e.to_string(),
        })?;
        let bad = |field: &str, message: String| WeightsError::BadConfig {
            path: path.into(),
            field: field.into(),
            message,
        };
        if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(bad("peft_type", format!("{t:?}; only LORA adapters can be merged")));
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r", "missing or not a positive integer".into()))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("lora_alpha", "missing or not a number".into()))?;
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        if flag("use_dora") {
            return Err(bad(
                "use_dora",
                "DoRA adapters are not supported by `lora merge`".into(),
            ));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v.get(k).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
                return Err(bad(
                    k,
                    "per-module ranks or alphas are not supported by `lora merge`".into(),
                ));
            }
        }
        if let Some(b) = v.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(bad(
                    "bias",
                    format!("{b:?}; only adapters without trained biases (\"none\") can be merged"),
                ));
            }
        }
        if v.get("modules_to_save")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            return Err(bad(
                "modules_to_save",
                "adapters that replace whole modules are not supported by `lora merge`".into(),
            ));
        }
        let target_modules = match v.get("target_modules") {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        // An int or a list of layer indices (PEFT accepts both).
        let layers_to_transform = match v.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| bad("layers_to_transform", format!("{n} is not a layer index")))?
                as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|n| n as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("layers_to_transform", "expected a list of layer indices".into()))?,
            ),
            Some(other) => {
                return Err(bad(
                    "layers_to_transform",
                    format!("{other}: expected a layer index or a list of them"),
                ))
            }
        };
        Ok(LoraConfig {
            r,
            alpha,
            fan_in_fan_out: flag("fan_in_fan_out"),
            rslora: flag("use_rslora"),
            target_modules,
            layers_to_transform,
        })
    }

    /// The factor applied to B @ A.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One adapted weight: the base tensor name and its A, B tensors in the adapter.
struct Pair {
    a: String,
    b: String,
}

/// The adapter tensors, matched to base weights; every problem listed at once.
fn match_adapter(base: &Checkpoint, lora: &Checkpoint, cfg: &LoraConfig) -> Result<BTreeMap<String, Pair>> {
    let mut problems = Vec::new();
    let mut pairs = BTreeMap::new();
    for t in &lora.tensors {
        let name = &t.name;
        let Some(module) = name
            .strip_suffix(".lora_A.weight")
            .or_else(|| name.strip_suffix(".lora_A.default.weight"))
        else {
            if !(name.ends_with(".lora_B.weight") || name.ends_with(".lora_B.default.weight")) {
                problems.push(format!(
                    "{name}: not a LoRA A/B weight; only lora_A/lora_B tensors can be merged"
                ));
            }
            continue;
        };
        let module = module.strip_prefix("base_model.model.").unwrap_or(module);
        let weight = format!("{module}.weight");
        let b_name = name.replace(".lora_A.", ".lora_B.");
        let Some(bt) = lora.get(&b_name) else {
            problems.push(format!("{name}: has no {b_name}"));
            continue;
        };
        let Some(w) = base.get(&weight) else {
            problems.push(format!("{name}: the base has no {weight}"));
            continue;
        };
        if w.shape.len() != 2 || t.shape.len() != 2 || bt.shape.len() != 2 {
            problems.push(format!("{weight}: LoRA needs 2-D weights, got {:?}", w.shape));
            continue;
        }
        let (out, inp) = if cfg.fan_in_fan_out {
            (w.shape[1], w.shape[0])
        } else {
            (w.shape[0], w.shape[1])
        };
        if t.shape != [cfg.r, inp] || bt.shape != [out, cfg.r] {
            problems.push(format!(
                "{weight}: base {:?}{} needs lora_A [{}, {inp}] and lora_B [{out}, {}], found {:?} and {:?}",
                w.shape,
                if cfg.fan_in_fan_out { " (fan_in_fan_out)" } else { "" },
                cfg.r,
                cfg.r,
                t.shape,
                bt.shape
            ));
            continue;
        }
        pairs.insert(
            weight,
            Pair {
                a: name.clone(),
                b: b_name,
            },
        );
    }
    for t in &lora.tensors {
        if t.name.contains(".lora_B.") && lora.get(&t.name.replace(".lora_B.", ".lora_A.")).is_none() {
            problems.push(format!("{}: has no matching lora_A", t.name));
        }
    }
    if pairs.is_empty() && problems.is_empty() {
        problems.push("the adapter holds no lora_A/lora_B weights".into());
    }
    if problems.is_empty() {
        return Ok(pairs);
    }
    Err(WeightsError::Mismatch {
        what: format!("the adapter {} and the base {}", lora.dir.display(), base.dir.display()),
        count: problems.len(),
        list: problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"),
    })
}

/// Writes `out` = `base` with the adapter in `lora_dir` merged in.
pub fn merge(
    base_dir: &Path,
    lora_dir: &Path,
    out: &Path,
    opts: &JobOptions,
    progress: &dyn Progress,
) -> Result<JobReport> {
    let cfg = LoraConfig::read(&lora_dir.join("adapter_config.json"))?;
    let weights = lora_dir.join("adapter_model.safetensors");
    let bin = lora_dir.join("adapter_model.bin");
    let base = Checkpoint::open_dir(base_dir)?;
    // Chinese-Vicuna's and other early adapters are torch.save'd `.bin` files.
    let lora = if weights.is_file() {
        Checkpoint::open_files(lora_dir, &[weights])?
    } else if bin.is_file() {
        Checkpoint::open_bin_files(lora_dir, &[bin])?
    } else {
        return Err(WeightsError::MissingFile {
            path: weights,
            what: "missing; a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors \
                   (or adapter_model.bin)"
                .into(),
        });
    };
    let pairs = match_adapter(&base, &lora, &cfg)?;
    let mut outs = Vec::new();
    for t in &base.tensors {
        let dt = opts.dtype.or(t.float()).ok_or_else(|| WeightsError::BadTensor {
            path: base.path_of(t).into(),
            tensor: t.name.clone(),
            message: format!("dtype {} cannot be converted; expected f32, f16 or bf16", t.dtype),
        })?;
        outs.push(OutTensor {
            name: t.name.clone(),
            dtype: dt.as_str().into(),
            shape: t.shape.clone(),
        });
    }
    let output = AtomicOutput::dir(out)?;
    let mut writer = ShardedWriter::new(output.path(), outs.clone(), opts.max_shard_bytes, opts.verify);
    output.check_space(writer.total_bytes())?;
    let total: u64 = outs.iter().map(OutTensor::len).sum();
    progress.start("lora merge", total);
    let scale = cfg.scale();
    let device = Device::Cpu;
    let mut bytes = Vec::new();
    for (t, o) in base.tensors.iter().zip(&outs) {
        let dt = crate::Float::parse(&o.dtype).expect("a float dtype");
        writer.begin(&t.name)?;
        match pairs.get(&t.name) {
            None => copy_tensor(&base, t, dt, &mut writer, progress)?,
            Some(p) => {
                let (a, b) = (lora.get(&p.a).expect("matched"), lora.get(&p.b).expect("matched"));
                let at = Tensor::from_vec(lora.read_all_f32(a)?, (a.shape[0], a.shape[1]), &device)?;
                let bt = Tensor::from_vec(lora.read_all_f32(b)?, (b.shape[0], b.shape[1]), &device)?;
                let mut d = bt.matmul(&at)?;
                if cfg.fan_in_fan_out {
                    d = d.t()?.contiguous()?;
                }
                let mut d: Vec<f32> = (d * scale)?.flatten_all()?.to_vec1()?;
                let w_dtype = t.float().expect("checked float");
                // peft: the product is computed in f32 and cast to the adapter's dtype,
                // then added to the weight and rounded once to the weight's dtype.
                round_to(b.float().expect("checked float"), &mut d);
                let mut w = base.read_all_f32(t)?;
                for (x, y) in w.iter_mut().zip(&d) {
                    *x += *y;
                }
                round_to(w_dtype, &mut w);
                encode(dt, &w, &mut bytes);
                writer.write(&bytes)?;
                progress.advance(bytes.len() as u64);
            }
        }
        writer.end()?;
    }
    let checksums = writer.finish()?;
    progress.finish();
    let side_files = copy_side_files(base_dir, output.path())?;
    if let Some(d) = opts.dtype {
        set_config_dtype(output.path(), d.torch_name())?;
    }
    if opts.verify {
        verify_checkpoint(output.path(), &checksums, progress)?;
    }
    let shards = crate::safetensors_io::plan_shards(&outs, opts.max_shard_bytes.max(1)).len();
    output.commit()?;
    Ok(JobReport {
        tensors: outs.len(),
        bytes: total,
        shards,
        verified: opts.verify,
        side_files,
    })
}
