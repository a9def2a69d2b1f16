#!/usr/bin/env bash
# vicugna delta apply vs FastChat 0.2.36's apply_delta on the same random
# llama-shaped model (1.22 GB of float16 weights per checkpoint; base in 4 shards),
# alternating runs; prints each run, the medians of wall time and peak RSS
# (/usr/bin/time -v), and vicugna/FastChat ratios. The largest tensor is
# 49152 x 2048 float16 = 201 MB, so the memory bound of issue #8 is
# 3 x 201 + 100 = 703 MB.
#
# Usage: bench/delta-vs-fastchat.sh [RUNS=3]
# Needs: /usr/bin/time, a venv with fschat==0.2.36 torch transformers
# (made under target/pyenv-weights when missing; override with $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
W=target/bench-delta
PY=${PYTHON:-target/pyenv-weights/bin/python}
if [ ! -x "$PY" ]; then
  python3 -m venv target/pyenv-weights
  target/pyenv-weights/bin/pip install -q torch transformers fschat==0.2.36 accelerate
fi
cargo build --release -q -p vicugna-cli -p vicugna-weights --example random_llama
TOK=${TOKENIZER:-../shared/fixtures/models/smollm2-tokenizer}
[ -d "$TOK" ] || TOK=/work/shared/fixtures/models/smollm2-tokenizer
if [ ! -f $W/base/model.safetensors.index.json ] || [ ! -f $W/delta/model.safetensors ]; then
  rm -rf $W && mkdir -p $W
  target/release/examples/random_llama --out $W/base --seed 1 --max-shard-size 400MB --tokenizer-from "$TOK"
  target/release/examples/random_llama --out $W/delta --seed 2 --scale 0.002 --max-shard-size 2GB --tokenizer-from "$TOK"
fi
echo "model: $(du -sh $W/base | cut -f1) base ($(ls $W/base/*.safetensors | wc -l) shards), $(du -sh $W/delta | cut -f1) delta"

measure() { # name, command... -> appends "wall_s rss_mb" to $W/$name.txt
  local name=$1; shift
  rm -rf $W/out
  sync
  /usr/bin/time -v "$@" >/dev/null 2>$W/time.log || { cat $W/time.log; exit 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" $W/time.log | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(grep "Maximum resident set size" $W/time.log | awk '{print $NF/1024}')
  echo "$wall $rss" >> $W/$name.txt
  printf "%-9s wall %7.2f s   peak RSS %8.1f MB\n" "$name" "$wall" "$rss"
}

rm -f $W/vicugna.txt $W/fastchat.txt
for i in $(seq "$RUNS"); do
  echo "run $i"
  measure vicugna target/release/vicugna delta apply --base $W/base --delta $W/delta --target $W/out
  measure fastchat "$PY" -m fastchat.model.apply_delta --base-model-path $W/base --delta-path $W/delta \
    --target-model-path $W/out
done
rm -rf $W/out

python3 - "$W" <<'PY'
import statistics, sys
w = sys.argv[1]
med = {}
for name in ("vicugna", "fastchat"):
    rows = [tuple(map(float, l.split())) for l in open(f"{w}/{name}.txt")]
    med[name] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
    print(f"median {name:9s} wall {med[name][0]:7.2f} s   peak RSS {med[name][1]:8.1f} MB   ({len(rows)} runs)")
v, f = med["vicugna"], med["fastchat"]
print(f"ratio vicugna/fastchat: time {v[0] / f[0]:.2f}x (target <= 1.0x), peak RSS {v[1] / f[1]:.3f}x (target <= 0.3x)")
print(f"vicugna peak RSS {v[1]:.0f} MB vs bound 3 x largest tensor + 100 MB = 703 MB")
PY
