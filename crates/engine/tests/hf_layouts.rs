//! HF directories as people ship them: one file or shards with an index, and
//! weights in f32, f16 or bf16. All must give the same model.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use vicugna_engine::{LoadOptions, LoadedModel, SeqInput};

fn last_logits(dir: &Path) -> Vec<f32> {
    let m = LoadedModel::load(dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let prompt = [168u32, 488, 80, 205, 336, 27, 40];
    let mut cache = m.model.new_cache(prompt.len()).unwrap();
    let mut batch = [SeqInput {
        tokens: &prompt,
        cache: &mut cache,
    }];
    m.model.forward(&mut batch, false).unwrap().remove(0).to_vec1().unwrap()
}

/// Writes the tiny llama's tensors as `shards` files in `dtype`, with an index.
fn write_sharded(dst: &Path, dtype: DType, shards: usize) {
    let src = fixtures().join("models/tiny-llama");
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&part, dst.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_and_converted_weights_give_the_same_logits() {
    let reference = last_logits(&fixtures().join("models/tiny-llama"));
    let root = std::env::temp_dir().join(format!("vicugna-hf-layouts-{}", std::process::id()));
    // The fixture is bf16: f32 and bf16 copies hold the same values exactly; f16
    // rounds them, so it gets a looser bound.
    for (dtype, shards, tol) in [(DType::BF16, 3, 1e-5), (DType::F32, 2, 1e-5), (DType::F16, 2, 0.05)] {
        let dir = root.join(format!("{dtype:?}-{shards}"));
        write_sharded(&dir, dtype, shards);
        let got = last_logits(&dir);
        let worst = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < tol,
            "{dtype:?} in {shards} shards: max logit difference {worst}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_shard_missing_from_disk_is_named() {
    let dir = std::env::temp_dir().join(format!("vicugna-missing-shard-{}", std::process::id()));
    write_sharded(&dir, DType::BF16, 2);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = LoadedModel::load(&dir, &LoadOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
