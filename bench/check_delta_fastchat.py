"""vicugna delta apply/make against FastChat 0.2.36's apply_delta, bit for bit.

Usage: python check_delta_fastchat.py VICUGNA_BIN RANDOM_LLAMA_BIN WORKDIR TOKENIZER_DIR
Runs FastChat's `python -m fastchat.model.apply_delta` and `vicugna delta apply
--dtype f16` on the same random llama-shaped models (base bfloat16 in 3 shards,
delta float16) and compares every output tensor's bits. Then checks that
`vicugna delta make` inverts it as FastChat's make_delta arithmetic does
(target - base in float16)."""

import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

vicugna, random_llama, work, tok = sys.argv[1:5]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
shape = ["--hidden", "128", "--intermediate", "320", "--layers", "3", "--heads", "4", "--kv-heads", "2", "--vocab", "49152"]


def run(*cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


base, delta = os.path.join(work, "base"), os.path.join(work, "delta")
run(random_llama, "--out", base, *shape, "--dtype", "bf16", "--seed", "11", "--max-shard-size", "6MB",
    "--tokenizer-from", tok)
run(random_llama, "--out", delta, *shape, "--dtype", "f16", "--seed", "12", "--scale", "0.003",
    "--tokenizer-from", tok)
fc_out, vi_out = os.path.join(work, "fastchat-target"), os.path.join(work, "vicugna-target")
run(sys.executable, "-m", "fastchat.model.apply_delta", "--base-model-path", base, "--target-model-path", fc_out,
    "--delta-path", delta)
run(vicugna, "delta", "apply", "--base", base, "--delta", delta, "--target", vi_out, "--dtype", "f16", "--verify",
    "--max-shard-size", "5MB")


def load_dir(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


fc, vi = load_dir(fc_out), load_dir(vi_out)
assert set(fc) == set(vi), (sorted(set(fc) ^ set(vi)))
bad = []
for name in sorted(fc):
    a, b = fc[name], vi[name]
    assert a.dtype == torch.float16 and b.dtype == torch.float16, (name, a.dtype, b.dtype)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
        bad.append((name, int((a.view(torch.int16) != b.view(torch.int16)).sum())))
n = sum(t.numel() for t in fc.values())
print(f"delta apply: {len(fc)} tensors, {n} float16 values; tensors differing in any bit: {bad or 'none'}")
assert not bad

# make: delta' = target - base in float16, FastChat's make_delta arithmetic.
vi_delta = os.path.join(work, "vicugna-delta")
run(vicugna, "delta", "make", "--base", base, "--target", vi_out, "--delta", vi_delta)
bt = load_dir(base)
md = load_dir(vi_delta)
bad = [k for k in md if not torch.equal((vi[k] - bt[k].to(torch.float16)).view(torch.int16), md[k].view(torch.int16))]
print(f"delta make: {len(md)} tensors equal to torch's float16 target - base: {not bad}")
assert not bad
print("FASTCHAT DELTA CHECK OK")
