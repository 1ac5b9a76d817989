#!/usr/bin/env bash
# Entry point for the lent GPU machine (no package registry there): install the wheels carried in
# .whl/ (and .peers/), point at a scratch kernel cache, then run whatever command follows, logging
# under $OUT.
#   bash tools/device_run.sh python3 -m pytest -q -m gpu tests
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests PYTHONUNBUFFERED=1
# Peers the benchmarks compare with, where carried (.peers/: sgl-deep-gemm 0.2.1 and the
# apache-tvm-ffi 0.1.11 it links, not yet run there; 0.2.5's prebuilt extension was built against
# another torch: it needs c10::cuda::CUDAErrorLogCapture, which the machines' torch 2.11 lacks).
if ls .peers/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .peers/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/peers
fi
export MXFP8_MOE_CACHE_DIR=${MXFP8_MOE_CACHE_DIR:-/tmp/mxfp8-moe-cache}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
"$@" 2>&1 | tee "$OUT/run.log"
