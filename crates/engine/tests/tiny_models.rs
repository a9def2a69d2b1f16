//! The tiny random models of every family against HF transformers' float32 outputs.

mod common;

use common::{fixtures, floats, golden, ids};
use vicugna_engine::{EngineHandle, EngineOptions, GenerateRequest, LoadOptions, LoadedModel, Prompt, StopRules};

/// (golden file, model) for every family.
const MODELS: [(&str, &str); 8] = [
    ("tiny-models.json", "tiny-llama"),
    ("tiny-models.json", "tiny-llama3-rope"),
    ("tiny-models.json", "tiny-mistral"),
    ("tiny-models.json", "tiny-qwen2"),
    ("tiny-models-2.json", "tiny-qwen3"),
    ("tiny-models-2.json", "tiny-gemma3"),
    ("tiny-models-2.json", "tiny-phi3"),
    ("tiny-models-2.json", "tiny-mixtral"),
];

fn load(name: &str) -> LoadedModel {
    LoadedModel::load(&fixtures().join("models").join(name), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn last_logits_and_logsumexp_match_hf() {
    for (file, name) in MODELS {
        let g = golden(file);
        let loaded = load(name);
        for (ci, case) in g["models"][name]["cases"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&case["prompt_ids"]);
            let mut cache = loaded.model.new_cache(prompt.len()).unwrap();
            let mut batch = [vicugna_engine::SeqInput {
                tokens: &prompt,
                cache: &mut cache,
            }];
            let all = loaded.model.forward(&mut batch, true).unwrap().remove(0);
            let rows = all.to_vec2::<f32>().unwrap();
            let last = rows.last().unwrap();
            for (j, (got, want)) in last.iter().zip(floats(&case["last_logits_first16"])).enumerate() {
                assert!(
                    (got - want).abs() < 1e-3,
                    "{name} case {ci}: logit {j}: got {got}, HF {want}"
                );
            }
            let top: Vec<u32> = vicugna_engine::sampler::top_n(last, 5).iter().map(|t| t.0).collect();
            assert_eq!(
                top,
                ids(&case["last_logits_top5"]["ids"]),
                "{name} case {ci}: top-5 ids"
            );
            for (p, (row, want)) in rows.iter().zip(floats(&case["logsumexp_per_position"])).enumerate() {
                let max = row.iter().copied().fold(f32::MIN, f32::max);
                let lse = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
                assert!(
                    (lse - want).abs() < 1e-3,
                    "{name} case {ci} position {p}: logsumexp {lse}, HF {want}"
                );
            }
        }
    }
}

#[test]
fn greedy_ids_match_hf_with_eos_ignored() {
    for (file, name) in MODELS {
        let g = golden(file);
        let engine = EngineHandle::start(load(name), EngineOptions::default());
        for (ci, case) in g["models"][name]["cases"].as_array().unwrap().iter().enumerate() {
            let want = ids(&case["greedy_ids"]);
            let mut req = GenerateRequest::new(Prompt::Ids(ids(&case["prompt_ids"])), want.len());
            req.stop = StopRules {
                ignore_eos: true,
                ..Default::default()
            };
            let out = engine.generate(req).unwrap();
            assert_eq!(out.ids, want, "{name} case {ci}");
            assert_eq!(out.usage.completion_tokens, want.len());
        }
    }
}

#[test]
fn batched_decode_gives_each_sequence_its_own_greedy_ids() {
    for (file, name) in MODELS {
        batched(&golden(file), name);
    }
}

/// Every case submitted twice before any is read: they share forward passes.
fn batched(g: &serde_json::Value, name: &str) {
    let engine = EngineHandle::start(load(name), EngineOptions::default());
    let cases = g["models"][name]["cases"].as_array().unwrap();
    // Submit every case (twice) before reading any: they share forward passes.
    let streams: Vec<_> = cases
        .iter()
        .chain(cases.iter())
        .map(|case| {
            let mut req = GenerateRequest::new(Prompt::Ids(ids(&case["prompt_ids"])), 16);
            req.stop.ignore_eos = true;
            (ids(&case["greedy_ids"]), engine.submit(req).unwrap())
        })
        .collect();
    for (want, mut stream) in streams {
        let mut got = vec![];
        while let Some(ev) = stream.next_blocking() {
            match ev {
                vicugna_engine::Event::Token { id, .. } => got.push(id),
                vicugna_engine::Event::Done { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, want, "{name}");
    }
}

/// A prompt that extends an earlier one reuses its cached keys and values (the
/// prefix cache) and still continues with HF's greedy ids, in every family.
#[test]
fn prefix_cache_reuse_keeps_hf_greedy_ids() {
    for (file, name) in MODELS {
        let g = golden(file);
        let engine = EngineHandle::start(load(name), EngineOptions::default());
        for case in g["models"][name]["cases"].as_array().unwrap() {
            let (prompt, want) = (ids(&case["prompt_ids"]), ids(&case["greedy_ids"]));
            let mut first = GenerateRequest::new(Prompt::Ids(prompt.clone()), 8);
            first.stop.ignore_eos = true;
            assert_eq!(engine.generate(first).unwrap().ids, want[..8], "{name}");
            let mut longer = prompt.clone();
            longer.extend(&want[..8]);
            let mut second = GenerateRequest::new(Prompt::Ids(longer), 8);
            second.stop.ignore_eos = true;
            assert_eq!(
                engine.generate(second).unwrap().ids,
                want[8..16],
                "{name}: after the cached prefix"
            );
        }
        assert!(
            engine.stats().reused_prompt_tokens > 0,
            "{name}: the second prompts reused nothing"
        );
    }
}
