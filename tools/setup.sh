#!/usr/bin/env bash
# Install mxfp8-moe (editable) with the NVRTC / cuda-bindings that match torch's CUDA major version.
# torch is installed first only when missing (a CPU build here; GPU machines bring their own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch==2.13.0
# (-W ignore: before the test extra brings numpy, torch warns that it cannot find it.)
cuda_major=$("$PY" -W ignore -c "import torch; print((torch.version.cuda or '13').split('.')[0])")
"$PY" -m pip install -e ".[cu${cuda_major},test]"
