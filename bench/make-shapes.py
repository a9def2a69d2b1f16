#!/usr/bin/env python3
"""Random-weight checkpoints with the exact shapes of real models, for speed
benchmarks (no download; standard library only).

    bench/make-shapes.py SHAPE OUT_DIR                      HF directory (bf16 safetensors)
    bench/make-shapes.py SHAPE OUT.gguf --quant q4_k_m|q8_0 GGUF file, written directly
    bench/make-shapes.py SHAPE --cached q4_k_m|q8_0         path of the cached GGUF
                                                            (target/bench-models/SHAPE-QUANT.gguf),
                                                            written first if missing

SHAPE: llama-1b (Llama 3.2 1B) | llama-8b (Llama 3.1 8B) | mixtral-1b (8 experts, 2 active).

SPEED DOES NOT DEPEND ON THE WEIGHTS' VALUES, only on the tensors' shapes and
block types: a decode step reads every byte of every weight it uses whatever
they hold, and the kernels have no value-dependent paths. The models' outputs
are meaningless.

Speed does not depend on the weights' values, only on their shapes and block
types, so the values are a repeated pseudo-random bf16 pattern (|w| < 0.06, no
NaN or Inf). The directory gets config.json, model.safetensors (bf16) and
SmolLM2's tokenizer (tests/fixtures/models/smollm2-tokenizer; `vicugna convert`
pads the vocabulary to the embedding's rows as llama.cpp's converter does), so
`vicugna convert --quant q4_k|q8_0` gives a GGUF both vicugna and llama.cpp load.

The direct GGUF path (--quant) skips that detour (16 GB of bf16 for the 8B
shape): it streams valid blocks straight to the file, llama.cpp's names and
layout, in the block types of `vicugna convert --quant`: q4_k_m is Q4_K with
Q6_K for the output matrix (the embedding where it is tied) and for attn_v and
ffn_down (ffn_down_exps) in llama.cpp's `use_more_bits` layers (the first and
last eighth, every third between), the rest of the embedding Q4_K; q8_0 is
Q8_0 throughout. Norms are f32 ones, the router (ffn_gate_inp) f32, and each
block's f16 scales are small (1e-4 .. 2e-4) with random quants, so weights are
|w| < 0.1 and activations stay finite. The tokenizer is SmolLM2's, padded with
[PADn] tokens to the vocabulary as `vicugna convert` does (cut to its first
32000 tokens and their merges for mixtral-1b, whose vocabulary is smaller).
"""
import json, os, random, shutil, struct, sys, time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "smollm2-tokenizer")

SHAPES = {
    # Llama 3.2 1B
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128256, tied=True),
    # Llama 3.1 8B
    "llama-8b": dict(hidden=4096, layers=32, heads=32, kv=8, ffn=14336, vocab=128256, tied=False),
    # Mixtral-shaped at a small size: 8 experts, 2 per token
    "mixtral-1b": dict(hidden=1024, layers=8, heads=16, kv=4, ffn=3584, vocab=32000, tied=False, experts=8),
}

def write_hf(s, out):
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
    for n in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(TOKENIZER, n), os.path.join(out, n))
    print(f"{out}: {len(tensors)} tensors, {off / 2**30:.2f} GiB bf16")


# --- direct GGUF ------------------------------------------------------------------

# ggml type id, values per block, bytes per block.
F32, Q8_0, Q4_K, Q6_K = (0, 1, 4), (8, 32, 34), (12, 256, 144), (14, 256, 210)
ALIGN = 32
FILE_TYPE = {"q4_k_m": 15, "q8_0": 7}


def block_pattern(kind, n, rng):
    """`n` valid blocks of one type: random quants, small positive f16 scales."""
    out = bytearray()
    for _ in range(n):
        if kind == Q4_K:
            # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
            out += struct.pack("<ee", rng.uniform(1e-4, 2e-4), rng.uniform(1e-4, 2e-4))
            out += rng.randbytes(12 + 128)
        elif kind == Q6_K:
            # 128 bytes of low nibbles, 64 of high bits, 16 int8 scales (kept
            # within +-32), d (f16)
            out += rng.randbytes(128 + 64)
            out += bytes(((b & 0x3F) - 32) & 0xFF for b in rng.randbytes(16))
            out += struct.pack("<e", rng.uniform(1e-4, 2e-4))
        elif kind == Q8_0:
            out += struct.pack("<e", rng.uniform(1e-4, 2e-4)) + rng.randbytes(32)
        else:
            raise ValueError(kind)
    return bytes(out)


