#!/usr/bin/env bash
# Load test of the OpenAI-compatible API: 1 streaming client, then N concurrent
# streaming clients, each phase for a bounded time, with the official `openai`
# Python client (AsyncOpenAI).
#
#   bench/load.sh [--url http://127.0.0.1:8000]
#
# Without --url it starts `vicugna serve` (default model, free ports) and stops it
# afterwards. Settings (environment):
#   CLIENTS=32 DURATION=30 MAX_TOKENS=32 PROMPT="Write a story about a llama."
#   LIMIT=32                    --limit-worker-concurrency for the server it starts
#   VICUGNA_BIN=target/release/vicugna
#   PYTHON=python3              a Python with `openai`; else target/load-venv is made
#
# Prints, per phase: requests/s, output tokens/s, time to first token and
# inter-token latency p50/p99, and the count of each HTTP status (or error).
# Requests ask for exactly MAX_TOKENS tokens (ignore_eos), so tokens/s compare.
# Only loopback addresses are used; every loop is bounded by DURATION.
set -euo pipefail

die() { echo "load: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

URL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --url) URL="${2:?--url needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done

CLIENTS="${CLIENTS:-32}"
DURATION="${DURATION:-30}"
MAX_TOKENS="${MAX_TOKENS:-32}"
LIMIT="${LIMIT:-32}"
PROMPT="${PROMPT:-Write a story about a llama.}"
VICUGNA_BIN="${VICUGNA_BIN:-$ROOT/target/release/vicugna}"

PY="${PYTHON:-python3}"
if ! "$PY" -c "import openai" 2>/dev/null; then
    VENV="$ROOT/target/load-venv"
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
        echo "load: installing the openai client into $VENV" >&2
        python3 -m venv "$VENV" || die "python3 -m venv failed"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check openai || die "pip install openai failed"
    fi
    PY="$VENV/bin/python"
fi

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [ -z "$URL" ]; then
    [ -x "$VICUGNA_BIN" ] || cargo build --release -p vicugna-cli
    LOG="$(mktemp -t vicugna-load.XXXXXX)"
    "$VICUGNA_BIN" serve --port 0 --controller-port 0 --worker-port 0 \
        --limit-worker-concurrency "$LIMIT" >"$LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        URL="$(sed -n 's/^ *API: *\(http[^ ]*\)\/v1.*/\1/p' "$LOG" | head -n1)"
        [ -n "$URL" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$LOG" >&2; die "vicugna serve exited"; }
        sleep 0.1
    done
    [ -n "$URL" ] || die "vicugna serve printed no URL (log: $LOG)"
    echo "load: started vicugna serve at $URL (limit-worker-concurrency $LIMIT)"
fi

"$PY" - "$URL" "$CLIENTS" "$DURATION" "$MAX_TOKENS" "$PROMPT" <<'EOF'
import asyncio, collections, statistics, sys, time

try:
    import httpx
except ImportError:  # newer openai releases depend on the client under this name
    import httpx2 as httpx
import openai

url, clients, duration, max_tokens, prompt = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def phase(n):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=n + 8)))
    model = (await client.models.list()).data[0].id
    statuses = collections.Counter()
    ttft, itl, tokens, done = [], [], 0, 0
    deadline = time.monotonic() + duration

    async def one_client():
        nonlocal tokens, done
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            last, first = None, None
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0.7, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True})
                usage = None
                async for chunk in stream:
                    now = time.monotonic()
                    if chunk.choices and chunk.choices[0].delta.content:
                        if first is None:
                            first = now
                            ttft.append(now - t0)
                        else:
                            itl.append(now - last)
                        last = now
                    if chunk.usage:
                        usage = chunk.usage
                statuses[200] += 1
                done += 1
                tokens += usage.completion_tokens if usage else 0
            except openai.APIStatusError as e:
                statuses[e.status_code] += 1
                if e.status_code == 429:
                    await asyncio.sleep(float(e.response.headers.get("retry-after", "1")))
            except openai.APIError as e:
                statuses["error: " + type(e).__name__ + ": " + str(e)[:80]] += 1

    t0 = time.monotonic()
    # Clients stop starting requests at the deadline; in-flight ones get 120 s more.
    await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(n))), duration + 120)
    wall = time.monotonic() - t0
    await client.close()
    return dict(clients=n, wall=wall, rps=done / wall, tps=tokens / wall, ttft=ttft, itl=itl, statuses=statuses)


def report(r):
    ms = lambda s: f"{s * 1000:8.1f} ms"
    print(f"clients {r['clients']:3d}: {r['rps']:7.2f} req/s  {r['tps']:8.1f} output tok/s  "
          f"TTFT p50 {ms(pct(r['ttft'], 50))} p99 {ms(pct(r['ttft'], 99))}  "
          f"ITL p50 {ms(pct(r['itl'], 50))} p99 {ms(pct(r['itl'], 99))}  "
          f"statuses {dict(sorted(r['statuses'].items(), key=str))}")


async def main():
    print(f"load: {url}, {duration:.0f} s per phase, {max_tokens} tokens per request")
    one = await phase(1)
    report(one)
    many = await phase(clients)
    report(many)
    ratio = many["tps"] / one["tps"] if one["tps"] else float("nan")
    bad = {k: v for k, v in many["statuses"].items() if k not in (200, 429)}
    print(f"throughput {clients} clients / 1 client: {ratio:.2f}x (target >= 3x); errors besides 429: {bad or 'none'}")

asyncio.run(main())
EOF
