"""Softmax top-k routing written out in float64 with the kernel's tie rule (the lower expert index
first among equal logits), independently of mxfp8_moe.routing: the check for both implementations."""

from __future__ import annotations

import torch


def reference_route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """(token, weight, m_indptr, slot_row) as float64/int64 CPU tensors."""
    logits = logits.double().cpu()
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    # A stable descending sort keeps equal logits in index order.
    experts = logits.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, experts)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    rows = [(int(e), t, float(w), t * top_k + j) for t in range(num_tokens)
            for j, (e, w) in enumerate(zip(experts[t], weights[t]))]
    rows.sort(key=lambda row: (row[0], row[1]))  # expert order, token order within an expert
    slot_row = torch.empty(len(rows), dtype=torch.int64)
    for position, (*_, pair) in enumerate(rows):
        slot_row[pair] = position
    counts = torch.bincount(experts.flatten(), minlength=num_experts)
    m_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return (torch.tensor([row[1] for row in rows], dtype=torch.int64),
            torch.tensor([row[2] for row in rows], dtype=torch.float64), m_indptr, slot_row)