def use_more_bits(i, n):
    """llama.cpp's `use_more_bits`: the layers whose attn_v/ffn_down get Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_tensors(s, quant):
    """(name, ggml dims (fastest first), type) in `vicugna convert`'s order."""
    h, hd, layers, experts = s["hidden"], s["hidden"] // s["heads"], s["layers"], s.get("experts")
    tied = s["tied"]

    def q(name, layer=None):
        if quant == "q8_0":
            return Q8_0
        if name == "output" or (tied and name == "token_embd"):
            return Q6_K
        if layer is not None and name in ("attn_v", "ffn_down", "ffn_down_exps") and use_more_bits(layer, layers):
            return Q6_K
        return Q4_K

    t = [("token_embd.weight", [h, s["vocab"]], q("token_embd"))]
    for i in range(layers):
        p = f"blk.{i}"
        t += [
            (f"{p}.attn_norm.weight", [h], F32),
            (f"{p}.ffn_norm.weight", [h], F32),
            (f"{p}.attn_q.weight", [h, s["heads"] * hd], q("attn_q", i)),
            (f"{p}.attn_k.weight", [h, s["kv"] * hd], q("attn_k", i)),
            (f"{p}.attn_v.weight", [h, s["kv"] * hd], q("attn_v", i)),
            (f"{p}.attn_output.weight", [s["heads"] * hd, h], q("attn_output", i)),
        ]
        if experts:
            t += [
                # llama.cpp keeps the router unquantized.
                (f"{p}.ffn_gate_inp.weight", [h, experts], F32),
                (f"{p}.ffn_gate_exps.weight", [h, s["ffn"], experts], q("ffn_gate_exps", i)),
                (f"{p}.ffn_up_exps.weight", [h, s["ffn"], experts], q("ffn_up_exps", i)),
                (f"{p}.ffn_down_exps.weight", [s["ffn"], h, experts], q("ffn_down_exps", i)),
            ]
        else:
            t += [
                (f"{p}.ffn_gate.weight", [h, s["ffn"]], q("ffn_gate", i)),
                (f"{p}.ffn_up.weight", [h, s["ffn"]], q("ffn_up", i)),
                (f"{p}.ffn_down.weight", [s["ffn"], h], q("ffn_down", i)),
            ]
    t.append(("output_norm.weight", [h], F32))
    if not tied:
        t.append(("output.weight", [h, s["vocab"]], q("output")))
    return t


