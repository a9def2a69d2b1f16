//! A LLaMA-era checkpoint (`tiny-llama-bin`: PyTorch `.bin` shards, SentencePiece
//! `tokenizer.model`) through the engine's loader: HF's logits and HF's token ids.

mod common;

use common::{fixtures, floats, golden, ids};
use vicugna_engine::{LoadOptions, LoadedModel};

fn load() -> LoadedModel {
    LoadedModel::load(&fixtures().join("models/tiny-llama-bin"), &LoadOptions::default()).unwrap()
}

#[test]
fn bin_shards_give_hf_top5_logits() {
    let g = golden("bin-checkpoints.json");
    let loaded = load();
    assert!(loaded.format.starts_with("PyTorch .bin (3 files)"), "{}", loaded.format);
    for case in g["generation_cases"].as_array().unwrap() {
        if case["model"] != "base" {
            continue;
        }
        let prompt = ids(&case["prompt_ids"]);
        let mut cache = loaded.model.new_cache(prompt.len()).unwrap();
        let mut batch = [vicugna_engine::SeqInput {
            tokens: &prompt,
            cache: &mut cache,
        }];
        let all = loaded.model.forward(&mut batch, true).unwrap().remove(0);
        let rows = all.to_vec2::<f32>().unwrap();
        let last = rows.last().unwrap();
        let want_ids = ids(&case["last_logits_top5"]["ids"]);
        for (id, want) in want_ids.iter().zip(floats(&case["last_logits_top5"]["values"])) {
            let got = last[*id as usize];
            assert!((got - want).abs() < 1e-3, "logit {id}: got {got}, HF {want}");
        }
        let top: Vec<u32> = vicugna_engine::sampler::top_n(last, 5).iter().map(|t| t.0).collect();
        assert_eq!(top, want_ids);
    }
}

#[test]
fn tokenizer_model_gives_hf_ids_and_decodes() {
    let g = golden("bin-checkpoints.json");
    let loaded = load();
    let tok = loaded.tokenizer().unwrap();
    assert_eq!((tok.bos_id(), tok.eos_ids()), (Some(1), &[2u32][..]));
    for case in g["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "{text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["with_bos"]), "{text:?}");
        let back = tok.decode(&ids(&case["ids"]), false).unwrap();
        assert_eq!(back, case["decoded"].as_str().unwrap(), "{text:?}");
    }
}
