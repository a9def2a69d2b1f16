//! LoRA adapters on every family, in PEFT's names for the checkpoint's own
//! modules (phi3's fused `qkv_proj` / `gate_up_proj` included): served unmerged
//! (`--lora`) they give what `vicugna lora merge` gives, and adapters trained by
//! vicugna are saved so that both read them back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use vicugna_engine::{EngineHandle, EngineOptions, GenerateRequest, LoadOptions, LoadedModel, Prompt, StopRules};
use vicugna_train::lora::{attach_new, load_peft, save_peft, LoraConfig};
use vicugna_train::optim::{AdamW, AdamWConfig};

const FAMILIES: [&str; 5] = ["tiny-qwen3", "tiny-gemma3", "tiny-phi3", "tiny-mixtral", "tiny-llama"];
const PROMPT: [u32; 7] = [5, 17, 42, 99, 3, 250, 7];
const NEW_TOKENS: usize = 8;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// The fixture with its bf16 weights widened to f32: `lora merge` rounds the
/// merged weight to the base's dtype (as peft does), so only an f32 base lets
/// merged and unmerged agree to float rounding.
fn f32_base(name: &str, scratch: &Path) -> PathBuf {
    let src = fixture(name);
    let dir = scratch.join(format!("{name}-f32"));
    std::fs::create_dir_all(&dir).unwrap();
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    dir
}

