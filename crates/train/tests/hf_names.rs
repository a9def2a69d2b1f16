//! A full fine-tune writes its weights as HF stores them: on every tiny family
//! the untrained model's weights come out under exactly the fixture's names,
//! shapes and values (phi3's fused `qkv_proj` / `gate_up_proj`, mixtral's stacked
//! experts, gemma3's norms), and with the trainer's config.json the engine
//! loads them back as the same model.

use std::path::PathBuf;

use candle_core::{DType, Device};
use vicugna_engine::{LoadOptions, LoadedModel, WeightDType};
use vicugna_train::hf_names::to_checkpoint_names;

const FAMILIES: [&str; 6] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gemma3",
    "tiny-phi3",
    "tiny-mixtral",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

#[test]
fn saved_weights_have_the_checkpoints_names_layouts_and_values() {
    for family in FAMILIES {
        let dir = fixture(family);
        let loaded = LoadedModel::load(
            &dir,
            &LoadOptions {
                dtype: WeightDType::F32,
            },
        )
        .unwrap();
        let saved = to_checkpoint_names(&loaded.model, &loaded.model.named_weights()).unwrap();
        let stored = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut got: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
        let mut want: Vec<&str> = stored.keys().map(String::as_str).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{family}: names");
        for (name, t) in &saved {
            let s = stored[name].to_dtype(DType::F32).unwrap();
            assert_eq!(t.dims(), s.dims(), "{family}: {name}");
            let diff = (t - &s)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{family}: {name} values");
        }

        // With the config the trainer writes, the engine reads it back as the same model.
        let out = std::env::temp_dir().join(format!("vicugna-hf-names-{}-{family}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        let map: std::collections::HashMap<String, candle_core::Tensor> = saved.into_iter().collect();
        candle_core::safetensors::save(&map, out.join("model.safetensors")).unwrap();
        let cfg = loaded.model.config().to_hf_json(loaded.model.tied_embeddings());
        std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
        let again = LoadedModel::load(&out, &LoadOptions::default()).unwrap_or_else(|e| panic!("{family}: {e}"));
        let prompt = [5u32, 17, 42, 99, 3];
        let last = |m: &LoadedModel| {
            let mut cache = m.model.new_cache(prompt.len()).unwrap();
            let mut batch = [vicugna_engine::SeqInput {
                tokens: &prompt,
                cache: &mut cache,
            }];
            m.model.forward(&mut batch, false).unwrap()[0].to_vec1::<f32>().unwrap()
        };
        assert_eq!(last(&loaded), last(&again), "{family}: reloaded logits");
        let _ = std::fs::remove_dir_all(&out);
    }
}
