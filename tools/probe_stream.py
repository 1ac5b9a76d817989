"""How fast CTAs stream a decode GEMM's weight tiles through TMA with nothing else in the way (Hopper
GPU machine): the ceiling of a one-token GEMM whose few units leave most SMs idle (on the H100 the
GEMMs ran at 77-79 % of this probe's box copies by as many CTAs: docs/PERFORMANCE.md, session 7).
Here each CTA streams its own `rows` x K bytes of a weight matrix through a ring of
`stages` stages, one thread issuing the copies and waiting for them: no consumers, no scale
preparation, no hand-offs between warps. A stage is either the GEMM's copies (one TMA box of 64
rows x 128 bytes, 128-byte swizzle, per 64 rows) or one 1-D bulk copy of as many contiguous bytes.
If the boxes stream no faster than the GEMM does, the copy pattern is the per-SM limit; if the bulk
copies are much faster, a decode weight layout with contiguous stage tiles is the lever. A third
mode pulls the same bytes with plain 16-byte loads from 512 threads, 8 in flight each: if they are
much faster than either copy, the limit is the copy engine's, not the SM's path to L2. Placements
1 and 2 put one CTA on every SM and let only some stream: SMs 0 .. n-1 (two to a TPC) or the even
SMs (one to a TPC): if one per TPC streams faster per CTA, the two SMs of a TPC share the limit.

The weights are drawn once and copied six times; launch i reads copy i % 6, so no launch finds them
in L2 from the one before. Timed as tools/probe_gemm.py times its calls: launches back to back
after a warm-up, the launch gap included, as in a CUDA graph of decode steps.

    python3 tools/probe_stream.py                     # 32 CTAs x 128 rows x 7168: DeepSeek gate_up, T = 1
    python3 tools/probe_stream.py --ctas 32 64 128 132 --stages 5 9
    python3 tools/probe_stream.py --ctas 128 --k 1792      # the same bytes as the first, K split 4 ways
    python3 tools/probe_stream.py --ctas 32 64 --placement 1 2   # CTAs sharing TPCs or one per TPC
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

from mxfp8_moe.gemm.device import current_stream, device_info
from mxfp8_moe.gemm.launch import LaunchArguments
from mxfp8_moe.gemm.tensor_maps import BOX_K, MAP_BYTES, operand_map
from mxfp8_moe.jit.build import build
from mxfp8_moe.jit.runtime import LoadedKernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_gemm import COPIES, median_us  # noqa: E402

ENTRY = "mxfp8_moe_probe_stream"
LOAD_THREADS = 512
LOAD_UNROLL = 8
BOX_ROWS = 64

SOURCE = f"""#include "ptx/tma.cuh"
using namespace mxfp8_moe;

struct ProbeParams {{
    ptx::TensorMap weights;  // (rows, k) bytes: boxes of {BOX_ROWS} rows x {BOX_K} bytes, 128-byte swizzle
    const u8* base;          // the same matrix, for the 1-D copies
    i32 rows_per_cta;        // a multiple of {BOX_ROWS}
    i32 k;                   // a multiple of {BOX_K}
    i32 stages;
    i32 bulk;                // 1: a stage is one 1-D copy of rows_per_cta x {BOX_K} contiguous bytes
    u32* sink;               // written only if the loaded words XOR to a value random bytes never give
    i32* sms;                // [blockIdx.x]: the SM the CTA ran on
    i32 placement;           // which CTAs stream: see streams()
    i32 working;             // ... how many
}};

// Whether this CTA streams, and which rows (`rank`): placement 0, the first `working` CTAs of the
// grid; with one CTA on every SM, 1: those on SMs 0 .. working - 1 (both SMs of each TPC), 2: those
// on the even SMs 0, 2, .. (one SM per TPC, SMs 2i and 2i + 1 sharing a TPC).
__device__ __forceinline__ bool streams(const ProbeParams& p, int& rank) {{
    u32 sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    if (threadIdx.x == 0) p.sms[blockIdx.x] = static_cast<i32>(sm);
    rank = p.placement == 0 ? blockIdx.x : p.placement == 1 ? sm : sm / 2;
    return rank < p.working && (p.placement != 2 || sm % 2 == 0);
}}

