//! Writes a random llama-shaped HF model directory (config.json, sharded
//! safetensors, optionally a tokenizer copied from another directory), for tests
//! and benchmarks of the weight tools.
//!
//! cargo run --release -p vicugna-weights --example random_llama -- --out DIR
//!     [--hidden 2048] [--intermediate 5632] [--layers 8] [--heads 16] [--kv-heads 16]
//!     [--vocab 49152] [--dtype f16] [--seed 1] [--scale 0.02] [--max-shard-size 400MB]
//!     [--tokenizer-from DIR]

use std::collections::HashMap;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use vicugna_weights::elementwise::encode;
use vicugna_weights::safetensors_io::{OutTensor, ShardedWriter};
use vicugna_weights::{parse_size, Float};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opt: HashMap<String, String> = HashMap::new();
    for pair in args.chunks(2) {
        let key = pair[0]
            .strip_prefix("--")
            .ok_or_else(|| anyhow::anyhow!("unexpected {}", pair[0]))?;
        opt.insert(key.into(), pair.get(1).cloned().unwrap_or_default());
    }
    let num = |k: &str, d: usize| {
        opt.get(k)
            .map(|v| v.parse::<usize>())
            .transpose()
            .map(|v| v.unwrap_or(d))
    };
    let out = PathBuf::from(opt.get("out").ok_or_else(|| anyhow::anyhow!("--out DIR is required"))?);
    let (h, inter, layers) = (num("hidden", 2048)?, num("intermediate", 5632)?, num("layers", 8)?);
    let (heads, kv_heads, vocab) = (num("heads", 16)?, num("kv-heads", 16)?, num("vocab", 49152)?);
    let seed = num("seed", 1)? as u64;
    let scale: f32 = opt.get("scale").map(|s| s.parse()).transpose()?.unwrap_or(0.02);
    let dtype = Float::parse(opt.get("dtype").map(String::as_str).unwrap_or("f16"))
        .ok_or_else(|| anyhow::anyhow!("--dtype: f32, f16 or bf16"))?;
    let max_shard = parse_size(opt.get("max-shard-size").map(String::as_str).unwrap_or("400MB"))
        .ok_or_else(|| anyhow::anyhow!("--max-shard-size: a size like 400MB"))?;
    let hd = h / heads;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![heads * hd, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv_heads * hd, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv_heads * hd, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, heads * hd]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, inter]),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![vocab, h]));
    std::fs::create_dir_all(&out)?;
    let outs = shapes
        .iter()
        .map(|(n, s)| OutTensor {
            name: n.clone(),
            dtype: dtype.as_str().into(),
            shape: s.clone(),
        })
        .collect();
    let mut w = ShardedWriter::new(&out, outs, max_shard, false);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut vals, mut bytes) = (Vec::new(), Vec::new());
    for (name, shape) in &shapes {
        w.begin(name)?;
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let mut done = 0;
        while done < n {
            let k = (n - done).min(1 << 20);
            vals.clear();
            vals.extend((0..k).map(|_| {
                let u: f32 = rng.random::<f32>() * 2.0 - 1.0;
                if norm {
                    1.0 + 0.1 * u
                } else {
                    scale * u
                }
            }));
            encode(dtype, &vals, &mut bytes);
            w.write(&bytes)?;
            done += k;
        }
        w.end()?;
    }
    w.finish()?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype.torch_name(),
    });
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    if let Some(tok) = opt.get("tokenizer-from") {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ] {
            let p = PathBuf::from(tok).join(f);
            if p.is_file() {
                std::fs::copy(&p, out.join(f))?;
            }
        }
    }
    Ok(())
}
