#!/usr/bin/env bash
# Prints the CMake flags llama.cpp is built with for these benchmarks (used by
# bench/vs-llamacpp.sh for llama-cpp-python and bench/build-llama-batched-bench.sh):
# this CPU's vector extensions, as GGML_NATIVE would, but without AMX: where the
# hypervisor does not enable AMX state (as on these VMs) llama.cpp's AMX path
# dies in `ldtilecfg` with a protection fault; vicugna does not use AMX either.
set -euo pipefail
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
            avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if [[ "$flags" == *" ${pair%%:*} "* ]]; then
        args+=" -DGGML_${pair#*:}=ON"
    else
        args+=" -DGGML_${pair#*:}=OFF"
    fi
done
printf '%s\n' "$args"