// One stage's copies into ring slot kb % stages, counted on that slot's barrier.
__device__ __forceinline__ void issue(const ProbeParams& p, u32 tiles, u32 barriers, int kb, int rank) {{
    const int stage_bytes = p.rows_per_cta * {BOX_K}, slot = kb % p.stages, row0 = rank * p.rows_per_cta;
    const u32 barrier = barriers + 8 * slot, destination = tiles + slot * stage_bytes;
    ptx::mbarrier_arrive_expect_tx(barrier, stage_bytes);
    if (p.bulk) {{
        // The CTA's rows are contiguous: its K block kb is bytes [kb, kb + 1) x stage_bytes of them.
        const u8* source = p.base + static_cast<i64>(row0) * p.k + static_cast<i64>(kb) * stage_bytes;
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\\n"
                     :: "r"(destination), "l"(reinterpret_cast<u64>(source)), "r"(stage_bytes), "r"(barrier)
                     : "memory");
    }} else {{
        for (int r = 0; r < p.rows_per_cta; r += {BOX_ROWS})
            ptx::tma_load_2d(destination + r * {BOX_K}, &p.weights, kb * {BOX_K}, row0 + r, barrier);
    }}
}}

extern "C" __global__ void __launch_bounds__(32) {ENTRY}(const __grid_constant__ ProbeParams p) {{
    extern __shared__ __align__(1024) u8 shared[];
    int rank;
    if (threadIdx.x != 0 || !streams(p, rank)) return;
    const u32 tiles = (ptx::shared_address(shared) + 1023) & ~1023u;  // the swizzle's alignment
    const u32 barriers = tiles + p.stages * p.rows_per_cta * {BOX_K};
    for (int s = 0; s < p.stages; ++s) ptx::mbarrier_init(barriers + 8 * s, 1);
    ptx::fence_barrier_init();
    const int k_blocks = p.k / {BOX_K};
    for (int kb = 0; kb < p.stages && kb < k_blocks; ++kb) issue(p, tiles, barriers, kb, rank);
    for (int kb = 0; kb < k_blocks; ++kb) {{
        ptx::mbarrier_wait(barriers + 8 * (kb % p.stages), (kb / p.stages) & 1);
        if (kb + p.stages < k_blocks) issue(p, tiles, barriers, kb + p.stages, rank);
    }}
}}

