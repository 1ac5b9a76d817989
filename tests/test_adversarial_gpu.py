"""m_indptr is never trusted: whatever it holds, the kernels stay inside their tensors (run this file
under compute-sanitizer memcheck for the proof) and leave rows that belong to no expert untouched."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise
from mxfp8_moe.gemm.device import device_info
from mxfp8_moe.gemm.heuristics import WGMMA_ARCHS, wgmma_spec
from mxfp8_moe.gemm.launch import get_kernel
from mxfp8_moe.gemm.families import SimtSpec

from problems import make_problem

pytestmark = pytest.mark.gpu
INT32_MAX = 2**31 - 1

ADVERSARIAL = {
    "decreasing": [0, 9, 4, 20, 20],
    "negative": [-5, -1, 6, -100, 20],
    "past_cum_m": [0, 6, 30, 1000, 5000],
    "int32_max": [0, INT32_MAX, INT32_MAX, 3, INT32_MAX],
    "int32_min": [-INT32_MAX - 1, 2, 7, -INT32_MAX - 1, 10],
    "first_not_zero": [4, 8, 12, 16, 20],
    "all_empty": [7, 7, 7, 7, 7],
}


def covered_rows(values, cum_m):
    """Rows the kernels may write: each expert's range after clamping to [0, cum_m]."""
    clamp = [min(max(v, 0), cum_m) for v in values]
    rows = set()
    for e in range(len(values) - 1):
        rows.update(range(clamp[e], max(clamp[e], clamp[e + 1])))
    return rows


@pytest.mark.parametrize("kernel", ["mma", "simt", "wgmma"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_adversarial_m_indptr(case, gated, kernel):
    problem = make_problem([5, 5, 5, 5], 128, 288, gated=gated)  # cum_m = 20, E = 4
    values = ADVERSARIAL[case]
    problem.m_indptr.copy_(torch.tensor(values, dtype=torch.int32))
    n_out = 64 if gated else 128
    out = torch.full((20, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    device = device_info(0)
    if kernel == "mma":
        moe_gemm_mxfp8_nt_groupwise(*problem.args, out=out, is_gated=gated)
    else:
        if kernel == "wgmma" and device.arch not in WGMMA_ARCHS:
            pytest.skip(f"the wgmma kernel needs sm_90a, this GPU is {device.arch}")
        spec = (wgmma_spec(device, 4, 4, 5.0, 128, 288, 128, gated) if kernel == "wgmma"
                else SimtSpec(device.arch, 128, 288, 128, gated))
        get_kernel(spec, 0)(*problem.args, out, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    written = ~torch.isnan(out).all(dim=1)
    allowed = torch.zeros(20, dtype=torch.bool)
    allowed[sorted(covered_rows(values, 20))] = True
    assert not (written.cpu() & ~allowed).any(), "a row outside every expert's range was written"
