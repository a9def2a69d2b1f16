//! The training forward is the serving model: on SmolLM2 (the default GGUF,
//! dequantized to f32) its logits equal the engine's inference forward.

use vicugna_engine::{LoadOptions, LoadedModel, SeqInput, WeightDType};

#[test]
fn training_forward_matches_the_engine_forward_on_smollm2() {
    let path = vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
        .expect("the default model is needed for this test");
    let loaded = LoadedModel::load(
        &path,
        &LoadOptions {
            dtype: WeightDType::F32,
        },
    )
    .unwrap();
    let model = loaded.model;
    let tok = loaded.tokenizer.unwrap();
    let a = tok
        .encode("The quick brown fox jumps over the lazy dog.", false)
        .unwrap();
    let b = tok.encode("Paris is the capital of", false).unwrap();

    let mut expected = Vec::new();
    for ids in [&a, &b] {
        let mut cache = model.new_cache(64).unwrap();
        let out = model
            .forward(
                &mut [SeqInput {
                    tokens: ids,
                    cache: &mut cache,
                }],
                true,
            )
            .unwrap();
        expected.push(out[0].to_vec2::<f32>().unwrap());
    }

    // Both sequences packed into one row, then each padded in its own row.
    let packed: Vec<u32> = a.iter().chain(&b).copied().collect();
    let seg: Vec<u32> = a.iter().map(|_| 0).chain(b.iter().map(|_| 1)).collect();
    let t = a.len().max(b.len());
    let pad = |x: &Vec<u32>| {
        let mut v = x.clone();
        v.resize(t, 0);
        v
    };
    for (rows, segs) in [
        (vec![packed.clone()], vec![seg.clone()]),
        (vec![pad(&a), pad(&b)], vec![vec![0; t], vec![0; t]]),
    ] {
        let inp = model.train_inputs(&rows, &segs).unwrap();
        let mut x = model.train_embed(&inp).unwrap();
        for l in 0..model.num_layers() {
            x = model.train_block(l, &x, &inp, None).unwrap();
        }
        let logits = model.train_head(&x).unwrap().to_vec2::<f32>().unwrap();
        let width = rows[0].len();
        let starts: Vec<usize> = if rows.len() == 1 {
            vec![0, a.len()]
        } else {
            vec![0, width]
        };
        for (k, exp) in expected.iter().enumerate() {
            for (i, row) in exp.iter().enumerate() {
                let got = &logits[starts[k] + i];
                let diff = row.iter().zip(got).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(diff < 2e-3, "sequence {k} token {i}: max logit difference {diff}");
            }
        }
    }
}
