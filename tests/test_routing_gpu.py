"""The one-launch routing kernel against the float64 reference and the torch path (GPU only)."""

from __future__ import annotations

import pytest
import torch

from mxfp8_moe.routing import MAX_ROWS, kernel_takes, route_kernel, route_torch

from routing_reference import reference_route

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 128, 8), (3, 8, 2), (64, 128, 8), (16, 256, 8), (37, 32, 1),
                                                  (MAX_ROWS // 4, 128, 4), (5, 1000, 32)])
def test_kernel_matches_the_reference(tokens, experts, top_k, dtype, renormalize):
    logits = (torch.randn(tokens, experts, device="cuda") * 3).to(dtype)
    assert kernel_takes(logits, top_k)
    token, weight, m_indptr, slot_row = route_kernel(logits, top_k, renormalize)
    ref_token, ref_weight, ref_indptr, ref_slot_row = reference_route(logits, top_k, renormalize)
    assert torch.equal(m_indptr.cpu().long(), ref_indptr)
    assert torch.equal(token.cpu(), ref_token)
    assert torch.equal(slot_row.cpu().long(), ref_slot_row)
    torch.testing.assert_close(weight.cpu().double(), ref_weight, rtol=2e-6, atol=1e-7)
    # The torch path gives the same rows where no logits tie (float32 random logits): how
    # torch.topk orders or picks among equal logits is unspecified, and bf16 logits tie often.
    if dtype == torch.float32:
        torch_token, _, torch_indptr, torch_slot_row = route_torch(logits, top_k, renormalize)
        assert torch.equal(token, torch_token) and torch.equal(m_indptr, torch_indptr)
        assert torch.equal(slot_row, torch_slot_row)


def test_ties_go_to_the_lower_expert():
    # Many equal logits in every row; the largest, 0, with both signs (-0 ties with +0).
    logits = torch.randint(-2, 1, (50, 64), device="cuda").float()
    signs = torch.randint(0, 2, (50, 64), device="cuda").float() * 2 - 1
    logits = torch.where(logits == 0, logits * signs, logits)
    token, weight, m_indptr, _ = route_kernel(logits, 6, True)
    ref_token, ref_weight, ref_indptr, _ = reference_route(logits, 6, True)
    assert torch.equal(m_indptr.cpu().long(), ref_indptr) and torch.equal(token.cpu(), ref_token)
    torch.testing.assert_close(weight.cpu().double(), ref_weight, rtol=2e-6, atol=1e-7)


def test_every_token_on_one_expert_and_empty_batches():
    logits = torch.full((300, 16), -5.0, device="cuda")
    logits[:, 11] = 5.0
    token, _, m_indptr, _ = route_kernel(logits, 1, True)
    assert m_indptr.tolist() == [0] * 12 + [300] * 5
    assert torch.equal(token, torch.arange(300, device="cuda"))
    token, weight, m_indptr, _ = route_kernel(logits[:0], 1, True)
    assert token.numel() == weight.numel() == 0 and m_indptr.tolist() == [0] * 17


def test_captured_in_a_cuda_graph():
    logits = torch.randn(8, 128, device="cuda")
    route_kernel(logits, 8, True)  # compile and load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token, weight, m_indptr, _ = route_kernel(logits, 8, True)
    for _ in range(3):
        logits.copy_(torch.randn(8, 128, device="cuda"))
        graph.replay()
        ref_token, _, ref_indptr, _ = reference_route(logits, 8, True)
        assert torch.equal(token.cpu(), ref_token) and torch.equal(m_indptr.cpu().long(), ref_indptr)
