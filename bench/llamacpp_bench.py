#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) speed on one GGUF, for bench/vs-llamacpp.sh.

Loads the model with n_threads, n_ctx 2048; evaluates a prompt of exactly N tokens
(timed: prefill), then decodes M tokens greedily, ignoring EOS (timed: decode).
Prints one JSON line: {"load_s", "prefill_tok_s", "decode_tok_s", ...}.

    python llamacpp_bench.py --model M.gguf [--prompt-tokens 128] [--gen-tokens 128]
                             [--threads 2] [--no-warmup]
"""

import argparse
import json
import resource
import sys
import time

import numpy as np

import llama_cpp

# Plain English prose, repeated until the prompt is long enough.
FILLER = (
    "The history of the llama begins in the high Andes, where wild guanacos and "
    "vicunas grazed for thousands of years before people domesticated them. "
    "Herders valued the animals for their wool, their meat and their strength as "
    "pack animals on steep mountain trails. "
)


def prompt_tokens(llm, n):
    toks = llm.tokenize(FILLER.encode(), add_bos=False, special=False)
    if not toks:
        sys.exit("tokenizer returned no tokens")
    out = []
    while len(out) < n:
        out.extend(toks)
    return out[:n]


def greedy(llm):
    # Logits of the last evaluated position, read from the context: without
    # logits_all, llama-cpp-python 0.3.x leaves `scores` at zero (argmax was
    # then always token 0; the same cost per step, but not greedy decoding).
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--no-warmup", action="store_true")
    a = ap.parse_args()
    if a.prompt_tokens < 1 or a.gen_tokens < 1:
        sys.exit("--prompt-tokens and --gen-tokens must be >= 1")
    if a.prompt_tokens + a.gen_tokens > a.n_ctx:
        sys.exit(f"prompt + gen tokens exceed n_ctx {a.n_ctx}")

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_ctx=a.n_ctx,
        n_batch=max(512, a.prompt_tokens),
        n_ubatch=max(512, a.prompt_tokens),
        verbose=False,
    )
    load_s = time.perf_counter() - t0

    prompt = prompt_tokens(llm, a.prompt_tokens)

    if not a.no_warmup:
        # One short prefill and a decode step, so first-call costs (page faults
        # on the weights, thread-pool start) are not charged to the timed runs.
        llm.reset()
        llm.eval(prompt[:8])
        llm.eval([greedy(llm)])

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0

    tok = greedy(llm)
    t0 = time.perf_counter()
    for _ in range(a.gen_tokens):
        # Ignore-EOS semantics: always feed the argmax token back, EOS or not.
        llm.eval([tok])
        tok = greedy(llm)
    decode_s = time.perf_counter() - t0

    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": llama_cpp.__version__,
                "load_s": round(load_s, 4),
                "prefill_tok_s": round(a.prompt_tokens / prefill_s, 2),
                "decode_tok_s": round(a.gen_tokens / decode_s, 2),
                "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens,
                # ru_maxrss is KiB on Linux; includes the Python interpreter and numpy.
                "peak_rss_mib": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
                "threads": a.threads,
                "warmup": not a.no_warmup,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
