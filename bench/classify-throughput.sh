#!/usr/bin/env bash
# Throughput of `vicugna classify` on the default model: items/s of vanilla and
# CARP zero-shot, with the engine's prefix KV-cache reuse on and off
# (--no-prefix-cache), on the same inputs in the same run. Prints the prompt
# tokens sent, the tokens whose KV cache was reused, and the speed-up.
#
#   bench/classify-throughput.sh            # 32 BBC news items, both methods
#   ITEMS=16 DATASET=zh bench/classify-throughput.sh
# Texts are clipped as in bench/classify-real.sh (BBC_WORDS, ZH_CHARS); EXTRA adds flags.
set -euo pipefail
cd "$(dirname "$0")/.."
ITEMS=${ITEMS:-32}
DATASET=${DATASET:-bbc}
METHODS=${METHODS:-"vanilla carp"}
BIN=${BIN:-target/release/vicugna}
WORK=${WORK:-target/classify-real}
EXTRA=${EXTRA:-}
export VICUGNA_HOME=${VICUGNA_HOME:-$HOME/.cache/vicugna}
[ -x "$BIN" ] || cargo build --release -p vicugna-cli
# The same seeded sample as bench/classify-real.sh.
PREP_ONLY=1 WORK="$WORK" BIN="$BIN" bench/classify-real.sh
case $DATASET in
  zh) flags=(--task "中文商品评论的情感倾向" --max-words "${ZH_CHARS:-150}") ;;
  *) flags=(--task "the topic of a BBC news article" --max-words "${BBC_WORDS:-120}") ;;
esac
for m in $METHODS; do
  for reuse in on off; do
    out="$WORK/tp-$DATASET-$m-$reuse.jsonl"
    rm -f "$out" "${out%.jsonl}".{run,metrics,summary}.json
    extra_flags=()
    [ "$reuse" = off ] && extra_flags=(--no-prefix-cache)
    echo "== $m, prefix reuse $reuse"
    # shellcheck disable=SC2086
    "$BIN" classify --labels "$WORK/$DATASET-labels.txt" --input "$WORK/$DATASET-test.jsonl" --limit "$ITEMS" \
      --method "$m" --output "$out" --summary-json "${out%.jsonl}.summary.json" "${flags[@]}" "${extra_flags[@]}" \
      $EXTRA >"${out%.jsonl}.log" 2>&1 || { tail -5 "${out%.jsonl}.log"; exit 1; }
  done
done
python3 - "$WORK" "$DATASET" "$METHODS" <<'PY'
import json, sys, os
work, ds, methods = sys.argv[1], sys.argv[2], sys.argv[3].split()
print("\n| method | prefix reuse | items | items/s | prompt tokens | reused tokens | generated | speed-up |")
print("|---|---|---|---|---|---|---|---|")
for m in methods:
    s = {r: json.load(open(os.path.join(work, f"tp-{ds}-{m}-{r}.summary.json"))) for r in ("on", "off")}
    for r in ("off", "on"):
        x = s[r]
        up = x["items_per_s"] / s["off"]["items_per_s"] if s["off"]["items_per_s"] else 0
        print(f"| {m} | {r} | {x['items']} | {x['items_per_s']:.3f} | {x['prompt_tokens']} | "
              f"{x['reused_tokens']} | {x['completion_tokens']} | {up:.2f}x |")
PY
