"""HF transformers + peft side of bench/train-vs-peft.sh.

  peft_train_bench.py train GGUF_DIR GGUF_FILE DATA.json --steps N --max-len L --batch B --threads T --r R ...
      LoRA training on the same conversations, packed to rows of L tokens; prints one JSON line
      with input tokens/s (steps after the first) and peak RSS.
  peft_train_bench.py interop GGUF_DIR GGUF_FILE ADAPTER_DIR PROMPT N
      Loads vicugna's adapter with peft and prints the greedy ids of N new tokens for the chat prompt.
"""
import json
import resource
import sys
import time
import argparse


def load(gguf_dir, gguf_file, dtype="float32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, torch_dtype=dtype)
    return tok, model


def train(a):
    import torch
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok, model = load(a.gguf_dir, a.gguf_file, {"f32": "float32", "bf16": "bfloat16"}[a.dtype])
    data = json.load(open(a.data))
    ids = []
    for s in data:
        msgs = [{"role": "user" if t["from"] in ("human", "user") else "assistant", "content": t["value"]}
                for t in s["conversations"]]
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
    rows = [ids[i:i + a.max_len] for i in range(0, len(ids) - a.max_len, a.max_len)]
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.targets.split(","),
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    times = []
    k = 0
    for step in range(a.steps):
        t0 = time.perf_counter()
        for _ in range(a.accum):
            batch = [rows[(k + j) % len(rows)] for j in range(a.batch)]
            k += a.batch
            x = torch.tensor(batch)
            loss = model(input_ids=x, labels=x).loss / a.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    tokens = a.batch * a.accum * a.max_len
    measured = times[1:] or times
    print(json.dumps({
        "tool": "transformers+peft",
        "input_tokens_per_s": tokens * len(measured) / sum(measured),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": a.steps,
        "last_loss": float(loss) * a.accum,
    }))


def interop(gguf_dir, gguf_file, adapter, prompt, n):
    import torch
    from peft import PeftModel
    tok, model = load(gguf_dir, gguf_file)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=int(n), do_sample=False)
    print(json.dumps({"ids": out[0, ids.shape[1]:].tolist()}))


if __name__ == "__main__":
    if sys.argv[1] == "interop":
        interop(*sys.argv[2:7])
        sys.exit(0)
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("gguf_dir")
    p.add_argument("gguf_file")
    p.add_argument("data")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    train(p.parse_args())