/// A scratch directory, emptied first and removed at the end unless the test fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("vicugna-lora-families-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn load(dir: &Path) -> LoadedModel {
    LoadedModel::load(dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Logits of every prompt position, through the inference forward.
fn logits(loaded: &LoadedModel) -> Vec<Vec<f32>> {
    let mut cache = loaded.model.new_cache(PROMPT.len()).unwrap();
    let mut batch = [vicugna_engine::SeqInput {
        tokens: &PROMPT,
        cache: &mut cache,
    }];
    loaded.model.forward(&mut batch, true).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap()
}

fn greedy(loaded: LoadedModel) -> Vec<u32> {
    let engine = EngineHandle::start(loaded, EngineOptions::default());
    let mut req = GenerateRequest::new(Prompt::Ids(PROMPT.to_vec()), NEW_TOKENS);
    req.stop = StopRules {
        ignore_eos: true,
        ..Default::default()
    };
    engine.generate(req).unwrap().ids
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Merges with `vicugna lora merge`'s code, in f32 so that only the order of
/// the sums differs from the unmerged adapter.
fn merged(base: &Path, adapter: &Path, out: &Path) -> LoadedModel {
    let opts = vicugna_weights::delta::JobOptions {
        dtype: Some(vicugna_weights::Float::F32),
        ..Default::default()
    };
    vicugna_weights::lora::merge(base, adapter, out, &opts, &vicugna_weights::NoProgress)
        .unwrap_or_else(|e| panic!("lora merge {}: {e}", adapter.display()));
    load(out)
}

/// A random adapter on every 2-D projection weight of the checkpoint whose
/// module is one of `targets`, named as PEFT names it.
fn write_random_adapter(base: &Path, dir: &Path, targets: &[&str], config_targets: &[&str], seed: u64) {
    let r = 4;
    let weights = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rand = |shape: (usize, usize)| {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-0.3f32..0.3)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for name in names {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let last = module.rsplit('.').next().unwrap();
        let w = &weights[name];
        if !targets.contains(&last) || w.rank() != 2 {
            continue;
        }
        let (o, i) = w.dims2().unwrap();
        out.insert(format!("base_model.model.{module}.lora_A.weight"), rand((r, i)));
        out.insert(format!("base_model.model.{module}.lora_B.weight"), rand((o, r)));
    }
    assert!(!out.is_empty(), "no module of {} among {targets:?}", base.display());
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&out, dir.join("adapter_model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 8,
        "lora_dropout": 0.0, "bias": "none", "target_modules": config_targets,
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

/// The modules each checkpoint has (phi3 fuses; mixtral's experts are stacked 3-D tensors).
fn hf_targets(family: &str) -> &'static [&'static str] {
    match family {
        "tiny-phi3" => &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "tiny-mixtral" => &["q_proj", "k_proj", "v_proj", "o_proj"],
        _ => &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    }
}

#[test]
fn peft_adapters_served_unmerged_equal_the_merged_model() {
    let d = Scratch::new("serve");
    for family in FAMILIES {
        let base = f32_base(family, &d.0);
        let adapter = d.0.join(format!("{family}-adapter"));
        let targets = hf_targets(family);
        write_random_adapter(&base, &adapter, targets, targets, 11);

        let plain = logits(&load(&base));
        let mut unmerged = load(&base);
        let cfg = load_peft(&mut unmerged.model, &adapter).unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(cfg.r, 4);
        let with = logits(&unmerged);
        let merged_model = merged(&base, &adapter, &d.0.join(format!("{family}-merged")));
        let want = logits(&merged_model);
        let diff = max_diff(&with, &want);
        assert!(diff < 1e-3, "{family}: unmerged vs merged logits differ by {diff}");
        assert!(max_diff(&with, &plain) > 0.1, "{family}: the adapter changed nothing");
        assert_eq!(greedy(unmerged), greedy(merged_model), "{family}: greedy ids");
    }
}

#[test]
fn phi3_adapters_may_name_the_fused_modules_or_their_parts_and_missing_ones_are_named() {
    let d = Scratch::new("phi3");
    let base = f32_base("tiny-phi3", &d.0);
    let fused = ["qkv_proj", "gate_up_proj"];
    let a = d.0.join("fused");
    write_random_adapter(&base, &a, &fused, &fused, 5);
    // Same tensors; the config names the parts, as vicugna's own projections are called.
    let b = d.0.join("parts");
    write_random_adapter(&base, &b, &fused, &["q_proj", "gate_proj"], 5);
    let with = |dir: &Path| {
        let mut m = load(&base);
        load_peft(&mut m.model, dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        logits(&m)
    };
    // PEFT's other form: one regular expression over whole module paths.
    let r = d.0.join("regex");
    write_random_adapter(&base, &r, &fused, &fused, 5);
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": r"model\.layers\.\d+\.(self_attn\.qkv_proj|mlp\.gate_up_proj)"});
    std::fs::write(r.join("adapter_config.json"), cfg.to_string()).unwrap();
    let (la, lb, lr) = (with(&a), with(&b), with(&r));
    assert_eq!(max_diff(&la, &lb), 0.0);
    assert_eq!(max_diff(&la, &lr), 0.0);
    let want = logits(&merged(&base, &a, &d.0.join("merged")));
    assert!(max_diff(&la, &want) < 1e-3);

    // The config targets o_proj, the adapter has no tensors for it.
    let c = d.0.join("missing");
    write_random_adapter(&base, &c, &fused, &["qkv_proj", "o_proj"], 5);
    let mut m = load(&base);
    let err = load_peft(&mut m.model, &c)
        .expect_err("missing o_proj accepted")
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.o_proj") && err.contains("no lora_A/lora_B"),
        "{err}"
    );

    // Tensors of a module the config does not target (or the model does not have) are refused.
    let e = d.0.join("extra");
    write_random_adapter(&base, &e, &["qkv_proj", "o_proj"], &["qkv_proj"], 5);
    let mut m = load(&base);
    let err = load_peft(&mut m.model, &e)
        .expect_err("stray tensors accepted")
        .to_string();
    assert!(err.contains("o_proj.lora_A.weight"), "{err}");
}

/// A few AdamW steps of LoRA on next-token loss over one random row.
fn train_steps(model: &vicugna_engine::Model, params: &[(String, candle_core::Var)], steps: usize) -> Vec<f32> {
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % 500).collect();
    let vars: Vec<candle_core::Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &vars,
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let inp = model
            .train_inputs(std::slice::from_ref(&ids), &[vec![0; ids.len()]])
            .unwrap();
        let mut x = model.train_embed(&inp).unwrap();
        for l in 0..model.num_layers() {
            x = model.train_block(l, &x, &inp, None).unwrap();
        }
        let n = ids.len() - 1;
        let nll = model.train_nll(&x.narrow(0, 0, n).unwrap(), &ids[1..]).unwrap();
        let loss = (nll / n as f64).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or(v.as_tensor().zeros_like().unwrap())
            })
            .collect();
        opt.step(&vars, &g, 3e-2).unwrap();
    }
    losses
}

