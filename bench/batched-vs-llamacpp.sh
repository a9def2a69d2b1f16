#!/usr/bin/env bash
# Batched decoding, vicugna vs llama.cpp's own batching (`llama-batched-bench`), on
# the same GGUF: total decode tokens/s at 1, 4, 8, 16 parallel sequences.
#
#   bench/batched-vs-llamacpp.sh MODEL.gguf
#
# Settings (environment):
#   BATCHES="1 4 8 16"  PROMPT_TOKENS=128 GEN_TOKENS=128 THREADS=2 RUNS=3
#   INT8=1               also vicugna --int8 (8-bit activations, as llama.cpp rounds them)
#   VICUGNA_BIN=target/release/vicugna   LLAMACPP_VERSION=0.3.36
#
# llama-batched-bench is built once from the llama.cpp vendored in the
# llama-cpp-python source archive (bench/build-llama-batched-bench.sh), with the
# flags bench/vs-llamacpp.sh uses. Each sequence has its own prompt (llama.cpp's
# "prompt not shared" mode; vicugna's prompts differ in their first token), both
# use an f16 KV cache, and both time GEN_TOKENS decode steps after the prompt
# (vicugna's first token comes out of the prefill, so it is asked for one more).
# Rounds alternate llama.cpp and vicugna at each batch size; medians are printed
# with the vicugna/llama.cpp ratio and each side's batch-N / single-stream ratio.
# Raw JSON lines are kept in target/bench/batched-<time>/.
set -euo pipefail

