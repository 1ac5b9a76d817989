#!/usr/bin/env bash
# compute-sanitizer over every kernel family on small problems (GPU machine; run through
# tools/device_run.sh). memcheck: no access outside the tensors; racecheck: no shared-memory
# hazards; synccheck: barriers used correctly. Logs under $OUT/sanitize-<tool>.log.
#   bash tools/device_run.sh bash tools/sanitize.sh
#   SANITIZE_TOOLS="racecheck synccheck" ...   # a subset of the tools
set -u
OUT=${OUT:-/tmp/out}
TESTS=(tests/test_adversarial_gpu.py tests/test_activation_quant_gpu.py tests/test_gemm_gpu.py tests/test_w4a8_gpu.py
       tests/test_routing_gpu.py tests/test_combine.py)
# memcheck: adversarial m_indptr through the MMA and SIMT kernels, the fused quantizer, the
# few-units (K warps) and emulated-scale configurations, the wgmma kernel (sm_90a; split K and
# MXFP4 weights included), MXFP4 on mma.sync, and the MoE block's routing and combine kernels (a
# gathered row outside x, a slot row outside the rows included).
BROAD="adversarial or quant or simt or wgmma or split_k or (model_shapes and qwen3-30b and (-1- or -16-)) \
or (mxfp4_weights and no-bias and not model_shapes) or kernel_matches or ties or one_expert or outside or float64_sum"
# racecheck and synccheck replay every shared-memory access (~10 s a test): one case per kernel
# family and configuration kind, on small problems (racecheck's host memory grows with the
# problem: a test_wgmma_kernel case needs more than 128 GB).
NARROW="(adversarial and decreasing and True) or empty_and_adversarial or wgmma_kernel_small \
or (model_shapes and qwen3-30b and emulated and gate_up-1-) or (wgmma_split_k and 32-True-2) \
or (mxfp4_on_the_wgmma_kernel and clamped-bias-small) or (kernel_matches_the_reference and 64-128-8) \
or (float64_sum and cuda and 64-128-4)"
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    select=$NARROW
    [ "$tool" = memcheck ] && select=$BROAD
    compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 99 \
        python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}" -k "$select" >"$OUT/sanitize-$tool.log" 2>&1
    rc=$?
    echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$OUT/sanitize-$tool.log" | tail -3 | tr '\n' ' ')"
    [ $rc -eq 0 ] || status=1
done
exit $status
