#!/usr/bin/env bash
# CMAKE_ARGS for building llama-cpp-python (the bench's llama.cpp peer) on this machine.
# On x86 CPUs with AMX, llama.cpp's AMX buffer segfaults in ggml_backend_amx_mul_mat at the first decode
# (llama.cpp issue #20824, still open; measured here on an Intel Xeon with amx_int8: every llama.cpp worker exited
# -11). A native build turns AMX on by -march=native, so there the build names this CPU's x86 features one by one
# without AMX; every other machine keeps the native build.
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
if [[ "$(uname -m)" != x86_64 || " $flags " != *" amx_int8 "* ]]; then
    echo "-DGGML_NATIVE=ON"
    exit 0
fi
has() { [[ " $flags " == *" $1 "* ]]; }
args=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
            avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if has "${pair%%:*}"; then args+=("-DGGML_${pair#*:}=ON"); else args+=("-DGGML_${pair#*:}=OFF"); fi
done
echo "${args[*]}"