die() { echo "batched-vs-llamacpp: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BATCHES="${BATCHES:-1 4 8 16}"
PROMPT_TOKENS="${PROMPT_TOKENS:-128}"
GEN_TOKENS="${GEN_TOKENS:-128}"
THREADS="${THREADS:-2}"
RUNS="${RUNS:-3}"
INT8="${INT8:-1}"
VICUGNA_BIN="${VICUGNA_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/vicugna}"
MODEL="${1:-}"

[[ -n "$MODEL" && $# -eq 1 ]] || die "usage: bench/batched-vs-llamacpp.sh MODEL.gguf (make one with bench/make-shapes.py llama-1b --cached q4_k_m)"
[[ -f "$MODEL" ]] || die "model not found: $MODEL"
for v in PROMPT_TOKENS GEN_TOKENS THREADS RUNS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
MAX_B=0
for b in $BATCHES; do
    [[ "$b" =~ ^[1-9][0-9]*$ ]] || die "BATCHES must be positive integers (got '$b' in '$BATCHES')"
    (( b > MAX_B )) && MAX_B=$b
done
[[ " $BATCHES " == *" 1 "* ]] || die "BATCHES must include 1 (the single-stream reference)"
[[ -x "$VICUGNA_BIN" ]] || die "vicugna binary not found at $VICUGNA_BIN; build it (cargo build --release -p vicugna-cli) or set VICUGNA_BIN"

LLAMA_BB="$("$ROOT/bench/build-llama-batched-bench.sh")" || die "could not build llama-batched-bench"

OUT="${CARGO_TARGET_DIR:-$ROOT/target}/bench/batched-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
: > "$OUT/llamacpp.jsonl"; : > "$OUT/vicugna.jsonl"; : > "$OUT/vicugna-int8.jsonl"

read -r LOAD1 _ < /proc/loadavg || LOAD1="?"
echo "== model $MODEL" >&2
echo "== batches $BATCHES, prompt $PROMPT_TOKENS, gen $GEN_TOKENS, threads $THREADS, runs $RUNS; load average $LOAD1; $(nproc) CPUs" >&2
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < 0.5 else 1)" "$LOAD1" 2>/dev/null \
    || echo "batched-vs-llamacpp: warning: the machine is busy (load $LOAD1); numbers will be noisy" >&2

# Last line of stdout that looks like a JSON object, or fail.
json_line() {
    local tag="$1"; shift
    local out
    out="$("$@" 2>"$OUT/last-stderr.txt")" || { cat "$OUT/last-stderr.txt" >&2; die "$tag failed (exit $?): $*"; }
    out="$(printf '%s\n' "$out" | grep '^{' | tail -n 1)" || true
    [[ -n "$out" ]] || { cat "$OUT/last-stderr.txt" >&2; die "$tag printed no JSON line: $*"; }
    printf '%s\n' "$out"
}

CTX=$(( MAX_B * (PROMPT_TOKENS + GEN_TOKENS) ))
for ((r = 1; r <= RUNS; r++)); do
    for b in $BATCHES; do
        echo "== round $r/$RUNS, batch $b" >&2
        json_line "llama-batched-bench" "$LLAMA_BB" -m "$MODEL" -c "$CTX" -b 2048 -ub 512 \
            -npp "$PROMPT_TOKENS" -ntg "$GEN_TOKENS" -npl "$b" -t "$THREADS" -tb "$THREADS" \
            --output-format jsonl | tee -a "$OUT/llamacpp.jsonl" >&2
        json_line "vicugna --batch $b" "$VICUGNA_BIN" bench --model "$MODEL" \
            --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$((GEN_TOKENS + 1))" --threads "$THREADS" \
            --batch "$b" --int8 off --json | tee -a "$OUT/vicugna.jsonl" >&2
        if [[ "$INT8" == 1 ]]; then
            json_line "vicugna --int8 --batch $b" "$VICUGNA_BIN" bench --model "$MODEL" \
                --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$((GEN_TOKENS + 1))" --threads "$THREADS" \
                --batch "$b" --int8 on --json | tee -a "$OUT/vicugna-int8.jsonl" >&2
        fi
    done
done

python3 - "$OUT" "$MODEL" "$PROMPT_TOKENS" "$GEN_TOKENS" "$THREADS" "$RUNS" "$BATCHES" <<'PY'
import json, math, os, statistics, sys

out, model, n, m, t, runs, batches = sys.argv[1:]
batches = [int(b) for b in batches.split()]

def load(name):
    with open(os.path.join(out, name)) as f:
        return [json.loads(l) for l in f if l.strip()]

def med(rows, key, bkey, b):
    vals = [float(r[key]) for r in rows if int(r.get(bkey, 0)) == b and r.get(key) is not None]
    return statistics.median(vals) if vals else math.nan

def fmt(x, nd=1):
    return "—" if math.isnan(x) else f"{x:.{nd}f}"

lc, vi, v8 = load("llamacpp.jsonl"), load("vicugna.jsonl"), load("vicugna-int8.jsonl")
int8 = bool(v8) and all(r.get("activations") == "int8" for r in v8)
if v8 and not int8:
    print("note: --int8 fell back to f32 activations on this CPU or for these block types")
cols = [("llama.cpp", lambda b: med(lc, "speed_tg", "pl", b)),
        ("vicugna", lambda b: med(vi, "decode_tok_s", "batch", b))]
if v8:
    cols.append(("vicugna int8", lambda b: med(v8, "decode_tok_s", "batch", b)))
print(f"\nmodel {model}\nprompt {n} tok per sequence (not shared), gen {m} tok, threads {t}, "
      f"medians of {runs} runs; total decode tokens/s over all sequences\n")
head = "| batch | " + " | ".join(c for c, _ in cols) + " | vicugna/llama.cpp |"
if v8:
    head += " int8/llama.cpp |"
head += " " + " | ".join(f"{c} b/1" for c, _ in cols) + " |"
print(head)
print("|" + "---|" * (head.count("|") - 1))
single = {c: f(1) for c, f in cols}
for b in batches:
    vals = {c: f(b) for c, f in cols}
    row = f"| {b} | " + " | ".join(fmt(vals[c]) for c, _ in cols)
    row += f" | {fmt(vals['vicugna'] / vals['llama.cpp'], 2)}x"
    if v8:
        row += f" | {fmt(vals['vicugna int8'] / vals['llama.cpp'], 2)}x"
    row += " | " + " | ".join(f"{fmt(vals[c] / single[c], 2)}x" for c, _ in cols) + " |"
    print(row)
rss = {b: med(vi, "peak_rss_mib", "batch", b) for b in batches}
print("\nvicugna peak RSS (MiB): " + ", ".join(f"batch {b}: {fmt(rss[b], 0)}" for b in batches))
print(f"raw results: {out}")
PY
