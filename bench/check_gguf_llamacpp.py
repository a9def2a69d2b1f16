"""GGUF files written by `vicugna convert` load in llama.cpp (llama-cpp-python)
and give the same prompt tokens and greedy tokens as vicugna on the same file.

Float files (F32/F16) must match exactly. On quantized files llama.cpp also
quantizes the activations (to Q8) before its matmuls and vicugna does not, so
greedy paths may part at a near tie; the check then requires that, fed the same
prefix, llama.cpp's token is vicugna's runner-up within 0.3 nats of its top
choice (and prints where and by how much).

Usage: python check_gguf_llamacpp.py VICUGNA_BIN FILE.gguf [FILE.gguf ...]
"""

import json
import subprocess
import sys

from llama_cpp import Llama

vicugna, files = sys.argv[1], sys.argv[2:]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N = 24
failed = False
for path in files:
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, seed=0)
    tmpl = llm.metadata.get("tokenizer.chat_template", "")
    print(f"{path}: llama.cpp loaded it; chat template in metadata: {len(tmpl)} chars")
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
        llm.reset()
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == N:
                break
        v = subprocess.run([vicugna, "generate", "--model", path, "--prompt", prompt, "--max-new-tokens", str(N),
                            "--temperature", "0", "--ignore-eos", "--json"], capture_output=True, text=True, check=True)
        vj = json.loads(v.stdout)
        quantized = not any(x in path.lower() for x in ("f16", "f32", "bf16"))
        same = vj["ids"] == out
        note = ""
        if not same:
            k = next(i for i, (a, b) in enumerate(zip(vj["ids"], out)) if a != b)
            ctx = ",".join(str(i) for i in ids + out[:k])
            r = subprocess.run([vicugna, "generate", "--model", path, "--prompt-ids", ctx, "--max-new-tokens", "1",
                                "--temperature", "0", "--json", "--logprobs", "5"], capture_output=True, text=True,
                               check=True)
            top = json.loads(r.stdout)["logprobs"][0]["top"]
            lp = {t["id"]: t["logprob"] for t in top}
            gap = top[0]["logprob"] - lp.get(out[k], float("-inf"))
            near_tie = quantized and gap <= 0.3
            note = (f"; parted at token {k} on a near tie: llama.cpp took vicugna's choice #"
                    f"{[t['id'] for t in top].index(out[k]) + 1 if out[k] in lp else '>5'}, {gap:.3f} nats below its top")
            if not near_tie:
                failed = True
                print("    llama.cpp:", out)
                print("    vicugna:  ", vj["ids"])
        print(f"  {prompt!r}: prompt ids {len(ids)}, greedy {N} tokens equal: {same}{note}")
if failed:
    sys.exit("GGUF CHECK FAILED")
print("GGUF LLAMA.CPP CHECK OK")