// The same bytes pulled by plain 16-byte loads from every thread (no TMA, no shared memory): is the
// per-SM rate a limit of the copy engine or of the SM's path to L2?
extern "C" __global__ void __launch_bounds__({LOAD_THREADS}) {ENTRY}_loads(const __grid_constant__ ProbeParams p) {{
    int rank;
    if (!streams(p, rank)) return;
    const uint4* words = reinterpret_cast<const uint4*>(p.base + static_cast<i64>(rank) * p.rows_per_cta * p.k);
    const int count = p.rows_per_cta * p.k / 16;
    u32 folded = 0;
    for (int i = threadIdx.x; i < count; i += {LOAD_THREADS} * {LOAD_UNROLL}) {{
        uint4 w[{LOAD_UNROLL}];
#pragma unroll
        for (int u = 0; u < {LOAD_UNROLL}; ++u) {{
            const int j = i + u * {LOAD_THREADS};
            w[u] = j < count ? words[j] : make_uint4(0, 0, 0, 0);
        }}
#pragma unroll
        for (int u = 0; u < {LOAD_UNROLL}; ++u) folded ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
    }}
    if (folded == 0x9e3779b9u && threadIdx.x == 0) *p.sink = folded;
}}
"""


class ProbeParams(ctypes.Structure):
    """Mirror of ProbeParams in SOURCE (64-byte aligned there: padded to 192 bytes)."""

    _fields_ = [("weights", ctypes.c_uint8 * MAP_BYTES), ("base", ctypes.c_void_p), ("rows_per_cta", ctypes.c_int32),
                ("k", ctypes.c_int32), ("stages", ctypes.c_int32), ("bulk", ctypes.c_int32),
                ("sink", ctypes.c_void_p), ("sms", ctypes.c_void_p), ("placement", ctypes.c_int32),
                ("working", ctypes.c_int32), ("padding", ctypes.c_uint8 * 16)]


PLACEMENTS = {0: "first CTAs", 1: "SMs 0 .. n-1", 2: "even SMs"}
ONE_PER_SM_SHARED = 120 * 1024  # more than half an SM's shared memory: one CTA per SM


def probe(kernel: LoadedKernel, copies: list[torch.Tensor], sink: torch.Tensor, sms: torch.Tensor, working: int,
          rows: int, stages: int, mode: str, placement: int) -> tuple[float, int, int]:
    """Microseconds per launch, launched back to back, how many CTAs streamed `rows` rows each, and
    on how many TPCs."""
    calls = []
    for weights in copies:
        params = ProbeParams(base=weights.data_ptr(), rows_per_cta=rows, k=weights.shape[1], stages=stages,
                             bulk=int(mode == "bulk 1-D"), sink=sink.data_ptr(), sms=sms.data_ptr(),
                             placement=placement, working=working)
        ctypes.memmove(ctypes.addressof(params), operand_map(weights.data_ptr(), weights.shape[0], weights.shape[1],
                                                             BOX_ROWS), MAP_BYTES)
        shared = 0 if mode == "loads" else stages * rows * BOX_K + 8 * stages + 1024
        grid = working if placement == 0 else kernel.num_sms
        if placement:
            shared = max(shared, ONE_PER_SM_SHARED)
        calls.append(LaunchArguments((grid, 1, 1), shared, (params,)))
    stream = current_stream(0)
    us = median_us([lambda a=arguments: kernel.launch(a.grid, a.shared, stream, a.address) for arguments in calls])
    ran_on = sms[:calls[0].grid[0]].tolist()
    if placement and len(set(ran_on)) != len(ran_on):
        raise SystemExit(f"two CTAs shared an SM: {sorted(ran_on)}")
    streaming = [sm for sm in ran_on if placement == 0 or (sm < working if placement == 1
                                                           else sm % 2 == 0 and sm // 2 < working)]
    return us, len(streaming), len({sm // 2 for sm in streaming})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctas", type=int, nargs="+", default=[32], help="CTAs streaming")
    parser.add_argument("--rows", type=int, default=128, help="weight rows per CTA (a multiple of 64)")
    parser.add_argument("--k", type=int, default=7168, help="bytes per row (a multiple of 128)")
    parser.add_argument("--stages", type=int, nargs="+", default=[5])
    parser.add_argument("--placement", type=int, nargs="+", choices=sorted(PLACEMENTS), default=[0],
                        help="; ".join(f"{k}: {v}" for k, v in PLACEMENTS.items()))
    args = parser.parse_args()
    if args.rows % BOX_ROWS or args.k % BOX_K:
        parser.error(f"--rows must be a multiple of {BOX_ROWS} and --k of {BOX_K}")
    cubin, _ = build(SOURCE, arch=device_info(0).arch, label="probe_stream")
    copy_kernel, load_kernel = LoadedKernel(cubin, ENTRY, 0, 32), LoadedKernel(cubin, f"{ENTRY}_loads", 0, LOAD_THREADS)
    ranks = max(max(args.ctas), 2 * copy_kernel.num_sms)  # an SM's ID may exceed the SM count
    weights = torch.randint(0, 256, (ranks * args.rows, args.k), dtype=torch.uint8, device="cuda")
    copies = [weights.clone() for _ in range(COPIES)]
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    sms = torch.zeros(max(max(args.ctas), copy_kernel.num_sms), dtype=torch.int32, device="cuda")
    print("| placement | CTAs streaming | on TPCs | bytes per CTA | stages | copy | us | GB/s | GB/s per CTA |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for placement in args.placement:
        for ctas in args.ctas:
            runs = [(stages, mode) for stages in args.stages for mode in ("boxes", "bulk 1-D")] + [("-", "loads")]
            for stages, mode in runs:
                kernel = load_kernel if mode == "loads" else copy_kernel
                us, streamed, tpcs = probe(kernel, copies, sink, sms, ctas, args.rows, 1 if stages == "-" else stages, mode,
                                     placement)
                gigabytes = streamed * args.rows * args.k / 1e9
                print(f"| {PLACEMENTS[placement]} | {streamed} | {tpcs} | {args.rows * args.k} | {stages} | {mode} | {us:.1f} "
                      f"| {gigabytes / us * 1e6:.0f} | {gigabytes / us * 1e6 / max(streamed, 1):.1f} |", flush=True)


if __name__ == "__main__":
    main()
