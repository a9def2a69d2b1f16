//! SmolLM2's GGUF with an f16 attention cache (the default for quantized weights)
//! against the f32 one.

mod common;

use common::{default_gguf, golden, ids};
use vicugna_engine::{EngineHandle, EngineOptions, Event, GenerateRequest, KvDType, LoadOptions, LoadedModel, Prompt};

fn load(kv: KvDType) -> LoadedModel {
    let mut loaded = LoadedModel::load(&default_gguf(), &LoadOptions::default()).expect("load the default GGUF");
    loaded.model.set_kv_dtype(kv);
    loaded
}

fn engine(kv: KvDType) -> EngineHandle {
    EngineHandle::start(load(kv), EngineOptions::default())
}

#[test]
fn quantized_weights_get_an_f16_cache_of_half_the_size() {
    let loaded = LoadedModel::load(&default_gguf(), &LoadOptions::default()).expect("load the default GGUF");
    assert_eq!(loaded.model.kv_dtype(), KvDType::F16);
    let mut model = loaded.model;
    let cache = model.new_cache(100).unwrap();
    // Room is made in whole blocks of the key layout (16 positions).
    assert_eq!(cache.capacity(), 112);
    let f16 = cache.bytes();
    model.set_kv_dtype(KvDType::F32);
    let f32 = model.new_cache(100).unwrap().bytes();
    assert_eq!(2 * f16, f32);
    // 30 layers × (keys + values) × 3 kv heads × 64 × 112 positions × 2 bytes.
    assert_eq!(f16, 30 * 2 * 3 * 64 * 112 * 2);
}

/// Keys and values rounded to f16 move the logprobs by thousandths (HF's
/// nearest greedy tie in these cases is 0.027): every case's 40 greedy ids are
/// those of the f32 cache, and HF's.
#[test]
fn f16_cache_keeps_the_greedy_ids() {
    let g = golden("smollm2-135m-instruct.json");
    let (f32e, f16e) = (engine(KvDType::F32), engine(KvDType::F16));
    for (i, case) in g["generation_cases"].as_array().unwrap().iter().enumerate() {
        let want = ids(&case["greedy_ids"]);
        let run = |e: &EngineHandle| {
            let mut req = GenerateRequest::new(Prompt::Ids(ids(&case["prompt_ids"])), want.len());
            req.stop.ignore_eos = true;
            req.logprobs = Some(0);
            e.generate(req).expect("generate")
        };
        let (a, b) = (run(&f32e), run(&f16e));
        assert_eq!(b.ids, a.ids, "case {i}: f16 cache vs f32 cache");
        assert_eq!(b.ids, want, "case {i}: f16 cache vs HF");
        for (step, (x, y)) in a.logprobs.iter().zip(&b.logprobs).enumerate() {
            let d = (x.logprob - y.logprob).abs();
            assert!(
                d < 0.01,
                "case {i} token {step}: logprob {} vs {} (f32 cache)",
                y.logprob,
                x.logprob
            );
        }
    }
}

/// A sequence decoded beside others, over its f16 cache, gets the tokens it gets
/// alone. (Not always the same bits: with f32 activations a step's row count
/// picks the product's kernel, and a key one bit apart can round to another f16.)
#[test]
fn f16_cache_batched_sequences_get_their_own_tokens() {
    let engine = engine(KvDType::F16);
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
    ];
    let request = |p: &str| {
        let mut req = GenerateRequest::new(Prompt::Text(p.into()), 24);
        req.stop.ignore_eos = true;
        req.logprobs = Some(0);
        req
    };
    let alone: Vec<_> = prompts.iter().map(|p| engine.generate(request(p)).unwrap()).collect();
    let streams: Vec<_> = prompts.iter().map(|p| engine.submit(request(p)).unwrap()).collect();
    for (want, mut stream) in alone.into_iter().zip(streams) {
        let (mut ids, mut lp) = (vec![], vec![]);
        while let Some(ev) = stream.next_blocking() {
            match ev {
                Event::Token { id, logprob, .. } => {
                    ids.push(id);
                    lp.push(logprob.expect("logprobs asked for").logprob);
                }
                Event::Done { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ids, want.ids);
        for (a, b) in lp.iter().zip(&want.logprobs) {
            assert!(
                (a - b.logprob).abs() < 0.01,
                "logprob {a} batched vs {} alone",
                b.logprob
            );
        }
    }
}