#[test]
fn adapters_trained_on_every_family_are_saved_in_the_checkpoints_names() {
    let d = Scratch::new("train");
    for family in FAMILIES {
        let base = f32_base(family, &d.0);
        let mut loaded = LoadedModel::load(
            &base,
            &LoadOptions {
                dtype: vicugna_engine::WeightDType::F32,
            },
        )
        .unwrap();
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: vec!["all-linear".into()],
            layers_to_transform: None,
        }
        .validated()
        .unwrap();
        let attached = attach_new(&mut loaded.model, &cfg, 3).unwrap_or_else(|e| panic!("{family}: {e}"));
        let want: Vec<String> = hf_targets(family).iter().map(|s| s.to_string()).collect();
        assert_eq!(attached.saved.target_modules, want, "{family}");
        if family == "tiny-mixtral" {
            assert!(
                attached.notes.iter().any(|n| n.contains("experts")),
                "{:?}",
                attached.notes
            );
        }
        let losses = train_steps(&loaded.model, &attached.params, 6);
        assert!(losses.iter().all(|l| l.is_finite()), "{family}: {losses:?}");
        assert!(losses[5] < losses[0], "{family}: loss did not go down: {losses:?}");

        let out = d.0.join(family);
        let tensors: Vec<(String, Tensor)> = attached
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        save_peft(&out, &attached.saved, family, &tensors).unwrap();
        // Every tensor names a module the checkpoint has.
        let stored = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
        for (n, t) in &tensors {
            let module = n
                .strip_prefix("base_model.model.")
                .and_then(|m| {
                    m.strip_suffix(".lora_A.weight")
                        .or_else(|| m.strip_suffix(".lora_B.weight"))
                })
                .unwrap();
            assert!(stored.contains_key(&format!("{module}.weight")), "{family}: {n}");
            assert_eq!(t.dtype(), DType::F32);
        }

        // Read back for serving and by lora merge: both give the trained model's logits.
        let trained = logits(&loaded);
        let mut served = load(&base);
        load_peft(&mut served.model, &out).unwrap_or_else(|e| panic!("{family}: {e}"));
        assert!(max_diff(&trained, &logits(&served)) < 1e-4, "{family}: served");
        let m = merged(&base, &out, &d.0.join(format!("{family}-merged")));
        assert!(max_diff(&trained, &logits(&m)) < 1e-3, "{family}: merged");
    }
}

/// tiny-mixtral rewritten in transformers 4's layout: one `w1`/`w3`/`w2` per
/// expert under `block_sparse_moe`, whose `gate` is the router.
fn mixtral_v4_base(scratch: &Path) -> PathBuf {
    let src = fixture("tiny-mixtral");
    let dir = scratch.join("tiny-mixtral-v4");
    std::fs::create_dir_all(&dir).unwrap();
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in w {
        let t = t.to_dtype(DType::F32).unwrap();
        if let Some(layer) = k.strip_suffix(".mlp.experts.gate_up_proj") {
            let (n, rows, _) = t.dims3().unwrap();
            for e in 0..n {
                let x = t.get(e).unwrap();
                let p = format!("{layer}.block_sparse_moe.experts.{e}");
                out.insert(
                    format!("{p}.w1.weight"),
                    x.narrow(0, 0, rows / 2).unwrap().contiguous().unwrap(),
                );
                out.insert(
                    format!("{p}.w3.weight"),
                    x.narrow(0, rows / 2, rows / 2).unwrap().contiguous().unwrap(),
                );
            }
        } else if let Some(layer) = k.strip_suffix(".mlp.experts.down_proj") {
            for e in 0..t.dim(0).unwrap() {
                out.insert(
                    format!("{layer}.block_sparse_moe.experts.{e}.w2.weight"),
                    t.get(e).unwrap().contiguous().unwrap(),
                );
            }
        } else if let Some(layer) = k.strip_suffix(".mlp.gate.weight") {
            out.insert(format!("{layer}.block_sparse_moe.gate.weight"), t);
        } else {
            out.insert(k, t);
        }
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    dir
}

#[test]
fn mixtral_adapters_in_transformers_4_names_reach_the_experts_and_router() {
    let d = Scratch::new("mixtral-v4");
    let base = mixtral_v4_base(&d.0);
    let targets = ["q_proj", "w1", "w2", "w3", "gate"];
    let adapter = d.0.join("adapter");
    write_random_adapter(&base, &adapter, &targets, &targets, 21);
    let plain = logits(&load(&base));
    let mut unmerged = load(&base);
    load_peft(&mut unmerged.model, &adapter).unwrap();
    let with = logits(&unmerged);
    let want = logits(&merged(&base, &adapter, &d.0.join("merged")));
    let diff = max_diff(&with, &want);
    assert!(diff < 1e-3, "unmerged vs merged logits differ by {diff}");
    assert!(max_diff(&with, &plain) > 0.1);
}
