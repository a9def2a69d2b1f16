#!/usr/bin/env bash
# The evaluation loop end to end on one machine: `vicugna serve` with the
# default model answers a question file, the same server judges the answers
# (FastChat's single-answer grading), and `vicugna eval show` prints the table
# and draws the chart.
#
#   scripts/eval-e2e.sh [--questions FILE] [--judge-prompts FILE] [--ref-answers FILE] [--out DIR]
#
# Defaults: the repository's small files in crates/eval/tests/data. For
# MT-bench, pass FastChat's files by path, e.g.
#   scripts/eval-e2e.sh --questions .../mt_bench/question.jsonl \
#     --judge-prompts .../judge_prompts.jsonl --ref-answers .../mt_bench/reference_answer/gpt-4.jsonl
# Settings (environment): MAX_TOKENS=64 JUDGE_MAX_TOKENS=128 PARALLEL=4
#   VICUGNA_BIN=target/release/vicugna
# Only loopback addresses are used; the server is stopped on exit.
set -euo pipefail

die() { echo "eval-e2e: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/crates/eval/tests/data"
QUESTIONS="$DATA/questions.jsonl"
PROMPTS="$DATA/judge_prompts.jsonl"
REFS="$DATA/reference_answers.jsonl"
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --questions) QUESTIONS="${2:?}"; shift 2 ;;
        --judge-prompts) PROMPTS="${2:?}"; shift 2 ;;
        --ref-answers) REFS="${2:?}"; shift 2 ;;
        --out) OUT="${2:?}"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
MAX_TOKENS="${MAX_TOKENS:-64}"
JUDGE_MAX_TOKENS="${JUDGE_MAX_TOKENS:-128}"
PARALLEL="${PARALLEL:-4}"
VICUGNA_BIN="${VICUGNA_BIN:-$ROOT/target/release/vicugna}"
OUT="${OUT:-$(mktemp -d -t vicugna-eval.XXXXXX)}"
mkdir -p "$OUT"

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

[ -x "$VICUGNA_BIN" ] || (cd "$ROOT" && cargo build --release -p vicugna-cli)
LOG="$OUT/serve.log"
"$VICUGNA_BIN" serve --port 0 --controller-port 0 --worker-port 0 >"$LOG" 2>&1 &
SERVER_PID=$!
URL=""
for _ in $(seq 1 1800); do
    URL="$(sed -n 's/^ *API: *\(http[^ ]*\)\/v1.*/\1/p' "$LOG" | head -n1)"
    [ -n "$URL" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$LOG" >&2; die "vicugna serve exited"; }
    sleep 0.1
done
[ -n "$URL" ] || die "vicugna serve printed no URL (log: $LOG)"
MODEL=""
for _ in $(seq 1 300); do
    MODEL="$(python3 -c 'import json,sys,urllib.request; d=json.load(urllib.request.urlopen(sys.argv[1]+"/v1/models"))["data"]; print(d[0]["id"] if d else "")' "$URL" 2>/dev/null || true)"
    [ -n "$MODEL" ] && break
    sleep 0.2
done
[ -n "$MODEL" ] || die "the server lists no model"
echo "eval-e2e: $MODEL served at $URL; files in $OUT"

T0=$(date +%s)
"$VICUGNA_BIN" eval answer --questions "$QUESTIONS" --model-id "$MODEL" --api-base "$URL" \
    --answer-file "$OUT/answers/$MODEL.jsonl" --max-tokens "$MAX_TOKENS" --parallel "$PARALLEL"
T1=$(date +%s)
"$VICUGNA_BIN" eval judge --mode single --judge-model "$MODEL" --judge-api-base "$URL" \
    --judge-prompts "$PROMPTS" --questions "$QUESTIONS" --answers "$OUT/answers" --ref-answers "$REFS" \
    --output "$OUT/judgments.jsonl" --max-tokens "$JUDGE_MAX_TOKENS" --parallel "$PARALLEL" --yes
T2=$(date +%s)
"$VICUGNA_BIN" eval show --judgments "$OUT/judgments.jsonl" --questions "$QUESTIONS" --chart "$OUT/scores.png"
echo "eval-e2e: answering took $((T1 - T0)) s, judging $((T2 - T1)) s; chart $OUT/scores.png"
