"""vicugna lora merge against peft's merge_and_unload.

Usage: python check_lora_peft.py VICUGNA_BIN WORKDIR
Builds a small random llama with transformers, attaches LoRA adapters with
non-zero A and B (plain, rslora, fan_in_fan_out=False on every projection),
saves each with save_pretrained, merges it with peft and with `vicugna lora
merge`, and compares every tensor (float32 base: max abs difference; bfloat16
base: bits, allowing one-ulp rounding differences of the product)."""

import os
import shutil
import subprocess
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

vicugna, work = sys.argv[1:3]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
torch.manual_seed(0)


def load_dir(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


ok = True
for dtype in (torch.float32, torch.bfloat16):
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base_model = LlamaForCausalLM(cfg).to(dtype)
    name = str(dtype).split(".")[-1]
    base = os.path.join(work, f"base-{name}")
    base_model.save_pretrained(base)
    for variant, extra in (("plain", {}), ("rslora", {"use_rslora": True})):
        model = LlamaForCausalLM.from_pretrained(base, dtype=dtype)
        lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"],
                          init_lora_weights=False, lora_dropout=0.0, **extra)
        pm = get_peft_model(model, lcfg)
        adapter = os.path.join(work, f"adapter-{name}-{variant}")
        pm.save_pretrained(adapter)
        merged = pm.merge_and_unload()
        peft_out = os.path.join(work, f"peft-{name}-{variant}")
        merged.save_pretrained(peft_out)
        vi_out = os.path.join(work, f"vicugna-{name}-{variant}")
        subprocess.run([vicugna, "lora", "merge", "--base", base, "--lora", adapter, "--out", vi_out, "--verify"],
                       check=True)
        p, v = load_dir(peft_out), load_dir(vi_out)
        assert set(p) == set(v), sorted(set(p) ^ set(v))
        worst, changed, ulps, differ, total = 0.0, 0, 0, 0, 0
        b = load_dir(base)
        for k in sorted(p):
            assert p[k].dtype == v[k].dtype == dtype, (k, p[k].dtype, v[k].dtype)
            d = (p[k].float() - v[k].float()).abs().max().item()
            worst = max(worst, d)
            changed += int(not torch.equal(p[k], b[k]))
            if dtype == torch.bfloat16:
                # Distance in bfloat16 units in the last place of the largest magnitude
                # involved (weight, merged value, or the update itself): peft and vicugna
                # each round the float32 update to bfloat16, then round the sum.
                pf, vf, bf = p[k].float(), v[k].float(), b[k].float()
                mag = torch.stack([bf.abs(), pf.abs(), vf.abs(), (pf - bf).abs()]).amax(0).clamp_min(1e-30)
                ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
                ulps = max(ulps, ((pf - vf).abs() / ulp).max().item())
                differ += int((pf != vf).sum())
                total += pf.numel()
        good = worst < 1e-5 if dtype == torch.float32 else ulps <= 2
        ok &= good
        print(f"{name} {variant}: {len(p)} tensors, {changed} changed by the merge, max |peft - vicugna| = {worst:.2e}"
              + (f", {differ} of {total} values differ, by at most {ulps:.0f} ulp" if dtype == torch.bfloat16 else "") + (" OK" if good else " FAIL"))
if not ok:
    sys.exit("LORA CHECK FAILED")
print("PEFT LORA CHECK OK")
