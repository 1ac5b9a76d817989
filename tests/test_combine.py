"""The combine (mxfp8_moe/combine.py): the torch path on the CPU and the kernel on a GPU, against
a float64 sum of the same rows, with routings from the router itself."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe.combine import CombineSpec, combine_rows, kernel_takes
from mxfp8_moe.jit import inspect
from mxfp8_moe.jit.build import OPTIONS, kernel_dir
from mxfp8_moe.jit.compiler import compile_cubin
from mxfp8_moe.routing import route_topk

CUDA = torch.cuda.is_available()


def reference_combine(rows, weight, slot_row, num_tokens):
    picked = slot_row.long().cpu()
    weighted = rows.double().cpu()[picked] * weight.double().cpu()[picked].unsqueeze(1)
    return weighted.view(num_tokens, -1, rows.shape[1]).sum(dim=1)


def routed_rows(tokens, experts, top_k, hidden, device):
    token, weight, _, slot_row = route_topk(torch.randn(tokens, experts, device=device), top_k)
    rows = torch.randn(token.numel(), hidden, device=device).to(torch.bfloat16)
    return rows, weight, slot_row


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tokens,experts,top_k,hidden", [(1, 128, 8, 2048), (37, 32, 1, 7168), (64, 128, 4, 2880),
                                                         (5, 16, 3, 24)])
def test_matches_the_float64_sum(device, tokens, experts, top_k, hidden):
    if device == "cuda" and not CUDA:
        pytest.skip("no GPU")
    rows, weight, slot_row = routed_rows(tokens, experts, top_k, hidden, device)
    assert kernel_takes(rows, weight, slot_row) == (device == "cuda")
    out = combine_rows(rows, weight, slot_row, tokens)
    ref = reference_combine(rows, weight, slot_row, tokens)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=8e-3, atol=1e-5)  # one bf16 rounding
    assert torch.equal(combine_rows(rows, weight, slot_row, tokens), out)  # run to run: the same bits


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_a_row_outside_the_rows_makes_its_token_nan():
    rows, weight, slot_row = routed_rows(4, 16, 2, 64, "cuda")
    slot_row[3] = rows.shape[0]  # token 1, slot 1
    slot_row[4] = -1  # token 2, slot 0
    out = combine_rows(rows, weight, slot_row, 4)
    nan = out.isnan().all(dim=1).tolist()
    assert nan == [False, True, True, False]


def test_bad_shapes_name_the_arguments():
    with pytest.raises(ValueError, match="slot_row"):
        combine_rows(torch.randn(6, 8), torch.rand(6), torch.zeros(5, dtype=torch.int32), 2)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_120a"])
def test_kernel_builds_without_spills(arch):
    spec = CombineSpec(arch, 7168, 8)
    result = compile_cubin(spec.source(), arch=arch, include_dir=kernel_dir(), options=OPTIONS, label=spec.label)
    usage = inspect.resource_usage(result.log)
    assert usage["spill_stores"] == usage["spill_loads"] == usage["stack_frame"] == 0, usage
