#!/usr/bin/env bash
# Builds llama.cpp's `llama-batched-bench` from the llama.cpp sources vendored in
# the llama-cpp-python source archive on PyPI (the same llama.cpp that
# bench/vs-llamacpp.sh measures through llama-cpp-python), with the same GGML
# flags (bench/llamacpp-cmake-args.sh), and prints the binary's path. Cached in
# target/bench/llamacpp-src/: rebuilt only when the version or flags change.
#
#   bench/build-llama-batched-bench.sh        (LLAMACPP_VERSION=0.3.36, JOBS=2)
#
# Needs a C++ compiler and make; CMake is taken from PATH or installed with pip
# into target/bench/cmake-venv.
set -euo pipefail

die() { echo "build-llama-batched-bench: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
V="${LLAMACPP_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
DIR="$TARGET_DIR/bench/llamacpp-src"
SRC="$DIR/llama_cpp_python-$V"
BUILD="$DIR/build-$V"
BIN="$BUILD/bin/llama-batched-bench"
ARGS="$("$ROOT/bench/llamacpp-cmake-args.sh")"
STAMP="$V $ARGS"

if [[ -x "$BIN" && "$(cat "$BUILD/.built-with" 2>/dev/null)" == "$STAMP" ]]; then
    printf '%s\n' "$BIN"
    exit 0
fi
mkdir -p "$DIR"
command -v c++ >/dev/null || die "a C++ compiler (c++) is required"
command -v make >/dev/null || die "make is required"

if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    tarball="$DIR/llama_cpp_python-$V.tar.gz"
    if [[ ! -f "$tarball" ]]; then
        echo "== downloading the llama-cpp-python==$V source archive" >&2
        # --no-binary for this package only: its build requirements (CMake,
        # ninja) come as wheels, not compiled from source.
        python3 -m pip download --disable-pip-version-check --no-cache-dir --no-deps \
            --no-binary llama-cpp-python "llama-cpp-python==$V" -d "$DIR" >&2 \
            || die "pip download llama-cpp-python==$V failed"
    fi
    tar -xzf "$tarball" -C "$DIR" || die "could not unpack $tarball"
fi

CMAKE="$(command -v cmake || true)"
if [[ -z "$CMAKE" ]]; then
    CMAKE="$TARGET_DIR/bench/cmake-venv/bin/cmake"
    if [[ ! -x "$CMAKE" ]]; then
        echo "== installing CMake with pip into $TARGET_DIR/bench/cmake-venv" >&2
        python3 -m venv "$TARGET_DIR/bench/cmake-venv" || die "python3 -m venv failed"
        "$TARGET_DIR/bench/cmake-venv/bin/python" -m pip install --disable-pip-version-check -q cmake >&2 \
            || die "pip install cmake failed"
    fi
fi

echo "== building llama-batched-bench ($V, -j$JOBS): $ARGS" >&2
# shellcheck disable=SC2086 # ARGS is a list of flags
"$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF $ARGS >&2 \
    || die "CMake configure failed (see above)"
"$CMAKE" --build "$BUILD" --target llama-batched-bench -j "$JOBS" >&2 || die "build failed (see above)"
[[ -x "$BIN" ]] || die "built, but $BIN is missing"
printf '%s' "$STAMP" > "$BUILD/.built-with"
printf '%s\n' "$BIN"
