"""GPU benchmark: the moe plugin kernels against the same layer step in PyTorch eager and torch.compile.

    python benchmarks/plugin_kernels.py                       # V-MoE B/16 (E=8, 32) and Soft-MoE S/16, fp16 + bf16
    python benchmarks/plugin_kernels.py --batch 128 --dtypes fp16 --peak-gbps 4800

Shapes: V-MoE B/16 routes groups of 8 images of 197 tokens, D=768, k=2, capacity factor 1.05
(capacity from ``exporter.routing.compute_capacity``); Soft-MoE S/16 has m=196 tokens, n=128 experts
of p=1 slot, D=384. Each row is the median of ``--iters`` launches timed with CUDA events, and the
bandwidth is the bytes the step must move at least (routing tensors read once, each needed token
row read once, each output written once), as a percent of ``--peak-gbps`` (H200: about 4800).
Needs CUDA; exits 2 without it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="images per batch (a multiple of 8); default 64")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--experts", nargs="+", type=int, default=[8, 32], help="V-MoE experts; default 8 32")
    parser.add_argument("--iters", type=int, default=200, help="timed launches per row; default 200")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--peak-gbps", type=float, default=4800.0, help="peak DRAM bandwidth in GB/s (H200: 4800)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    return parser.parse_args(argv)


def cuda_time_us(fn, warmup: int, iters: int) -> float:
    """Median of ``iters`` single-launch times, from CUDA events, in microseconds."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def vmoe_cases(batch: int, experts: int, dtype):
    """(name, shape, bytes, plugin fn, eager fn) for the three V-MoE steps."""
    import torch

    from exporter.models.vmoe import Combine, Dispatch
    from exporter.routing import compute_capacity, route_top_k
    from plugins.topk_combine.kernels import launch as combine
    from plugins.topk_dispatch.kernels import launch as dispatch
    from plugins.topk_route.kernels import launch as route
    from plugins.topk_route.reference import topk_route

    groups, tokens, dim, k = batch // 8, 8 * 197, 768, 2
    capacity = compute_capacity(tokens * k, experts, 1.05)
    gen = torch.Generator(device="cuda").manual_seed(0)
    gates = torch.softmax(torch.randn(groups, tokens, experts, device="cuda", generator=gen), dim=-1)
    expert, slot, weight, table = topk_route(gates, k, capacity, 1)
    routing = route_top_k(gates, k, capacity, True)
    x = torch.randn(groups, tokens, dim, device="cuda", generator=gen).to(dtype)
    expert_out = torch.randn(experts, groups * capacity, dim, device="cuda", generator=gen).to(dtype)
    size = x.element_size()
    filled, kept = int((table >= 0).sum()), int((slot >= 0).sum())
    shape = f"G={groups} S={tokens} E={experts} k={k} C={capacity} D={dim}"
    return [
        (
            "TopKRoute (BPR)",
            shape,
            gates.numel() * 4 + 3 * slot.numel() * 4 + table.numel() * 4,
            lambda: route(gates, k, capacity, 1),
            lambda: topk_route(gates, k, capacity, 1),
        ),
        (
            "TopKDispatch",
            shape,
            table.numel() * 4 + filled * dim * size + expert_out.numel() * size,
            lambda: dispatch(x, table, experts),
            lambda: Dispatch()(x, routing, experts, capacity),
        ),
        (
            "TopKCombine",
            shape,
            slot.numel() * 8 + kept * dim * size + x.numel() * size,
            lambda: combine(expert_out, slot, weight, capacity),
            lambda: Combine()(expert_out, routing, capacity),
        ),
    ]


def soft_cases(batch: int, dtype):
    """(name, shape, bytes, plugin fn, eager fn) for the three Soft-MoE steps (expert-major layout)."""
    import torch

    from exporter.models.soft_moe import SoftCombine, SoftDispatch
    from plugins.soft_combine.kernels import launch as combine
    from plugins.soft_dispatch.kernels import launch as dispatch
    from plugins.soft_route.kernels import launch as route

    tokens, experts, dim = 196, 128, 384
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, tokens, experts, device="cuda", generator=gen) * 3
    dispatch_w, combine_w = route(logits)
    x = torch.randn(batch, tokens, dim, device="cuda", generator=gen).to(dtype)
    slots = dispatch(x, dispatch_w, experts, 1)
    size = x.element_size()
    shape = f"B={batch} m={tokens} n={experts} p=1 D={dim}"
    return [
        (
            "SoftRoute",
            shape,
            3 * logits.numel() * 4,
            lambda: route(logits),
            lambda: (torch.softmax(logits, dim=1), torch.softmax(logits, dim=-1)),
        ),
        (
            "SoftDispatch",
            shape,
            x.numel() * size + dispatch_w.numel() * 4 + slots.numel() * size,
            lambda: dispatch(x, dispatch_w, experts, 1),
            lambda: SoftDispatch()(x, dispatch_w.to(dtype), experts),
        ),
        (
            "SoftCombine",
            shape,
            slots.numel() * size + combine_w.numel() * 4 + x.numel() * size,
            lambda: combine(slots, combine_w, experts, 1),
            lambda: SoftCombine()(slots, combine_w.to(dtype)),
        ),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("plugin_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}  peak {args.peak_gbps:.0f} GB/s  batch {args.batch}  median of {args.iters}")
    header = f"{'step':<16} {'dtype':<5} {'impl':<8} {'us':>9} {'GB/s':>8} {'% peak':>7}  shape"
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        cases = [c for e in args.experts for c in vmoe_cases(args.batch, e, dtype)] + soft_cases(args.batch, dtype)
        for name, shape, nbytes, plugin, eager in cases:
            impls = [("plugin", plugin), ("eager", eager)]
            if not args.no_compile:
                impls.append(("compile", torch.compile(eager)))
            for impl, fn in impls:
                try:
                    us = cuda_time_us(fn, args.warmup, args.iters)
                except Exception as error:  # torch.compile may fail on some steps: report, keep going
                    print(f"{name:<16} {dtype_name:<5} {impl:<8} {'failed':>9}  {type(error).__name__}: {error}"[:160])
                    continue
                gbps = nbytes / us / 1e3
                print(
                    f"{name:<16} {dtype_name:<5} {impl:<8} {us:>9.1f} {gbps:>8.0f} "
                    f"{100 * gbps / args.peak_gbps:>6.1f}%  {shape}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
