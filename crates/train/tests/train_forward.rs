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

/// The fused loss (final norm, output projection and cross-entropy without the
/// `[n, vocab]` logits) equals cross-entropy over `train_head`'s logits, in value
/// and in gradient, for a frozen head (LoRA) and a trained one (full fine-tuning).
#[test]
fn fused_loss_equals_cross_entropy_over_the_logits() {
    use candle_core::{Tensor, Var, D};
    let path = vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
        .expect("the default model is needed for this test");
    let load = || {
        LoadedModel::load(
            &path,
            &LoadOptions {
                dtype: WeightDType::F32,
            },
        )
        .unwrap()
    };
    let loaded = load();
    let tok = loaded.tokenizer.unwrap();
    let ids = tok
        .encode("Bees make honey, and the sky is blue on a clear day.", false)
        .unwrap();
    let n = ids.len() - 1;
    let targets = ids[1..].to_vec();
    for trained_head in [false, true] {
        let mut model = load().model;
        let mut embed = None;
        if trained_head {
            model
                .map_weights(&mut |name, w| {
                    if name != "model.embed_tokens.weight" {
                        return Ok(w.clone());
                    }
                    let v = Var::from_tensor(w).unwrap();
                    embed = Some(v.clone());
                    Ok(v.as_tensor().clone())
                })
                .unwrap();
        }
        let inp = model.train_inputs(&[ids[..n].to_vec()], &[vec![0; n]]).unwrap();
        let x = Var::from_tensor(&model.train_embed(&inp).unwrap().detach()).unwrap();
        let fused = model.train_nll(x.as_tensor(), &targets).unwrap();
        let logits = model.train_head(x.as_tensor()).unwrap();
        let tgt = Tensor::from_vec(targets.clone(), (n, 1), logits.device()).unwrap();
        let plain = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .gather(&tgt, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let (a, b) = (fused.to_scalar::<f32>().unwrap(), plain.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs(), "fused {a} vs log_softmax {b}");
        let (ga, gb) = (fused.backward().unwrap(), plain.backward().unwrap());
        let max_diff = |p: &Tensor, q: &Tensor| {
            let d = (p - q)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = q.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            (d, scale)
        };
        let (d, scale) = max_diff(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
        assert!(d < 1e-3 * scale, "input gradients differ by {d} (largest {scale})");
        match &embed {
            Some(e) => {
                let (d, scale) = max_diff(ga.get(e.as_tensor()).unwrap(), gb.get(e.as_tensor()).unwrap());
                assert!(
                    scale > 0.0 && d < 1e-3 * scale,
                    "head gradients differ by {d} (largest {scale})"
                );
            }
            None => assert!(ga.get(model.named_weights()[0].1.as_ref()).is_none()),
        }
    }
}

/// The backward pass of a decoder block (attention probabilities and frozen
/// products are hand-written ops) agrees with finite differences: for
/// `L = Σ block(x) ⊙ r`, `⟨∇L, u⟩ ≈ (L(x + εu) − L(x − εu)) / 2ε`.
#[test]
fn block_gradient_matches_finite_differences() {
    use candle_core::{Tensor, Var};
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
    let ids = loaded
        .tokenizer
        .unwrap()
        .encode("Bees make honey. Cats have four legs.", false)
        .unwrap();
    let t = ids.len();
    // Two sequences packed in one row, so the mask's block structure is exercised too.
    let seg: Vec<u32> = (0..t).map(|i| u32::from(i >= t / 2)).collect();
    let inp = model.train_inputs(std::slice::from_ref(&ids), &[seg]).unwrap();
    let x0 = model.train_embed(&inp).unwrap().detach();
    let dims = x0.dims().to_vec();
    let n = x0.elem_count();
    let wave = |f: f32| {
        Tensor::from_vec(
            (0..n).map(|i| (i as f32 * f).sin()).collect(),
            dims.clone(),
            x0.device(),
        )
    };
    let (r, u) = (wave(0.37).unwrap(), wave(1.13).unwrap());
    let layer = 3;
    let loss = |x: &Tensor| {
        model
            .train_block(layer, x, &inp, None)
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let x = Var::from_tensor(&x0).unwrap();
    let grads = loss(x.as_tensor()).backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    let analytic = (g * &u).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    // Embedding rows are ~0.05 in size; a step of 1e-3 along u keeps the block near-linear.
    let eps = 1e-3;
    let shifted = |s: f64| loss(&(&x0 + (&u * s).unwrap()).unwrap()).to_scalar::<f32>().unwrap() as f64;
    let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
    eprintln!("autograd {analytic}, finite differences {numeric}");
    assert!(
        (analytic - numeric).abs() < 0.02 * analytic.abs().max(numeric.abs()),
        "autograd {analytic} vs finite differences {numeric}"
    );
}
