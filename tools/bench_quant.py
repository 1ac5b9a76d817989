"""Benchmark the fused activation quantizer against its HBM floor and the torch quantizer.

HBM floor = (bf16 tokens read + e4m3 written + scales written) / device-to-device copy bandwidth
measured in the same run; times are medians of CUDA-graph replays of 10 calls.

    python tools/bench_quant.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import copy_bandwidth, graph_time  # noqa: E402
from problems import indptr, routed_rows  # noqa: E402

from mxfp8_moe import k_align, m_padded, quantize_activations  # noqa: E402


def main() -> None:
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| cum_m | K | kg | floor us | fused us (% floor) | torch us |\n|---|---|---|---|---|---|")
    for cum_m in (8, 512, 8192):
        for k in (2048, 7168):
            for kg in (32, 128):
                rows = routed_rows(cum_m // 8, 128, 8)
                m_indptr = indptr(rows, "cuda")
                x = torch.randn(cum_m, k, device="cuda", dtype=torch.bfloat16)
                scale_bytes = 4 * k_align(k, kg) * m_padded(cum_m, 128)
                floor = (3 * cum_m * k + scale_bytes) / bandwidth
                fused = graph_time([lambda: quantize_activations(x, m_indptr, kg)] * 10)
                plain = graph_time([lambda: quantize_activations(x, m_indptr, kg, backend="torch")] * 10)
                print(f"| {cum_m} | {k} | {kg} | {floor * 1e6:.2f} | {fused * 1e6:.2f} ({100 * floor / fused:.0f}%) "
                      f"| {plain * 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
