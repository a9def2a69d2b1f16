//! SmolLM2-135M-Instruct from its GGUF against HF transformers (float32 weights
//! dequantized from the same file).

mod common;

use common::{default_gguf, golden, ids};
use vicugna_engine::{EngineHandle, EngineOptions, GenerateRequest, LoadOptions, LoadedModel, Prompt, WeightDType};

fn engine(dtype: WeightDType) -> EngineHandle {
    let loaded = LoadedModel::load(&default_gguf(), &LoadOptions { dtype }).expect("load the default GGUF");
    EngineHandle::start(loaded, EngineOptions::default())
}

fn greedy(engine: &EngineHandle, prompt: Vec<u32>, n: usize) -> Vec<u32> {
    let mut req = GenerateRequest::new(Prompt::Ids(prompt), n);
    req.stop.ignore_eos = true;
    req.logprobs = Some(10);
    engine.generate(req).expect("generate").ids
}

fn top10(engine: &EngineHandle, prompt: Vec<u32>) -> Vec<u32> {
    let mut req = GenerateRequest::new(Prompt::Ids(prompt), 1);
    req.logprobs = Some(10);
    let out = engine.generate(req).expect("generate");
    out.logprobs[0].top.iter().map(|t| t.0).collect()
}

#[test]
fn dequantized_f32_greedy_ids_equal_hf() {
    let g = golden("smollm2-135m-instruct.json");
    let engine = engine(WeightDType::F32);
    for (i, case) in g["generation_cases"].as_array().unwrap().iter().enumerate() {
        let want = ids(&case["greedy_ids"]);
        assert_eq!(greedy(&engine, ids(&case["prompt_ids"]), want.len()), want, "case {i}");
        assert_eq!(
            top10(&engine, ids(&case["prompt_ids"])),
            ids(&case["last_logits_top10"]["ids"]),
            "case {i} top-10"
        );
    }
}

#[test]
fn quantized_compute_stays_as_close_as_llama_cpp() {
    let g = golden("smollm2-135m-instruct.json");
    let engine = engine(WeightDType::Auto);
    let mut same_first10 = 0;
    let cases = g["generation_cases"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let hf_top = ids(&case["last_logits_top10"]["ids"]);
        let ours = top10(&engine, prompt.clone());
        let shared = ours.iter().filter(|t| hf_top.contains(t)).count();
        assert!(
            shared >= 9,
            "case {i}: only {shared} of HF's top-10 ids in ours ({ours:?} vs {hf_top:?})"
        );
        let want = ids(&case["greedy_ids"]);
        if greedy(&engine, prompt, 10) == want[..10] {
            same_first10 += 1;
        }
    }
    assert!(
        same_first10 >= 4,
        "first 10 greedy ids equal HF's in {same_first10} of {} cases",
        cases.len()
    );
}

#[test]
fn chat_answer_mentions_paris() {
    let engine = engine(WeightDType::Auto);
    let tok = engine.tokenizer().expect("GGUF tokenizer");
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let mut req = GenerateRequest::new(Prompt::Text(prompt.into()), 24);
    req.add_special_tokens = false;
    let out = engine.generate(req).unwrap();
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(
        out.finish_reason,
        vicugna_engine::FinishReason::Stop,
        "ends at <|im_end|>"
    );
    assert!(tok.eos_ids().contains(out.ids.last().unwrap()));
}
