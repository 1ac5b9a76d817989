#!/usr/bin/env bash
# compute-sanitizer over every kernel family on small problems (GPU machine; run through
# tools/device_run.sh). memcheck: no access outside the tensors; racecheck: no shared-memory
# hazards; synccheck: barriers used correctly. Logs under $OUT/sanitize-<tool>.log.
#   bash tools/device_run.sh bash tools/sanitize.sh
set -u
OUT=${OUT:-/tmp/out}
# Adversarial m_indptr through the MMA and SIMT kernels, the fused quantizer, and the few-units
# (K warps) and emulated-scale configurations at one token.
TESTS=(tests/test_adversarial_gpu.py tests/test_activation_quant_gpu.py
       "tests/test_gemm_gpu.py::test_model_shapes"  "tests/test_gemm_gpu.py::test_simt_kernel")
SELECT="adversarial or quant or simt or (model_shapes and qwen3-30b and (-1- or -16-))"
status=0
for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 99 \
        python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}" -k "$SELECT" >"$OUT/sanitize-$tool.log" 2>&1
    rc=$?
    echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$OUT/sanitize-$tool.log" | tail -3 | tr '\n' ' ')"
    [ $rc -eq 0 ] || status=1
done
exit $status
