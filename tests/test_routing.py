"""Routing (mxfp8_moe/routing.py) without a GPU: the torch path against the float64 reference, the
argument checks, and the one-launch kernel's build for the GPUs it targets."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe.jit import inspect
from mxfp8_moe.jit.build import OPTIONS, kernel_dir
from mxfp8_moe.jit.compiler import compile_cubin
from mxfp8_moe.routing import MAX_ROWS, RouteSpec, kernel_takes, route_topk

from routing_reference import reference_route


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (7, 32, 1), (33, 128, 8), (5, 256, 8)])
def test_torch_path_matches_the_reference(tokens, experts, top_k, renormalize):
    logits = torch.randn(tokens, experts)
    token, weight, m_indptr, slot_row = route_topk(logits, top_k, renormalize)
    ref_token, ref_weight, ref_indptr, ref_slot_row = reference_route(logits, top_k, renormalize)
    assert torch.equal(m_indptr.long(), ref_indptr) and m_indptr.dtype == torch.int32
    assert torch.equal(token, ref_token)
    assert torch.equal(slot_row.long(), ref_slot_row) and slot_row.dtype == torch.int32
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-6, atol=0)


def test_cpu_logits_take_the_torch_path():
    assert not kernel_takes(torch.randn(4, 16), 2)


@pytest.mark.parametrize("shape,top_k", [((4,), 1), ((4, 8), 0), ((4, 8), 9)])
def test_bad_arguments_name_themselves(shape, top_k):
    with pytest.raises(ValueError, match="router_logits"):
        route_topk(torch.randn(shape), top_k)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_120a", "sm_121a"])
@pytest.mark.parametrize("experts,top_k,bf16", [(128, 8, True), (256, 8, False), (32, 4, True), (1024, 32, False)])
def test_kernel_builds_without_spills(arch, experts, top_k, bf16):
    spec = RouteSpec(arch, experts, top_k, bf16, True)
    result = compile_cubin(spec.source(), arch=arch, include_dir=kernel_dir(), options=OPTIONS, label=spec.label)
    usage = inspect.resource_usage(result.log)
    assert usage["spill_stores"] == usage["spill_loads"] == usage["stack_frame"] == 0, usage
    # The chosen experts and weights of MAX_ROWS rows, plus two int32 per expert.
    assert usage["static_shared"] == MAX_ROWS * 8 + experts * 8, usage
