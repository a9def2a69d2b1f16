#!/usr/bin/env python3
"""Random-weight HF checkpoints with the exact shapes of real models, for speed
benchmarks (no download; standard library only).

    bench/make-shapes.py SHAPE OUT_DIR      SHAPE: llama-1b | llama-8b | mixtral-1b

Speed does not depend on the weights' values, only on their shapes and block
types, so the values are a repeated pseudo-random bf16 pattern (|w| < 0.06, no
NaN or Inf). The directory gets config.json, model.safetensors (bf16) and
SmolLM2's tokenizer (tests/fixtures/models/smollm2-tokenizer; `vicugna convert`
pads the vocabulary to the embedding's rows as llama.cpp's converter does), so
`vicugna convert --quant q4_k|q8_0` gives a GGUF both vicugna and llama.cpp load.
"""
import json, os, random, shutil, struct, sys

SHAPES = {
    # Llama 3.2 1B
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128256, tied=True),
    # Llama 3.1 8B
    "llama-8b": dict(hidden=4096, layers=32, heads=32, kv=8, ffn=14336, vocab=128256, tied=False),
    # Mixtral-shaped at a small size: 8 experts, 2 per token
    "mixtral-1b": dict(hidden=1024, layers=8, heads=16, kv=4, ffn=3584, vocab=32000, tied=False, experts=8),
}

def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(SHAPES)}}} OUT_DIR")
    s, out = SHAPES[sys.argv[1]], sys.argv[2]
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    experts = s.get("experts")
    tensors = [("model.embed_tokens.weight", [s["vocab"], h])]
    for i in range(s["layers"]):
        p = f"model.layers.{i}"
        tensors += [
            (f"{p}.input_layernorm.weight", [h]),
            (f"{p}.post_attention_layernorm.weight", [h]),
            (f"{p}.self_attn.q_proj.weight", [s["heads"] * hd, h]),
            (f"{p}.self_attn.k_proj.weight", [s["kv"] * hd, h]),
            (f"{p}.self_attn.v_proj.weight", [s["kv"] * hd, h]),
            (f"{p}.self_attn.o_proj.weight", [h, s["heads"] * hd]),
        ]
        if experts:
            tensors += [
                (f"{p}.mlp.gate.weight", [experts, h]),
                (f"{p}.mlp.experts.gate_up_proj", [experts, 2 * s["ffn"], h]),
                (f"{p}.mlp.experts.down_proj", [experts, h, s["ffn"]]),
            ]
        else:
            tensors += [
                (f"{p}.mlp.gate_proj.weight", [s["ffn"], h]),
                (f"{p}.mlp.up_proj.weight", [s["ffn"], h]),
                (f"{p}.mlp.down_proj.weight", [h, s["ffn"]]),
            ]
    tensors.append(("model.norm.weight", [h]))
    if not s["tied"]:
        tensors.append(("lm_head.weight", [s["vocab"], h]))
    header, off = {}, 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    os.makedirs(out, exist_ok=True)
    rng = random.Random(1)
    # 1 MiB of bf16 values in (-0.06, 0.06), and norms of ones.
    pattern = b"".join(struct.pack("<H", (struct.unpack("<I", struct.pack("<f", rng.uniform(-0.06, 0.06)))[0] >> 16))
                       for _ in range(1 << 19))
    one = struct.pack("<H", 0x3F80)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = os.path.join(out, "model.safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name, shape in tensors:
            size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if name.endswith("norm.weight"):
                f.write(one * (size // 2))
                continue
            start = rng.randrange(0, len(pattern) // 2) * 2
            while size > 0:
                chunk = pattern[start:start + size] if start else pattern[:size]
                f.write(chunk)
                size -= len(chunk)
                start = 0
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    cfg = {
        "architectures": ["MixtralForCausalLM" if experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if experts else "llama",
        "hidden_size": h, "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"], "head_dim": hd,
        "vocab_size": s["vocab"], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": s["tied"], "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    if experts:
        cfg.update(num_local_experts=experts, num_experts_per_tok=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tok = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models", "smollm2-tokenizer")
    for n in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(tok, n), os.path.join(out, n))
    print(f"{out}: {len(tensors)} tensors, {off / 2**30:.2f} GiB bf16")

main()
