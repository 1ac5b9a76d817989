"""Run an MoE block expert-parallel with MXFP8 expert weights and check it against one device.

Each rank routes its own tokens, dispatches the copies to the experts' owners, runs its experts
(quantize -> gated gate_up GEMM -> quantize -> down GEMM, moe_gemm_mxfp8_nt_groupwise) and combines
the weighted outputs. Rank 0 then computes every token on all experts alone, with the same quantized
weights, and prints the largest difference (relative to the largest output) and the timings.

    torchrun --nproc-per-node 2 tools/ep_moe.py          # NCCL, one GPU per rank
    python tools/ep_moe.py                               # the same, spawning its own processes
    python tools/ep_moe.py --backend gloo --device cpu --experts 8 --hidden 512 --intermediate 256 \
        --top-k 2 --tokens 64                             # CPU: gloo, GEMMs on the reference backend
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# Before NCCL initializes: an all-to-all gains nothing from NVLink multicast (NVLS), and NVLS setup
# fails where the machine does not allow multicast memory.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
from mxfp8_moe import moe_gemm_mxfp8_nt_groupwise, quantize_activations  # noqa: E402
from mxfp8_moe.convert import from_bf16  # noqa: E402
from mxfp8_moe.expert_parallel import combine, dispatch, local_experts  # noqa: E402

AGREE = 1e-2  # both sides quantize and multiply each row identically; only GEMM tiling may differ


def mxfp8_experts(w13, w13_scale, w2, w2_scale, k_granularity):
    """expert_fn for dispatch's output: (rows sorted by expert, m_indptr) -> (rows, hidden) bf16.

    backend="auto": the CUDA kernels for CUDA tensors, the reference GEMM for CPU tensors.
    """
    granularity = (1, 1, k_granularity)

    def run(x: torch.Tensor, m_indptr: torch.Tensor) -> torch.Tensor:
        a, a_scale = quantize_activations(x, m_indptr, k_granularity)
        h = moe_gemm_mxfp8_nt_groupwise(a, w13, a_scale, w13_scale, m_indptr, granularity, is_gated=True)
        a, a_scale = quantize_activations(h, m_indptr, k_granularity)
        return moe_gemm_mxfp8_nt_groupwise(a, w2, a_scale, w2_scale, m_indptr, granularity)

    return run


def moe_one_device(tokens, topk_ids, topk_weights, experts, num_experts):
    """The same MoE block with every expert local: sort by expert, run, weighted sum in float32."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    m_indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    out = experts(tokens[order // top_k], m_indptr)
    slots = torch.empty(num_tokens * top_k, out.shape[1], dtype=torch.float32, device=out.device)
    slots[order] = out.float()
    return (slots.view(num_tokens, top_k, -1) * topk_weights.float().unsqueeze(-1)).sum(1).to(out.dtype)


def median_ms(fn, iters: int, sync) -> list[float]:
    """Median milliseconds of each phase of fn(mark), which calls mark() at the end of each phase."""
    samples = []
    for _ in range(iters + 2):  # the first two warm up (kernel compiles, allocator)
        sync()
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())

        fn(mark)
        samples.append([(b - a) * 1e3 for a, b in zip(marks, marks[1:])])
    return [statistics.median(phase) for phase in zip(*samples[2:])]


def run(args: argparse.Namespace) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        sync = torch.cuda.synchronize
    else:
        device, sync = torch.device("cpu"), lambda: None
        # Ranks share the host's cores; more threads than cores makes OpenMP's spinning threads fight.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    try:
        return compare(args, rank, world, device, sync)
    finally:
        dist.destroy_process_group()


def compare(args, rank, world, device, sync) -> int:
    E, H, inter, top_k, kg = args.experts, args.hidden, args.intermediate, args.top_k, args.k_granularity
    # Every rank draws the same weights; each quantizes its own experts (quantization is per expert,
    # so rank 0's full copy for the check holds bit-identical slices).
    gen = torch.Generator().manual_seed(args.seed)
    w13 = torch.randn(E, 2 * inter, H, generator=gen).mul_(H**-0.5).to(torch.bfloat16)  # [up; gate] rows
    w2 = torch.randn(E, H, inter, generator=gen).mul_(inter**-0.5).to(torch.bfloat16)
    mine = local_experts(E)
    local = mxfp8_experts(*from_bf16(w13[mine.start:mine.stop].to(device), kg),
                          *from_bf16(w2[mine.start:mine.stop].to(device), kg), kg)

    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    tokens = torch.randn(args.tokens, H, generator=gen).to(device, torch.bfloat16)
    logits = torch.randn(args.tokens, E, generator=gen).to(device)
    topk_weights, topk_ids = logits.softmax(-1).topk(top_k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)

    def ep_forward(mark):
        x, m_indptr, handle = dispatch(tokens, topk_ids, E)
        mark()
        y = local(x, m_indptr)
        mark()
        out = combine(y, handle, topk_weights)
        mark()
        return out, x.shape[0]

    out, rows = ep_forward(lambda: None)
    dist.barrier()
    phases = torch.tensor(median_ms(ep_forward, args.iters, sync), dtype=torch.float64, device=device)
    dist.all_reduce(phases, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    all_tokens, all_ids, all_weights, ep_out = map(gather, (tokens, topk_ids, topk_weights, out))
    rows = gather(torch.tensor([rows], device=device)).tolist()
    if rank != 0:
        return 0

    everything = mxfp8_experts(*from_bf16(w13.to(device), kg), *from_bf16(w2.to(device), kg), kg)

    def one_device(mark):
        result = moe_one_device(all_tokens, all_ids, all_weights, everything, E)
        mark()
        return result

    want = one_device(lambda: None)
    (one_ms,) = median_ms(one_device, args.iters, sync)
    error = ((ep_out.float() - want.float()).abs().max() / want.float().abs().max()).item()
    dispatch_ms, experts_ms, combine_ms = phases.tolist()
    print(f"ep_moe: {world} ranks ({args.backend}, {args.device}), E={E} ({E // world} per rank), H={H}, "
          f"intermediate={inter}, top_k={top_k}, {args.tokens} tokens per rank, k_granularity={kg}")
    print(f"rows received per rank: {rows}")
    print(f"max relative error, EP vs one device (max |diff| / max |out|): {error:.3e} "
          f"({'agree' if error <= AGREE else 'DISAGREE'}, bound {AGREE:g})")
    print(f"EP forward, median of {args.iters}, slowest rank: dispatch {dispatch_ms:.3f} ms, experts "
          f"{experts_ms:.3f} ms, combine {combine_ms:.3f} ms, total {dispatch_ms + experts_ms + combine_ms:.3f} ms")
    print(f"one device (rank 0, {world * args.tokens} tokens, all {E} experts): {one_ms:.3f} ms")
    return 0 if error <= AGREE else 1


def spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    status = run(args)
    if status:
        sys.exit(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--k-granularity", type=int, choices=[32, 128], default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.backend == "nccl") != (args.device == "cuda"):
        parser.error("use --backend nccl with --device cuda, or --backend gloo with --device cpu")

    if "RANK" in os.environ:  # torchrun set up the process group's environment
        return run(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(spawned, args=(args.nproc, port, args), nprocs=args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
