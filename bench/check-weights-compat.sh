#!/usr/bin/env bash
# Reference checks of the weight tools against the programs users know:
#  1. `vicugna delta apply` vs FastChat 0.2.36 apply_delta: every float16 bit equal;
#     `vicugna delta make` equals torch's float16 target - base.
#  2. `vicugna lora merge` vs peft merge_and_unload (float32 and bfloat16 bases).
#  3. GGUF written by `vicugna convert` (f16, q8_0, q4_0, q4_k from SmolLM2, via
#     GGUF -> HF -> GGUF) loads in llama.cpp (llama-cpp-python) and gives vicugna's
#     greedy tokens.
# Python packages (torch, transformers, fschat, peft; llama-cpp-python) go into
# venvs under target/ when missing ($PYTHON, $LLAMACPP_PYTHON override them).
# torch from PyPI is a multi-GB download, hence a documented check, not CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-target/pyenv-weights/bin/python}
if [ ! -x "$PY" ]; then
  python3 -m venv target/pyenv-weights
  target/pyenv-weights/bin/pip install -q torch transformers peft accelerate safetensors fschat==0.2.36
  PY=target/pyenv-weights/bin/python
fi
LPY=${LLAMACPP_PYTHON:-}
if [ -z "$LPY" ]; then
  if [ -x /work/main/bench/.venv-llamacpp/bin/python ]; then LPY=/work/main/bench/.venv-llamacpp/bin/python
  else
    [ -x target/pyenv-llamacpp/bin/python ] || { python3 -m venv target/pyenv-llamacpp &&
      target/pyenv-llamacpp/bin/pip install -q llama-cpp-python; }
    LPY=target/pyenv-llamacpp/bin/python
  fi
fi
TOK=../shared/fixtures/models/smollm2-tokenizer
[ -d "$TOK" ] || TOK=/work/shared/fixtures/models/smollm2-tokenizer
cargo build --release -q -p vicugna-cli -p vicugna-weights --example random_llama
V=target/release/vicugna
export VICUGNA_HOME=${VICUGNA_HOME:-$HOME/.cache/vicugna}

echo "== 1. delta apply/make vs FastChat 0.2.36"
"$PY" bench/check_delta_fastchat.py $V target/release/examples/random_llama target/compat-delta "$TOK" 2>&1 |
  grep -v -i "warn\|it/s\]" 

echo "== 2. lora merge vs peft"
"$PY" bench/check_lora_peft.py $V target/compat-lora 2>&1 | grep -v -i "warn\|it/s\]"

echo "== 3. GGUF from vicugna convert in llama.cpp"
W=target/compat-gguf
rm -rf $W && mkdir -p $W
GGUF=$($V generate --model default --prompt-ids 1 --max-new-tokens 1 >/dev/null 2>&1; find "$VICUGNA_HOME" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)
$V convert --input "$GGUF" --output $W/smollm2-hf --verify
for q in f16 q8_0 q4_0 q4_k; do
  if [ $q = f16 ]; then $V convert --input $W/smollm2-hf --output $W/smollm2-$q.gguf --verify
  else $V convert --input $W/smollm2-hf --output $W/smollm2-$q.gguf --quant $q --verify; fi
done
"$LPY" bench/check_gguf_llamacpp.py $V $W/smollm2-f16.gguf $W/smollm2-q8_0.gguf $W/smollm2-q4_0.gguf $W/smollm2-q4_k.gguf
# A Vicuna-shaped checkpoint: PyTorch .bin shards and a SentencePiece tokenizer.model.
$V convert --input tests/fixtures/models/tiny-llama-bin --output $W/tiny-llama-bin-f16.gguf --verify
"$LPY" bench/check_gguf_llamacpp.py $V $W/tiny-llama-bin-f16.gguf
echo "ALL WEIGHT CHECKS OK"
