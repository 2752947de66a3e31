#!/usr/bin/env bash
# On a GPU box (Jetson-class, or any CUDA machine): does the GPU execution provider answer as the CPU does,
# and how fast?  Runs the tiny and real-text INT4 bundles on CPU and on PROVIDER (default cuda) and writes
# benchmarks/results/device-check-PROVIDER.json (+ .md).  See README "Where it runs" for the install line.
#
#   benchmarks/device_check.sh [PROVIDER]        e.g. cuda, tensorrt
#
# It uses only what is installed: an onnxruntime with PROVIDER (onnxruntime-gpu, not beside onnxruntime)
# and smoledge.  Bundles come from $BUNDLES (default bundles/) as tiny-int4/ and realtext-int4/; missing
# ones are exported here when smoledge[export] is installed, or copy them from any machine (a bundle is
# the same files on every platform).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PROVIDER=${1:-cuda}
BUNDLES=${BUNDLES:-bundles}
RESULT=benchmarks/results/device-check-$PROVIDER

"$PY" -c 'import onnxruntime as ort, sys
from smoledge.runtime.backends.onnx import provider_names
want = provider_names([sys.argv[1]])[0]
if want not in ort.get_available_providers():
    sys.exit(f"{want} is not in this onnxruntime ({ort.__version__}: {ort.get_available_providers()}); "
             "install onnxruntime-gpu instead of onnxruntime, see README \"Where it runs\"")' "$PROVIDER"

for name in tiny realtext; do
    dir=$BUNDLES/$name-int4
    [ -f "$dir/manifest.json" ] && continue
    flag=$([ "$name" = tiny ] && echo --tiny || true)
    echo "device_check: exporting $dir" >&2
    "$PY" -m smoledge.cli export "$("$PY" -m smoledge.cli demo-model $flag)" --quant int4 --out "$dir" >/dev/null
done

"$PY" -m smoledge.benchmarks.device_check --provider "$PROVIDER" --out "$RESULT.json" \
    --bundle "tiny=$BUNDLES/tiny-int4" --bundle "realtext=$BUNDLES/realtext-int4" | tee "$RESULT.md"
