"""Estimate, before any GPU run, what moe::TopKRoute costs on an H200 against its routing group's
expert GEMMs, for V-MoE B/16 (E=8, k=2, BPR) at 224 and 384 px, batch 8 and 64.

    python benchmarks/route_estimate.py

The model (stated, not measured; the first GPU run's plugin_kernels.py rows replace it):
- programs: one per (group, block of 64 tokens); waves of 132 SMs, one program per SM at a time
  (4 warps each: conservative, more fit).
- work per program: for each of the group's token tiles, recompute its top-k (k max-reductions over
  64 x 8 gates) and compare 64 x 64 token pairs per pass (about 6 integer/float operations a pair:
  two priority compares, the tie-break, the expert match, the and, the sum), at 128 lanes per SM per
  cycle, 1.755 GHz boost, and an efficiency of 1/3 for reductions and latency with few warps.
- bytes: each program reads its group's gates once (from L2 after the first), writes its tokens'
  expert, slot and weight and its share of the slot table.
- expert GEMMs of a group: E x C rows through D x M and M x D (two matmuls), 2 FLOP per MAC, at
  790 TFLOP/s (bf16 dense, measured on this H200 kind) as a lower bound of their time.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.models.routing import compute_capacity  # noqa: E402

SMS, LANES, CLOCK_GHZ, EFFICIENCY = 132, 128, 1.755, 1 / 3
BLOCK, OPS_PER_PAIR = 64, 6
GEMM_TFLOPS = 790.0
D, M, E, K = 768, 3072, 8, 2


def estimate(per_image: int, capacity_factor: float, batch: int) -> dict:
    tokens = 8 * per_image
    groups = batch // 8
    capacity = compute_capacity(tokens * K, E, capacity_factor)
    tiles = math.ceil(tokens / BLOCK)
    programs = groups * tiles
    pair_ops = tiles * K * BLOCK * BLOCK * OPS_PER_PAIR  # per program
    topk_ops = tiles * K * BLOCK * E * 2
    cycles = (pair_ops + topk_ops) / (LANES * EFFICIENCY)
    program_us = cycles / (CLOCK_GHZ * 1e3)
    waves = math.ceil(programs / SMS)
    route_us = waves * program_us
    read = programs * tokens * E * 4  # each program reads its group's gates (L2 after the first)
    written = groups * (tokens * K * 3 * 4 + E * capacity * 4)
    gemm_us = groups * E * capacity * 2 * D * M * 2 / (GEMM_TFLOPS * 1e6)
    return dict(
        px=224 if per_image == 197 else 384,
        batch=batch,
        group_tokens=tokens,
        capacity=capacity,
        programs=programs,
        waves=waves,
        gops=(pair_ops + topk_ops) * programs / 1e9,
        l2_read_mb=read / 1e6,
        dram_mb=(groups * tokens * E * 4 + written) / 1e6,
        route_us=route_us,
        one_program_us=tiles * program_us * math.ceil(groups / SMS),  # the old kernel: a group's whole work on one SM
        gemm_us=gemm_us,
    )


def main() -> None:
    print("| B/16 | batch | group tokens | C | programs (waves) | Gop | L2 read | DRAM | TopKRoute µs | "
          "one program per group µs (before) | expert GEMMs µs (lower bound) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for per_image, cf in ((197, 1.05), (577, 1.5)):
        for batch in (8, 64):
            r = estimate(per_image, cf, batch)
            before = r["one_program_us"]
            print(
                f"| {r['px']} px | {batch} | {r['group_tokens']:,} | {r['capacity']:,} "
                f"| {r['programs']} ({r['waves']}) "
                f"| {r['gops']:.2f} | {r['l2_read_mb']:.1f} MB | {r['dram_mb']:.2f} MB | {r['route_us']:.0f} "
                f"| {before:.0f} | {r['gemm_us']:.0f} |"
            )


if __name__ == "__main__":
    main()
