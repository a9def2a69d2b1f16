//! HF tensor names ↔ llama.cpp's GGUF names, and llama.cpp's q/k row order: one
//! table for the loader and for `vicugna convert`, both directions.
//!
//! The model asks for every tensor by its HF name. Expert weights stacked as
//! llama.cpp stores them (`[experts, rows, cols]`) are asked for by the names
//! `mlp.experts.{gate,up,down}_proj`, which transformers 5 also uses for stacked
//! experts (there with gate and up fused as `gate_up_proj`).

use super::arch::Arch;

/// (HF suffix after `model.layers.N.`, GGUF suffix after `blk.N.`), for every
/// family; `per_arch` overrides come first.
const LAYER: [(&str, &str); 19] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.qkv_proj", "attn_qkv"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    // phi3: llama.cpp keeps gate and up fused under the up name.
    ("mlp.gate_up_proj", "ffn_up"),
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ("block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.experts.gate_proj", "ffn_gate_exps.weight"),
    ("mlp.experts.up_proj", "ffn_up_exps.weight"),
    ("mlp.experts.down_proj", "ffn_down_exps.weight"),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
];

/// Where a family departs from `LAYER`.
fn per_arch(arch: Arch) -> &'static [(&'static str, &'static str)] {
    match arch {
        // gemma3 has four norms: its post-attention norm is not the pre-MLP one.
        Arch::Gemma3 => &[
            ("post_attention_layernorm.weight", "post_attention_norm.weight"),
            ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
        ],
        _ => &[],
    }
}

const GLOBAL: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// llama.cpp's name of an HF tensor, or `None` when it has no place for it.
pub fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let table = per_arch(arch).iter().chain(LAYER.iter());
    for (h, g) in table {
        if tail == *h {
            return Some(format!("blk.{layer}.{g}"));
        }
        // Projections: `.weight` or `.bias` after the module name.
        if !h.ends_with(".weight") && !g.ends_with(".weight") {
            if let Some(kind) = tail.strip_prefix(h).and_then(|k| k.strip_prefix('.')) {
                if kind == "weight" || kind == "bias" {
                    return Some(format!("blk.{layer}.{g}.{kind}"));
                }
            }
        }
    }
    None
}

/// The HF name of a llama.cpp tensor name.
pub fn hf_name(arch: Arch, gguf: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let spec = arch.spec();
    let table = per_arch(arch).iter().chain(LAYER.iter()).filter(|(h, g)| {
        // The one GGUF name with two HF readings: phi3's fused gate/up.
        match *h {
            "mlp.gate_up_proj" => spec.fused_gate_up,
            "mlp.up_proj" => !spec.fused_gate_up,
            "mlp.gate.weight" => spec.moe,
            "block_sparse_moe.gate.weight" => false,
            "pre_feedforward_layernorm.weight" => arch == Arch::Gemma3,
            "post_attention_layernorm.weight" => arch != Arch::Gemma3 || *g == "post_attention_norm.weight",
            _ => true,
        }
    });
    for (h, g) in table {
        if tail == *g {
            return Some(format!("model.layers.{layer}.{h}"));
        }
        if !h.ends_with(".weight") && !g.ends_with(".weight") {
            if let Some(kind) = tail.strip_prefix(g).and_then(|k| k.strip_prefix('.')) {
                if kind == "weight" || kind == "bias" {
                    return Some(format!("model.layers.{layer}.{h}.{kind}"));
                }
            }
        }
    }
    None
}

/// How many heads' rows llama.cpp interleaves in this HF tensor (q and k of the
/// families whose converter permutes them), or `None`.
pub fn permuted_heads(arch: Arch, hf: &str, heads: usize, kv_heads: usize) -> Option<usize> {
    if !arch.spec().gguf_permutes_qk {
        return None;
    }
    let module = hf.strip_suffix(".weight").or_else(|| hf.strip_suffix(".bias"))?;
    if module.ends_with("self_attn.q_proj") {
        Some(heads)
    } else if module.ends_with("self_attn.k_proj") {
        Some(kv_heads)
    } else {
        None
    }
}

/// Whether this HF tensor is an RMSNorm weight that llama.cpp stores shifted by
/// the family's norm offset (gemma's `1 + w`).
pub fn shifted_norm(arch: Arch, hf: &str) -> Option<f32> {
    let offset = arch.spec().norm_offset;
    (offset != 0.0 && (hf.ends_with("norm.weight") || hf.ends_with("layernorm.weight"))).then_some(offset)
}

/// llama.cpp's row order for q/k: within each head the two rotary halves are
/// interleaved. Rows are moved whole (`row_bytes` each), so this works on
/// quantized blocks and plain values alike.
pub fn permute_rows<T: Copy + Default>(data: &[T], rows: usize, heads: usize) -> Vec<T> {
    reorder_rows(data, rows, heads, false)
}

/// HF's row order from llama.cpp's (the inverse of [`permute_rows`]).
pub fn unpermute_rows<T: Copy + Default>(data: &[T], rows: usize, heads: usize) -> Vec<T> {
    reorder_rows(data, rows, heads, true)
}

fn reorder_rows<T: Copy + Default>(data: &[T], rows: usize, heads: usize, to_hf: bool) -> Vec<T> {
    let row_bytes = data.len() / rows.max(1);
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = h * hd + 2 * i + j;
                let hf = h * hd + j * half + i;
                let (src, dst) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::SPECS;

    /// Every name maps to GGUF and back to itself, in every family.
    #[test]
    fn names_round_trip() {
        let layer_names = [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
            "mlp.gate_proj.weight",
            "mlp.down_proj.weight",
        ];
        for spec in &SPECS {
            let mut names: Vec<String> = layer_names.iter().map(|n| format!("model.layers.7.{n}")).collect();
            names.extend(GLOBAL.iter().map(|(h, _)| h.to_string()));
            if spec.fused_gate_up {
                names.push("model.layers.7.mlp.gate_up_proj.weight".into());
                names.push("model.layers.7.self_attn.qkv_proj.weight".into());
            } else {
                names.push("model.layers.7.mlp.up_proj.weight".into());
            }
            if spec.sandwich_norms {
                names.push("model.layers.7.pre_feedforward_layernorm.weight".into());
                names.push("model.layers.7.post_feedforward_layernorm.weight".into());
            }
            if spec.moe {
                names.push("model.layers.7.mlp.gate.weight".into());
                names.push("model.layers.7.mlp.experts.up_proj".into());
            }
            for n in names {
                let g = gguf_name(spec.arch, &n).unwrap_or_else(|| panic!("{:?}: {n} has no GGUF name", spec.arch));
                assert_eq!(
                    hf_name(spec.arch, &g).as_deref(),
                    Some(n.as_str()),
                    "{:?}: {n} -> {g}",
                    spec.arch
                );
            }
        }
        assert_eq!(
            gguf_name(Arch::Gemma3, "model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.post_attention_norm.weight")
        );
        assert_eq!(
            gguf_name(Arch::Llama, "model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
    }

    #[test]
    fn permutation_is_undone() {
        let data: Vec<u8> = (0..64u8).collect();
        let p = permute_rows(&data, 16, 2);
        assert_ne!(p, data);
        assert_eq!(unpermute_rows(&p, 16, 2), data);
    }
}
