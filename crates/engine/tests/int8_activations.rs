//! SmolLM2's GGUF with 8-bit activations in the Q4 products (`--int8`). A test
//! binary of its own: the switch is process-wide and read when a model loads.

mod common;

use common::{default_gguf, golden, ids};
use vicugna_engine::{EngineHandle, EngineOptions, Event, GenerateRequest, LoadOptions, LoadedModel, Prompt};

fn engine() -> Option<EngineHandle> {
    vicugna_engine::kernels::set_int8_activations(true);
    let loaded = LoadedModel::load(&default_gguf(), &LoadOptions::default()).expect("load the default GGUF");
    let int8 = loaded.model.int8_activations();
    // With the prefix cache on (the default): the batched requests below reuse
    // the prompts of the ones before them, and still get the same bits.
    int8.then(|| EngineHandle::start(loaded, EngineOptions::default()))
}

/// Near HF's logits (llama.cpp on this file: at most 0.36 off HF's gaps to the
/// top token over HF's top 10, at least 9 of HF's top 10 in its top 10).
#[test]
fn int8_logits_stay_near_hf() {
    let Some(engine) = engine() else {
        eprintln!("no AVX-512 VNNI here: nothing to test");
        return;
    };
    let g = golden("smollm2-135m-instruct.json");
    for (i, case) in g["generation_cases"].as_array().unwrap().iter().enumerate() {
        let hf_top = ids(&case["last_logits_top10"]["ids"]);
        let hf: Vec<f64> = case["last_logits_top10"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut req = GenerateRequest::new(Prompt::Ids(ids(&case["prompt_ids"])), 1);
        req.logprobs = Some(20);
        let top = engine.generate(req).expect("generate").logprobs.remove(0).top;
        let ours = |id: u32| top.iter().find(|t| t.0 == id).map(|t| t.2 as f64);
        let shared = top.iter().take(10).filter(|t| hf_top.contains(&t.0)).count();
        assert!(shared >= 9, "case {i}: {shared} of HF's top 10 in ours");
        let top1 = ours(hf_top[0]).expect("HF's top token among ours");
        let mut worst = 0f64;
        for (k, &id) in hf_top.iter().enumerate() {
            let lp = ours(id).unwrap_or_else(|| panic!("case {i}: HF's #{k} {id} not in our top 20"));
            let off = ((lp - top1) - (hf[k] - hf[0])).abs();
            worst = worst.max(off);
            assert!(
                off < 0.5,
                "case {i}: token {id} is {off:.3} off HF's gap to the top token"
            );
        }
        eprintln!("case {i}: logit gaps within {worst:.3} of HF's");
    }
}

/// Each activation row is rounded on its own: a sequence decoded beside others
/// (its steps mixed with their prompts), its prompt mostly from the prefix
/// cache, gives the tokens, and the logprob bits, it gives alone.
#[test]
fn int8_batched_sequences_get_their_own_tokens() {
    let Some(engine) = engine() else {
        eprintln!("no AVX-512 VNNI here: nothing to test");
        return;
    };
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "Classify the sentiment: I loved this film.",
    ];
    let request = |p: &str| {
        let mut req = GenerateRequest::new(Prompt::Text(p.into()), 24);
        req.stop.ignore_eos = true;
        req.logprobs = Some(0);
        req
    };
    let bits = |lp: &[f32]| lp.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    let alone: Vec<(Vec<u32>, Vec<u32>)> = prompts
        .iter()
        .map(|p| {
            let out = engine.generate(request(p)).unwrap();
            let lp: Vec<f32> = out.logprobs.iter().map(|l| l.logprob).collect();
            (out.ids, bits(&lp))
        })
        .collect();
    let streams: Vec<_> = prompts.iter().map(|p| engine.submit(request(p)).unwrap()).collect();
    for ((want, want_lp), mut stream) in alone.into_iter().zip(streams) {
        let (mut got, mut lp) = (vec![], vec![]);
        while let Some(ev) = stream.next_blocking() {
            match ev {
                Event::Token { id, logprob, .. } => {
                    got.push(id);
                    lp.push(logprob.expect("logprobs asked for").logprob);
                }
                Event::Done { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, want);
        assert_eq!(bits(&lp), want_lp, "logprobs are not the same bits");
    }
    assert!(
        engine.stats().reused_prompt_tokens > 0,
        "no prompt came from the prefix cache"
    );
}
