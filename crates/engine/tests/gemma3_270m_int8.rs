//! Gemma 3 270M's Q4_K_M GGUF with 8-bit activations (`--int8`): the K-quant
//! int8 kernels (Q4_K, Q6_K) on a real model. A test binary of its own: the
//! switch is process-wide and read when a model loads.

mod common;

use common::{golden, ids};
use vicugna_engine::{EngineHandle, EngineOptions, GenerateRequest, LoadOptions, LoadedModel, Prompt};

/// Rounding activations as llama.cpp does keeps the first ten of HF's greedy
/// ids in at least four of the five golden cases, and prompts of any length
/// (the tile kernel past 16 rows, the row kernel below) keep HF's top token.
#[test]
fn int8_k_quants_keep_the_first_greedy_ids() {
    vicugna_engine::kernels::set_int8_activations(true);
    let loaded = LoadedModel::load(&common::gemma3_270m_path(), &LoadOptions::default()).unwrap();
    if !loaded.model.int8_activations() {
        eprintln!("no int8 kernel on this CPU path (AVX-512 VNNI or AVX2 needed): nothing to test");
        return;
    }
    let engine = EngineHandle::start(loaded, EngineOptions::default());
    let g = golden("gemma3-270m.json");
    let cases = g["generation_cases"].as_array().unwrap();
    let mut agree = 0;
    for case in cases {
        let mut req = GenerateRequest::new(Prompt::Ids(ids(&case["prompt_ids"])), 10);
        req.stop.ignore_eos = true;
        let got = engine.generate(req).unwrap().ids;
        let want = ids(&case["greedy_ids"]);
        assert_eq!(got[0], want[0], "the first token after the prompt");
        agree += usize::from(got[..] == want[..10]);
    }
    assert!(agree >= 4, "{agree} of {} cases give HF's first ten ids", cases.len());
}
