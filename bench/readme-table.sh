#!/usr/bin/env bash
# The README's benchmark table: every benchmark size through bench/vs-llamacpp.sh in
# one run, printed as one markdown table with the host it ran on.
#
#   bench/readme-table.sh
#
# Settings (environment):
#   MODELS="llama-1b:q4_k_m llama-1b:q8_0 llama-8b:q4_k_m llama-8b:q8_0 mixtral-1b:q4_k_m"
#       SHAPE:QUANT pairs (bench/make-shapes.py writes and caches the GGUF files in
#       target/bench-models/: random weights, real shapes; speed does not depend on
#       the values), or paths of .gguf files
#   PROMPT_TOKENS=512 GEN_TOKENS=128 THREADS=2 RUNS=3   passed to vs-llamacpp.sh
#   VICUGNA_BIN=target/release/vicugna
#
# Each model's full vs-llamacpp.sh output is kept beside the table in
# target/bench/readme-table-<time>/. Run it on an idle machine: the script warns
# when the load average says otherwise.
set -euo pipefail

die() { echo "readme-table: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODELS="${MODELS:-llama-1b:q4_k_m llama-1b:q8_0 llama-8b:q4_k_m llama-8b:q8_0 mixtral-1b:q4_k_m}"
export PROMPT_TOKENS="${PROMPT_TOKENS:-512}" GEN_TOKENS="${GEN_TOKENS:-128}"
export THREADS="${THREADS:-2}" RUNS="${RUNS:-3}"
# The table needs neither the long-context run nor the kernel timings.
export LONG_CONTEXT="${LONG_CONTEXT:-0}" KERNEL_COST="${KERNEL_COST:-0}"

OUT="${CARGO_TARGET_DIR:-$ROOT/target}/bench/readme-table-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
: > "$OUT/summaries.txt"
for spec in $MODELS; do
    if [[ "$spec" == *.gguf ]]; then
        model="$spec"; label="$(basename "$spec" .gguf)"
    else
        [[ "$spec" == *:* ]] || die "MODELS entries are SHAPE:QUANT or .gguf paths (got '$spec')"
        model="$(python3 "$ROOT/bench/make-shapes.py" "${spec%%:*}" --cached "${spec#*:}")" \
            || die "could not make $spec"
        label="${spec%%:*} ${spec#*:}"
    fi
    [[ -f "$model" ]] || die "model not found: $model"
    log="$OUT/$(basename "$model" .gguf).txt"
    echo "== $label: bench/vs-llamacpp.sh $model (output in $log)" >&2
    "$ROOT/bench/vs-llamacpp.sh" "$model" > "$log" 2> "$log.stderr" \
        || { tail -n 20 "$log.stderr" >&2; die "vs-llamacpp.sh failed on $model"; }
    dir="$(sed -n 's/^raw results: //p' "$log" | tail -n 1)"
    [[ -f "$dir/summary.json" ]] || die "vs-llamacpp.sh wrote no summary.json for $model (see $log)"
    printf '%s\t%s\n' "$label" "$dir/summary.json" >> "$OUT/summaries.txt"
done

CPU="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
L3="$(lscpu | sed -n 's/^L3 cache: *//p' | head -n 1)"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
python3 - "$OUT/summaries.txt" "$CPU" "$L3" "$(nproc)" "$COMMIT" > "$OUT/table.md" <<'PY'
import json, math, sys

path, cpu, l3, ncpu, commit = sys.argv[1:]
rows = []
with open(path) as f:
    for line in f:
        label, p = line.rstrip("\n").split("\t")
        with open(p) as g:
            rows.append((label, json.load(g)))

def num(x):
    return math.nan if x is None else float(x)

def fmt(x, nd=1, suffix=""):
    return "—" if math.isnan(x) else f"{x:.{nd}f}{suffix}"

def ratio(a, b):
    return fmt(a / b, 2, "x") if b and not math.isnan(a) and not math.isnan(b) else "—"

s0 = rows[0][1] if rows else {}
bws = sorted({fmt(num(s.get("bandwidth_gb_s"))) for _, s in rows})
print(f"Host: {cpu}, {ncpu} CPUs, L3 {l3}; {s0.get('threads')} threads; measured read bandwidth "
      f"{' / '.join(bws)} GB/s. vicugna {commit}, llama.cpp through llama-cpp-python 0.3.36. "
      f"Prefill {s0.get('prompt_tokens')} tokens, decode {s0.get('gen_tokens')}, medians of "
      f"{s0.get('runs')} alternating runs. Random weights at the real shapes (bench/make-shapes.py): "
      f"speed does not depend on the values.\n")
print("| model | file | bytes/token | limit tok/s | llama.cpp decode | vicugna decode (f32 / int8) "
      "| vicugna/llama.cpp (f32 / int8) | % of limit (llama.cpp / vicugna best) "
      "| % of each run's own limit (llama.cpp / vicugna best) "
      "| prefill llama.cpp / vicugna (best) | prefill ratio | peak RSS vicugna / llama.cpp |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for label, s in rows:
    lim = num(s.get("decode_limit_tok_s"))
    lc, v, v8 = num(s.get("llamacpp_decode_tok_s")), num(s.get("vicugna_decode_tok_s")), num(s.get("vicugna_int8_decode_tok_s"))
    best = max(x for x in (v, v8) if not math.isnan(x)) if not (math.isnan(v) and math.isnan(v8)) else math.nan
    lp, vp, vp8 = num(s.get("llamacpp_prefill_tok_s")), num(s.get("vicugna_prefill_tok_s")), num(s.get("vicugna_int8_prefill_tok_s"))
    vpb = max(x for x in (vp, vp8) if not math.isnan(x)) if not (math.isnan(vp) and math.isnan(vp8)) else math.nan
    bpt = num(s.get("gguf_bytes_per_token") or s.get("weight_bytes_per_token"))
    # The best vicugna column's percent against the bandwidth probed around each run.
    rp = num(s.get("vicugna_int8_pct_of_round_limit") if best == v8 else s.get("vicugna_pct_of_round_limit"))
    print(f"| {label} | {s['file_bytes'] / 2**20:.0f} MiB | {fmt(bpt / 1e6, 0)} MB | {fmt(lim)} | {fmt(lc)} "
          f"| {fmt(v)} / {fmt(v8)} | {ratio(v, lc)} / {ratio(v8, lc)} "
          f"| {fmt(100 * lc / lim, 0, '%')} / {fmt(100 * best / lim, 0, '%')} "
          f"| {fmt(num(s.get('llamacpp_pct_of_round_limit')), 0, '%')} / {fmt(rp, 0, '%')} "
          f"| {fmt(lp)} / {fmt(vpb)} | {ratio(vpb, lp)} "
          f"| {fmt(num(s.get('vicugna_peak_rss_mib')), 0)} / {fmt(num(s.get('llamacpp_peak_rss_mib')), 0)} MiB |")
print("\nbytes/token: the weights a decode step reads (for the mixture of experts, the non-expert "
      "weights and 2 of 8 experts); limit: bandwidth / bytes per token; each run's own limit: the "
      "mean of the bandwidth probed just before and just after that run (median over the rounds), "
      "for hosts whose bandwidth drifts; llama.cpp's RSS includes "
      "the Python interpreter of llama-cpp-python.")
PY
cat "$OUT/table.md"
echo
echo "(table and each model's output: $OUT)"