def tokenizer_metadata(n_vocab):
    """SmolLM2's byte-level BPE as `vicugna convert` writes it: padded to `n_vocab`."""
    with open(os.path.join(TOKENIZER, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    with open(os.path.join(TOKENIZER, "tokenizer_config.json"), encoding="utf-8") as f:
        tc = json.load(f)
    by_id = {i: (tok, 1) for tok, i in tj["model"]["vocab"].items()}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], 3 if a.get("special") else 4)
    tokens = [by_id[i][0] if i in by_id else f"[PAD{i}]" for i in range(n_vocab)]
    types = [by_id[i][1] if i in by_id else 5 for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in tj["model"]["merges"]]
    if len(by_id) > n_vocab:
        # A smaller vocabulary (mixtral-1b's 32000): SmolLM2's first n_vocab
        # tokens, and the merges among them.
        kept = set(tokens)
        merges = [m for m in merges if m.split(" ")[0] in kept and m.split(" ")[1] in kept
                  and m.replace(" ", "") in kept]
    pre = "gpt-2" if tj["pre_tokenizer"].get("type") == "ByteLevel" else "smollm"
    md = [("tokenizer.ggml.model", "str", "gpt2"), ("tokenizer.ggml.pre", "str", pre),
          ("tokenizer.ggml.tokens", "strs", tokens), ("tokenizer.ggml.token_type", "i32s", types),
          ("tokenizer.ggml.merges", "strs", merges)]
    index = {t: i for i, t in reversed(list(enumerate(tokens)))}
    for key, tc_key in [("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                        ("unknown_token_id", "unk_token"), ("padding_token_id", "pad_token")]:
        if tc.get(tc_key) in index:
            md.append((f"tokenizer.ggml.{key}", "u32", index[tc[tc_key]]))
    md.append(("tokenizer.ggml.add_bos_token", "bool", bool(tc.get("add_bos_token", False))))
    if isinstance(tc.get("chat_template"), str):
        md.append(("tokenizer.chat_template", "str", tc["chat_template"]))
    return md


def gguf_string(x):
    b = x.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(kind, v):
    """Type id and encoding of one metadata value."""
    if kind == "str":
        return struct.pack("<I", 8) + gguf_string(v)
    if kind == "u32":
        return struct.pack("<II", 4, v)
    if kind == "f32":
        return struct.pack("<If", 6, v)
    if kind == "bool":
        return struct.pack("<I?", 7, v)
    if kind == "strs":
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(gguf_string(x) for x in v)
    if kind == "i32s":
        return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise ValueError(kind)


def write_gguf(shape, s, out, quant):
    """A GGUF of random valid blocks at `s`'s shapes, streamed to `out`."""
    if quant not in FILE_TYPE:
        sys.exit(f"--quant must be one of {', '.join(FILE_TYPE)} (got '{quant}')")
    h = s["hidden"]
    a = lambda k: f"llama.{k}"
    md = [
        ("general.architecture", "str", "llama"),
        ("general.name", "str", f"{shape}-random"),
        ("general.file_type", "u32", FILE_TYPE[quant]),
        ("general.quantization_version", "u32", 2),
        (a("context_length"), "u32", 8192),
        (a("embedding_length"), "u32", h),
        (a("block_count"), "u32", s["layers"]),
        (a("feed_forward_length"), "u32", s["ffn"]),
        (a("attention.head_count"), "u32", s["heads"]),
        (a("attention.head_count_kv"), "u32", s["kv"]),
        (a("attention.layer_norm_rms_epsilon"), "f32", 1e-5),
        (a("rope.freq_base"), "f32", 500000.0),
        (a("rope.dimension_count"), "u32", h // s["heads"]),
        (a("vocab_size"), "u32", s["vocab"]),
    ]
    if s.get("experts"):
        md += [(a("expert_count"), "u32", s["experts"]), (a("expert_used_count"), "u32", 2)]
    md += tokenizer_metadata(s["vocab"])
    tensors = gguf_tensors(s, quant)

    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(md)))
    for key, kind, v in md:
        head += gguf_string(key) + gguf_value(kind, v)
    sizes, off = [], 0
    for name, dims, (tid, per_block, block_bytes) in tensors:
        n = 1
        for d in dims:
            n *= d
        if dims[0] % per_block:
            sys.exit(f"{name}: rows of {dims[0]} are not whole blocks of {per_block}")
        size = n // per_block * block_bytes
        head += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", tid, off)
        sizes.append(size)
        off += size + (-size % ALIGN)
    head += b"\0" * (-len(head) % ALIGN)

    rng = random.Random(1)
    # 4096 blocks of each type (0.1 .. 0.9 MiB), repeated from a random block
    # onwards in each tensor.
    patterns = {k: block_pattern(k, 4096, rng) for k in (Q4_K, Q6_K, Q8_0)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    t0 = time.time()
    with open(tmp, "wb") as f:
        f.write(head)
        for (name, dims, kind), size in zip(tensors, sizes):
            if kind == F32:
                f.write(struct.pack("<f", 1.0) * (size // 4))
            else:
                pat = patterns[kind]
                nb = len(pat) // kind[2]
                # 8 copies per write: few system calls, little memory.
                big = pat[rng.randrange(nb) * kind[2]:] + pat * 8
                left = size
                while left > 0:
                    chunk = big[:left]
                    f.write(chunk)
                    left -= len(chunk)
                    big = pat * 8 if left else big
            f.write(b"\0" * (-size % ALIGN))
    os.replace(tmp, out)
    total = os.path.getsize(out)
    print(f"{out}: {len(tensors)} tensors, {quant}, {total / 2**30:.2f} GiB "
          f"in {time.time() - t0:.1f} s", file=sys.stderr)


def main():
    argv = sys.argv[1:]
    usage = (f"usage: {sys.argv[0]} SHAPE OUT_DIR | SHAPE OUT.gguf --quant q4_k_m|q8_0 | "
             f"SHAPE --cached q4_k_m|q8_0   (SHAPE: {' | '.join(SHAPES)})")
    if not argv or argv[0] not in SHAPES:
        sys.exit(usage)
    shape, s = argv[0], SHAPES[argv[0]]
    if len(argv) == 3 and argv[1] == "--cached":
        quant = argv[2]
        if quant not in FILE_TYPE:
            sys.exit(usage)
        out = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                           "bench-models", f"{shape}-{quant}.gguf")
        out = os.path.normpath(out)
        if not os.path.isfile(out):
            write_gguf(shape, s, out, quant)
        print(out)
    elif len(argv) == 4 and argv[2] == "--quant":
        write_gguf(shape, s, argv[1], argv[3])
    elif len(argv) == 2:
        write_hf(s, argv[1])
    else:
        sys.exit(usage)


main()
