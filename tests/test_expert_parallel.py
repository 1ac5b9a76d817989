"""Expert parallelism on CPU: two gloo processes against one process computing the same routing.

Every rank's inputs are a pure function of (case, rank), so the test process rebuilds all of them
and computes the expected result alone: token copies sorted by global expert with plain Python,
the same expert_fn over all E experts, and the weighted sum slot by slot.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mxfp8_moe.expert_parallel import combine, dispatch, local_experts, moe_expert_parallel

WORLD = 2
EXPERTS = 8  # 4 per rank
HIDDEN = 16
TIMEOUT_S = 25

ALL = list(range(EXPERTS))
# case: rank -> (its number of tokens, top_k, dtype, the expert ids it picks from, distinct per token)
CASES = {
    "random": lambda r: (5 + 4 * r, 2, torch.float32, ALL),
    # Experts 1 (rank 0's local 1) and 6 (rank 1's local 2) receive nothing.
    "empty_expert": lambda r: (7, 3, torch.float32, [0, 2, 3, 4, 5, 7]),
    # Rank 1 routes only to its own experts: it sends nothing to rank 0.
    "one_way": lambda r: (6, 2, torch.float32, ALL if r == 0 else [4, 5, 6, 7]),
    # Rank 0 has no tokens at all.
    "no_tokens": lambda r: (0 if r == 0 else 8, 2, torch.float32, ALL),
    # -1 and 99 select no expert.
    "dropped_slots": lambda r: (9, 3, torch.float32, [-1, 99, 0, 3, 5, 6]),
    "bf16": lambda r: (10, 2, torch.bfloat16, ALL),
    # Every copy goes to expert 5.
    "hot_expert": lambda r: (6, 1, torch.float32, [5]),
}


def inputs(case: str, rank: int):
    """(tokens (T, H), topk_ids (T, top_k), topk_weights (T, top_k)) of one rank in one case."""
    gen = torch.Generator().manual_seed(1000 * list(CASES).index(case) + rank)
    num_tokens, top_k, dtype, allowed = CASES[case](rank)
    tokens = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
    choice = torch.rand(num_tokens, len(allowed), generator=gen).argsort(1)[:, :top_k]
    ids = torch.tensor(allowed, dtype=torch.int32)[choice]
    weights = torch.rand(num_tokens, top_k, generator=gen).to(dtype)
    return tokens, ids, weights


def expert_fn(x: torch.Tensor, m_indptr: torch.Tensor, first_expert: int) -> torch.Tensor:
    """A per-row function of the row and its global expert id g, of a different width (2H)."""
    counts = m_indptr.diff()
    g = first_expert + torch.repeat_interleave(torch.arange(counts.numel()), counts, output_size=x.shape[0])
    g = g.to(torch.float32).unsqueeze(1)
    y = x.float()
    return torch.cat([y * (g + 1), torch.tanh(y - g)], 1).to(x.dtype)


def expected(case: str, rank: int):
    """(received rows, m_indptr, combined output) of `rank`, computed in one process."""
    per_rank = [inputs(case, r) for r in range(WORLD)]
    rows = {e: [] for e in range(EXPERTS)}  # expert -> [(source rank, token, slot)], in send order
    for src, (_, ids, _) in enumerate(per_rank):
        for t in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                if 0 <= ids[t, j] < EXPERTS:
                    rows[int(ids[t, j])].append((src, t, j))
    sorted_rows = [row for e in range(EXPERTS) for row in rows[e]]
    counts = [len(rows[e]) for e in range(EXPERTS)]
    m_indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.stack([per_rank[src][0][t] for src, t, _ in sorted_rows]) if sorted_rows else per_rank[0][0][:0]
    out = expert_fn(x, m_indptr, 0)

    tokens, ids, weights = per_rank[rank]
    result = torch.zeros(tokens.shape[0], out.shape[1])
    for i, (src, t, j) in enumerate(sorted_rows):
        if src == rank:
            result[t] += weights[t, j].float() * out[i].float()

    local = range(rank * EXPERTS // WORLD, (rank + 1) * EXPERTS // WORLD)
    received = x[m_indptr[local.start]: m_indptr[local.stop]]
    return received, m_indptr[local.start: local.stop + 1] - m_indptr[local.start], result.to(tokens.dtype)


def run_case(case: str):
    tokens, ids, weights = inputs(case, dist.get_rank())
    received, m_indptr, handle = dispatch(tokens, ids, EXPERTS)
    out = combine(expert_fn(received, m_indptr, local_experts(EXPERTS).start), handle, weights)
    # The one-call form must agree with dispatch + combine.
    again = moe_expert_parallel(tokens, ids, weights, EXPERTS,
                                lambda x, m: expert_fn(x, m, local_experts(EXPERTS).start))
    assert torch.equal(out, again)
    return received, m_indptr, out


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        torch.save({case: run_case(case) for case in CASES}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every case on 2 gloo processes once; {rank: {case: (received, m_indptr, out)}}."""
    out_dir = tmp_path_factory.mktemp("ep")
    context = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} expert-parallel processes did not finish in {TIMEOUT_S} s")
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rank", range(WORLD))
def test_two_ranks_match_one_process(two_ranks, case, rank):
    received, m_indptr, out = two_ranks[rank][case]
    want_received, want_indptr, want_out = expected(case, rank)
    assert torch.equal(m_indptr, want_indptr) and m_indptr.dtype == torch.int32
    assert torch.equal(received, want_received)
    torch.testing.assert_close(out, want_out)


def test_the_cases_cover_the_edges():
    """The routings really contain what the case names promise."""
    ids = {case: [inputs(case, r)[1] for r in range(WORLD)] for case in CASES}
    received = [expected("empty_expert", r)[1].diff() for r in range(WORLD)]
    assert received[0][1] == 0 and received[1][2] == 0
    assert ((ids["one_way"][1] >= 4) & (ids["one_way"][1] < 8)).all() and (ids["one_way"][0] < 4).any()
    assert ids["no_tokens"][0].shape[0] == 0
    assert ((ids["dropped_slots"][0] < 0) | (ids["dropped_slots"][0] >= EXPERTS)).any()


@pytest.fixture
def one_rank():
    """A one-process gloo group (no network), for argument checks."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(4), torch.zeros(4, 2, dtype=torch.int32), 8), r"tokens must be 2-D"),
        ((torch.zeros(4, 8), torch.zeros(3, 2, dtype=torch.int32), 8), r"topk_ids must be \(T, top_k\) with T = 4"),
        ((torch.zeros(4, 8), torch.zeros(4, 2), 8), r"topk_ids.dtype must be an integer dtype"),
        ((torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.int32), 0), r"num_experts must be a positive multiple"),
    ],
)
def test_dispatch_bad_arguments(one_rank, args, message):
    with pytest.raises(ValueError, match=message):
        dispatch(*args)


def test_combine_bad_arguments(one_rank):
    tokens, ids, weights = inputs("random", 0)
    received, m_indptr, handle = dispatch(tokens, ids, EXPERTS)
    with pytest.raises(ValueError, match=r"expert_out must be \(R, H'\) with R = 10"):
        combine(received[1:], handle, weights)
    with pytest.raises(ValueError, match=r"topk_weights.shape must be \(5, 2\)"):
        combine(received, handle, weights[:, :1])
