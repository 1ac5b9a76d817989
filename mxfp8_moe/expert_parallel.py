"""Expert parallelism: move token copies to the ranks that own their experts and back.

W ranks split E experts evenly: rank r owns experts [r * E / W, (r + 1) * E / W). Each rank routes
its own tokens (top-k expert ids and weights per token). ``dispatch`` sends every (token, slot)
copy to the rank owning its expert, sorted so each receiving rank gets its rows grouped by local
expert, ready for grouped GEMMs with CSR offsets ``m_indptr``; ``combine`` sends the experts'
outputs back and sums them, weighted, into token order. The GEMMs themselves are the caller's
``expert_fn(tokens_sorted, m_indptr) -> outputs``.

Only torch.distributed collectives are used (``all_to_all_single``), so the same code runs on gloo
with CPU tensors and on NCCL with CUDA tensors. The one host sync is reading the exchanged counts:
the variable split sizes of the token exchange and the size of the receive buffer must be known on
the host, so a variable-size all-to-all cannot avoid it. Everything else stays on the device.

Expert ids outside [0, E) (-1, say, for a padded token or a dropped slot) select no expert: those
slots are not sent and contribute nothing. Checking ids instead would cost a second sync, and a
rank that raised alone would leave the others waiting in the collective.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.distributed as dist

from .checks import check_arg


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What combine needs to undo a dispatch.

    order: (T * top_k,) int64 flat (token, slot) indices sorted by expert, valid ones first; the
        first sum(send_splits) were sent, in this order.
    recv_order: (R,) int64, the received row of each expert-sorted row.
    send_splits / recv_splits: rows sent to / received from each rank.
    """

    order: torch.Tensor
    recv_order: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int
    top_k: int
    group: dist.ProcessGroup | None


def dispatch(
    tokens: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
    """Send each token copy to the rank that owns its expert.

    Args:
        tokens: (T, H) this rank's tokens (any dtype the backend's all-to-all moves).
        topk_ids: (T, top_k) integer expert ids in [0, num_experts); others select nothing.
        num_experts: E, a multiple of the group's size.
        group: the process group (default: the world).

    Returns:
        tokens_sorted: (R, H) the copies this rank received, grouped by local expert (within an
            expert: by source rank, then by the source's token order).
        m_indptr: (E / W + 1,) int32 CSR offsets of the local experts' rows in tokens_sorted.
        handle: for combine.
    """
    world = dist.get_world_size(group)
    check_arg(tokens.dim() == 2, "tokens", "2-D (T, H)", f"shape {tuple(tokens.shape)}")
    check_arg(topk_ids.dim() == 2 and topk_ids.shape[0] == tokens.shape[0], "topk_ids",
              f"(T, top_k) with T = {tokens.shape[0]}", f"shape {tuple(topk_ids.shape)}")
    check_arg(not topk_ids.is_floating_point() and not topk_ids.is_complex(), "topk_ids.dtype", "an integer dtype",
              topk_ids.dtype)
    check_arg(topk_ids.device == tokens.device, "topk_ids.device", f"tokens' device ({tokens.device})",
              topk_ids.device)
    num_local = len(local_experts(num_experts, group))
    num_tokens, top_k = topk_ids.shape
    device = tokens.device

    # Sorting by global expert id sorts by (destination rank, local expert), since
    # id = rank * (E / W) + local. Invalid ids get the key E: last, never sent.
    flat = topk_ids.flatten().long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(key, stable=True)
    # scatter_add, not bincount: bincount sizes its output from the data (a sync on CUDA).
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    per_expert.scatter_add_(0, key, torch.ones_like(key))
    per_expert = per_expert[:num_experts]

    # Queued before the sync below, so on a GPU the gather runs while the host waits for counts.
    send = tokens[order // top_k]

    # Exchange per (rank, local expert) counts rather than per rank: the receiver then knows each
    # received row's local expert from the counts alone, so no ids travel with the tokens.
    recv_per_expert = torch.empty_like(per_expert)
    dist.all_to_all_single(recv_per_expert, per_expert, group=group)
    counts = torch.cat([per_expert, recv_per_expert]).view(2, world, num_local).sum(-1)
    send_splits, recv_splits = counts.tolist()  # the host sync

    send = send[: sum(send_splits)]  # drops the invalid slots sorted last; a view, still contiguous
    received = tokens.new_empty((sum(recv_splits), tokens.shape[1]))
    dist.all_to_all_single(received, send, recv_splits, send_splits, group=group)

    # The received rows are grouped by (source rank, local expert); a stable sort on the local
    # expert regroups them by expert and keeps source order within each.
    block_expert = torch.arange(num_local, device=device).repeat(world)
    row_expert = torch.repeat_interleave(block_expert, recv_per_expert, output_size=received.shape[0])
    recv_order = torch.argsort(row_expert, stable=True)
    rows = recv_per_expert.view(world, num_local).sum(0)
    m_indptr = torch.cat([rows.new_zeros(1), rows.cumsum(0)]).to(torch.int32)
    handle = DispatchHandle(order, recv_order, send_splits, recv_splits, num_tokens, top_k, group)
    return received[recv_order], m_indptr, handle


def combine(expert_out: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    """Send expert outputs back to their tokens' ranks and sum them, weighted, per token.

    Args:
        expert_out: (R, H') outputs for dispatch's tokens_sorted, row for row.
        handle: dispatch's handle.
        topk_weights: (T, top_k) weights of this rank's routing (slots that selected no expert are
            ignored).

    Returns:
        (T, H') in expert_out's dtype: sum over slots of weight * output, accumulated in float32 in
        slot order (deterministic: no atomics) and rounded once.
    """
    rows = handle.recv_order.shape[0]
    check_arg(expert_out.dim() == 2 and expert_out.shape[0] == rows, "expert_out",
              f"(R, H') with R = {rows} (the dispatched rows)", f"shape {tuple(expert_out.shape)}")
    shape = (handle.num_tokens, handle.top_k)
    check_arg(tuple(topk_weights.shape) == shape, "topk_weights.shape", str(shape), tuple(topk_weights.shape))
    width = expert_out.shape[1]

    in_recv_order = torch.empty_like(expert_out)
    in_recv_order[handle.recv_order] = expert_out
    returned = expert_out.new_empty((sum(handle.send_splits), width))
    dist.all_to_all_single(returned, in_recv_order, handle.send_splits, handle.recv_splits, group=handle.group)

    slots = torch.zeros(handle.num_tokens * handle.top_k, width, dtype=torch.float32, device=expert_out.device)
    slots[handle.order[: returned.shape[0]]] = returned.float()
    weighted = slots.view(*shape, width) * topk_weights.to(torch.float32).unsqueeze(-1)
    return weighted.sum(1).to(expert_out.dtype)


def local_experts(num_experts: int, group: dist.ProcessGroup | None = None) -> range:
    """The global ids of the experts this rank owns."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_arg(num_experts > 0 and num_experts % world == 0, "num_experts",
              f"a positive multiple of the group size {world}", num_experts)
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def moe_expert_parallel(
    tokens: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    expert_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """dispatch -> expert_fn(tokens_sorted, m_indptr) on this rank's experts -> combine."""
    received, m_indptr, handle = dispatch(tokens, topk_ids, num_experts, group)
    return combine(expert_fn(received, m_indptr), handle, topk_weights)
