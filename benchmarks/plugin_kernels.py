"""GPU benchmark: the moe plugin kernels against the same layer step in PyTorch eager and torch.compile.

    python benchmarks/plugin_kernels.py                        # every shape below, fp16 + bf16, with torch.compile
    python benchmarks/plugin_kernels.py --batch 64 --dtypes fp16 --iters 50 --json out.json

Shapes: V-MoE B/16 (D=768, k=2, BPR) with E=8 and E=32, routing groups of 8 images at 224 px
(8 x 197 = 1,576 tokens, C=1.05) and at 384 px (8 x 577 = 4,616 tokens, C=1.5), capacity from
``exporter.models.routing.compute_capacity``; Soft-MoE S/16 (m=196 tokens, n=128 experts of p=1 slot,
D=384). Each row is the median of ``--iters`` launches timed with CUDA events. Its bandwidth is the
bytes the step must move at least (routing tensors read once, each needed token row read once, each
output written once), against the device-to-device copy bandwidth measured here first (bytes read
and written over time, the most a memory-bound kernel can reach).

Targets, printed at the end (and in ``--json``): per V-MoE shape and dtype, dispatch + combine
together reach at least 70% of the copy bandwidth, and routing + dispatch + combine take at most half
of torch.compile's time for the same three steps. Needs CUDA; exits 2 without it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


# V-MoE B/16 routing groups: (label, tokens per image, capacity factor of that config)
GROUPS = (("224px", 197, 1.05), ("384px", 577, 1.5))
BANDWIDTH_TARGET = 0.70  # dispatch + combine: share of the measured copy bandwidth
SPEEDUP_TARGET = 2.0  # routing + dispatch + combine: times faster than torch.compile


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="images per batch (a multiple of 8); default 64")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--experts", nargs="+", type=int, default=[8, 32], help="V-MoE experts; default 8 32")
    parser.add_argument("--groups", nargs="+", choices=[g for g, _, _ in GROUPS], default=[g for g, _, _ in GROUPS])
    parser.add_argument("--iters", type=int, default=200, help="timed launches per row; default 200")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (and its target)")
    parser.add_argument("--json", help="also write every row, the copy bandwidth and the targets as JSON")
    return parser.parse_args(argv)


def copy_bandwidth_gbps(warmup: int, iters: int, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of ``nbytes``: (bytes read + bytes written) / time, in GB/s."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), warmup, iters)
    return 2 * nbytes / us / 1e3


def targets(rows: list[dict], copy_gbps: float) -> list[dict]:
    """The two targets per V-MoE shape and dtype, from the rows' times (pure: tested on CPU)."""
    out = []
    keys = sorted({(r["shape"], r["dtype"]) for r in rows if r["step"].startswith("TopK")})
    for shape, dtype in keys:
        got = {(r["step"].split()[0], r["impl"]): r for r in rows if (r["shape"], r["dtype"]) == (shape, dtype)}
        move = [got.get((s, "plugin")) for s in ("TopKDispatch", "TopKCombine")]
        if all(move):
            gbps = sum(r["bytes"] for r in move) / sum(r["us"] for r in move) / 1e3
            share = gbps / copy_gbps
            out.append(dict(shape=shape, dtype=dtype, target="dispatch+combine >= 70% of copy bandwidth",
                            value=round(share, 3), met=share >= BANDWIDTH_TARGET))  # fmt: skip
        steps = ("TopKRoute", "TopKDispatch", "TopKCombine")
        plugin, compiled = [got.get((s, "plugin")) for s in steps], [got.get((s, "compile")) for s in steps]
        if all(plugin) and all(compiled):
            speedup = sum(r["us"] for r in compiled) / sum(r["us"] for r in plugin)
            out.append(dict(shape=shape, dtype=dtype, target="routing+dispatch+combine >= 2x torch.compile",
                            value=round(speedup, 2), met=speedup >= SPEEDUP_TARGET))  # fmt: skip
    return out


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


def vmoe_cases(batch: int, experts: int, dtype, per_image: int = 197, capacity_factor: float = 1.05, label="224px"):
    """(name, shape, bytes, plugin fn, eager fn) for the three V-MoE steps."""
    import torch

    from exporter.models.routing import compute_capacity, route_top_k
    from exporter.models.vmoe import Combine, Dispatch
    from plugins.topk_combine.kernels import launch as combine
    from plugins.topk_dispatch.kernels import launch as dispatch
    from plugins.topk_route.kernels import launch as route
    from plugins.topk_route.reference import topk_route

    groups, tokens, dim, k = batch // 8, 8 * per_image, 768, 2
    capacity = compute_capacity(tokens * k, experts, capacity_factor)
    gen = torch.Generator(device="cuda").manual_seed(0)
    gates = torch.softmax(torch.randn(groups, tokens, experts, device="cuda", generator=gen), dim=-1)
    expert, slot, weight, table = topk_route(gates, k, capacity, 1)
    routing = route_top_k(gates, k, capacity, True)
    x = torch.randn(groups, tokens, dim, device="cuda", generator=gen).to(dtype)
    expert_out = torch.randn(experts, groups * capacity, dim, device="cuda", generator=gen).to(dtype)
    size = x.element_size()
    filled, kept = int((table >= 0).sum()), int((slot >= 0).sum())
    shape = f"B/16 {label} G={groups} S={tokens} E={experts} k={k} C={capacity} D={dim}"
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
    copy_gbps = copy_bandwidth_gbps(args.warmup, args.iters)
    print(f"{torch.cuda.get_device_name()}  copy {copy_gbps:.0f} GB/s (read + write)  batch {args.batch}  "
          f"median of {args.iters}")  # fmt: skip
    header = f"{'step':<16} {'dtype':<5} {'impl':<8} {'us':>9} {'GB/s':>8} {'% copy':>7}  shape"
    print(header)
    print("-" * len(header))
    rows = []
    groups = [g for g in GROUPS if g[0] in args.groups]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        cases = [
            c
            for label, per_image, cf in groups
            for e in args.experts
            for c in vmoe_cases(args.batch, e, dtype, per_image, cf, label)
        ] + soft_cases(args.batch, dtype)
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
                rows.append(dict(step=name, dtype=dtype_name, impl=impl, us=us, bytes=nbytes, shape=shape))
                print(
                    f"{name:<16} {dtype_name:<5} {impl:<8} {us:>9.1f} {gbps:>8.0f} "
                    f"{100 * gbps / copy_gbps:>6.1f}%  {shape}"
                )
    met = targets(rows, copy_gbps)
    print()
    for t in met:
        print(
            f"target {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:g}  ({t['dtype']}, {t['shape']})"
        )
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(dict(copy_gbps=copy_gbps, rows=rows, targets=met), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
