"""The reports more than one command prints: the parity table (validate, demo, build engine), the
export, rewrite and bundle summaries, notes."""

from __future__ import annotations

import math
from collections import Counter

from exporter.commands.console import as_options, console, escape
from exporter.settings import Precision, RoutingPrecision

# --- the parity table -------------------------------------------------------------------------------


def share(x: float) -> str:
    """A percentage that never rounds a shortfall up to 100%."""
    return "100%" if x == 1.0 else f"{math.floor(x * 1e4) / 1e2:.2f}%"


def mark(ok: bool) -> str:
    return "[green]pass[/green]" if ok else "[red]FAIL[/red]"


def print_report(report) -> None:
    """A ParityReport: outputs, routing per V-MoE layer, notes, verdict."""
    out = console()
    precision = ""
    if report.precision != Precision.FP32:
        routing = "routing in FP32" if report.routing_precision == RoutingPrecision.FP32 else "routing reduced too"
        precision = f", {report.precision} ({routing})"
    out.print(
        f"[bold]{escape(report.graph)}[/bold] vs PyTorch {escape(report.model)} "
        f"on {report.backend}, batch {report.batch}{precision}"
    )
    _print_outputs(out, report)
    if report.routing:
        _print_routing(out, report)
    else:
        out.print(f"routing: {report.routing_status}")
    explained = [r for r in report.routing if r.gate_error is not None]
    if explained:
        _print_flips(out, explained)
    if report.soft_routing:
        _print_soft_routing(out, report.soft_routing)
    if report.rounding is not None:
        _print_rounding(out, report.rounding, report.tolerances["rtol"])
    if any(r.slot_swaps for r in report.routing):
        out.print(
            "[yellow]note:[/yellow] slot swaps: tokens with the same expert and kept decision took each other's "
            "buffer slots (tied priorities ordered differently); outputs are unaffected"
        )
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(as_options(note))}")
    out.print(f"{mark(report.passed)} ({report.seconds:.1f}s)")


def _table(title: str, cols, left=("layer",)):
    """A report table: the title above it on the left, no box; the ``left`` columns left-justified,
    the others right-justified."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for col in cols:
        t.add_column(col, justify="left" if col in left else "right")
    return t


def _print_outputs(out, report) -> None:
    """Each output's errors against PyTorch and its verdict."""
    cols = ("output", "shape", "max abs err", "max rel err", f"rel tol {report.tolerances['rtol']:g}")
    t = _table("outputs", cols, left=("output", "shape"))
    for o in report.outputs:
        t.add_row(escape(o.name), "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", mark(o.passed))
    out.print(t)


def _print_routing(out, report) -> None:
    """The routing decisions' agreement per V-MoE layer, and what pass/FAIL judges when it is not all."""
    cols = ("layer", "pairs", "expert", "kept", "slot", "all", "slot swaps", "dropped (torch / graph)", "")
    t = _table("routing per V-MoE layer", cols)
    for r in report.routing:
        t.add_row(
            escape(r.layer),
            str(r.pairs),
            share(r.expert),
            share(r.kept),
            share(r.slot),
            share(r.agreement),
            str(r.slot_swaps),
            f"{r.dropped_expected:.1%} / {r.dropped_actual:.1%}",
            mark(r.passed),
        )
    out.print(t)
    agreement = report.tolerances["routing_agreement"]
    if agreement < 1 or any(r.decisions < 1 for r in report.routing):
        out.print(
            "[yellow]note:[/yellow] pass/FAIL judges each pair's decisions, its expert and kept/dropped "
            f"together: at least {share(agreement)} of the pairs per layer (lowest here "
            f"{share(min(r.decisions for r in report.routing))}). slot and all are shown, not judged: one "
            "flipped expert choice moves the buffer position of every later token of both experts in its "
            "group, so slots differ far more often than decisions (and slot swaps only count where every "
            "decision agrees)"
        )


def _print_flips(out, explained) -> None:
    """The flipped decisions of each V-MoE layer and their causes."""
    cols = ("layer", "flips", "gates", "cascade", "unexplained", "max gate err", "out err: flipped / clean images")
    t = _table("flipped decisions per V-MoE layer", cols)
    for r in explained:
        causes = Counter(r.causes)
        errs = " / ".join("-" if e is None else f"{e:.3g}" for e in (r.output_error_flipped, r.output_error_clean))
        t.add_row(
            escape(r.layer),
            str(r.flip_count),
            str(causes["gates"]),
            str(causes["cascade"]),
            str(r.unexplained) if not r.unexplained else f"[red]{r.unexplained}[/red]",
            f"{r.gate_error:.3g}",
            errs,
        )
    out.print(t)
    if any(r.flip_count for r in explained):
        out.print(
            "[yellow]note:[/yellow] a flip's cause is [bold]gates[/bold] when the reference's two competing "
            "gates (or priorities) were closer than the graph's deviation from them, [bold]cascade[/bold] when "
            "an expert flip earlier in the group moved its buffer position (--json lists each flip)"
        )


def _print_soft_routing(out, soft_routing) -> None:
    """The Soft-MoE dispatch and combine weights' errors per layer."""
    t = _table("Soft-MoE weights per layer", ("layer", "dispatch max abs err", "(rel)", "combine max abs err", "(rel)"))
    for r in soft_routing:
        t.add_row(
            escape(r.layer),
            f"{r.dispatch_max_abs:.3g}",
            f"{r.dispatch_max_rel:.3g}",
            f"{r.combine_max_abs:.3g}",
            f"{r.combine_max_rel:.3g}",
        )
    out.print(t)


def _print_rounding(out, r, rtol: float) -> None:
    """bf16 dispatch: the graph's bfloat16 roundings against PyTorch's (``compare.RoundingParity``)."""
    cols = ("roundings", "elements", "other way at a midpoint", "unexplained", "max rel err before", "")
    t = _table("bfloat16 dispatch roundings", cols, left=())
    unexplained = str(r.unexplained) if not r.unexplained else f"[red]{r.unexplained}[/red]"
    t.add_row(
        str(r.roundings), f"{r.elements:,}", str(r.at_midpoint), unexplained, f"{r.max_rel_before:.3g}", mark(r.passed)
    )
    out.print(t)
    out.print(
        f"[yellow]note:[/yellow] {r.at_midpoint} rounded elements lie within {rtol:g} (of their tensor's scale) of a "
        "midpoint between two bfloat16 values, where float32 noise decides the way they round, and the graph took "
        "the other way; PyTorch ran again rounding them as the graph did, and the tables above compare against "
        f"that run (against PyTorch's own rounding the max rel err was {r.max_rel_before:.3g})"
    )


def print_notes(notes) -> None:
    out = console()
    for note in notes:  # one line each, however long: a note names files and lines to find
        out.print(f"[yellow]note:[/yellow] {escape(as_options(note))}", soft_wrap=True)


# --- reports more than one command prints --------------------------------------------------------


def print_quantization(q: dict) -> None:
    """What an int8/fp8/w8/w4 export quantized, its calibration and the tokens each expert saw."""
    out = console()
    before, after = q["expert_weight_bytes"]
    if before:
        out.print(
            f"expert weights: {before / 2**20:,.2f} MiB -> {after / 2**20:,.2f} MiB ({before / max(after, 1):.2f}x "
            f"smaller); all weights {q['weight_bytes'][0] / 2**20:,.2f} -> {q['weight_bytes'][1] / 2**20:,.2f} MiB"
        )
    kept = ", ".join(f"{n} {reason}" for reason, n in q["float_nodes"].items())
    if kept:
        out.print(f"kept in FP32: {escape(kept)}; LayerNorm, softmax and residual adds carry no Q/DQ")
    if q["calibration"]:
        calibration = escape(as_options(q["calibration"]))
        out.print(f"calibration: {calibration} ({q['calibration_seconds']:.1f}s)", soft_wrap=True)
    for layer, tokens in q["expert_tokens"].items():
        out.print(escape(f"  {layer}: calibration tokens per expert {', '.join(map(str, tokens))}"))
    for warning in q["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {escape(as_options(warning))}", soft_wrap=True)


def print_export(result) -> None:
    out = console()
    precision, quantized = "", result.quantization
    if quantized is not None:
        done = sum(quantized["quantized_nodes"].values())
        precision = f", {result.precision} (routing in FP32; {done} MatMul/Gemm/Conv nodes quantized)"
    elif result.precision != Precision.FP32:
        routing = (
            "routing in FP32"
            if result.routing_precision == RoutingPrecision.FP32
            else f"routing in {result.precision} too"
        )
        kept = sum(result.fp32_nodes.values())
        precision = f", {result.precision} ({routing}; {kept} float nodes in FP32, {result.casts} Casts)"
    out.print(
        f"wrote [bold]{escape(str(result.path))}[/bold] ({result.size_bytes / 2**20:,.1f} MiB, opset {result.opset}, "
        f"{sum(result.op_counts.values())} nodes{precision}, export {result.seconds:.1f}s)"
    )
    for name, (dtype, dims) in {**result.inputs, **result.outputs}.items():
        kind = "input " if name in result.inputs else "output"
        out.print(escape(f"  {kind} {name}: {dtype}[{', '.join(map(str, dims))}]"))
    if not result.dynamic_batch:
        out.print("[yellow]warning:[/yellow] the model fixes its batch size, so the graph has a static batch")
    checked = ", ".join(f"{b} ({err:.1e})" for b, err in result.checked.items())
    if result.precision == Precision.FP32:
        out.print(f"checked against PyTorch at batch {checked} (max rel err)")
    else:  # the reduced graph's own differences are validate's to report, flips explained
        out.print(f"checked: its FP32 trace against PyTorch at batch {checked}, and the {result.precision} graph runs")
    if quantized is not None:
        print_quantization(quantized)
    if result.overflows:
        names = ", ".join(result.overflows[:5]) + (" ..." if len(result.overflows) > 5 else "")
        out.print(
            f"[yellow]warning:[/yellow] {len(result.overflows)} weights or constants hold finite values beyond "
            f"{result.precision}'s range, now infinite: {escape(names)}"
        )
    if result.findings:
        out.print(f"[yellow]warning:[/yellow] {len(result.findings)} TensorRT portability findings:")
        for f in result.findings[:20]:
            out.print(escape(f"  - {f}"))
    else:
        out.print("portable: standard ONNX ops only, none of the TensorRT hazards")
    if result.rtx_parse is not None:  # TensorRT for RTX's parser, beside the allow-list
        parsed = result.rtx_parse
        if parsed["parsed"]:
            out.print(f"TensorRT for RTX {parsed['version']} parses it ({parsed['layers']} layers)")
        else:
            first = parsed["errors"][0] if parsed["errors"] else {"op": "?", "node": "?", "message": "unknown"}
            out.print(
                f"[yellow]warning:[/yellow] TensorRT for RTX {parsed['version']} refuses it: {escape(first['op'])} "
                f"node {escape(repr(first['node']))}: {escape(first['message'])}"
            )
    print_notes(result.notes)


def print_rewrite(result) -> None:
    from rich.table import Table

    out = console()
    t = Table(title="MoE layers", title_justify="left", box=None, pad_edge=False)
    for col in ("layer", "family", "routing", "dispatch", "combine", ""):
        t.add_column(col)
    for layer in result.layers:
        if layer.replaced:
            cells = [escape(n.describe()) for n in layer.nodes]
            t.add_row(
                escape(layer.layer), layer.family, *cells, "[green]replaced[/green]" if result.path else "planned"
            )
        else:
            t.add_row(escape(layer.layer), layer.family, "", "", "", "[yellow]declined[/yellow]")
    out.print(t)
    for layer in result.declined:
        out.print(f"[yellow]declined[/yellow] {escape(layer.layer)}: {escape(layer.reason)}")
    counts = ", ".join(f"{n} {p}" for p, n in result.counts.items()) or "no plugin nodes"
    if result.path:
        out.print(f"wrote [bold]{escape(str(result.path))}[/bold]: {counts} ({result.seconds:.1f}s)")
    else:
        out.print(f"plan: {counts}; nothing written ({result.seconds:.1f}s)")


def print_bundle(result) -> None:
    out = console()
    size = sum(f["bytes"] for f in result.files.values())
    typed = "" if result.precision == Precision.FP32 else f", {result.precision} graphs with the routing in FP32"
    out.print(
        f"wrote [bold]{escape(str(result.path))}[/bold]: {len(result.files)} files, {size / 2**20:,.1f} MiB"
        f"{typed} ({result.seconds:.1f}s)"
    )
    counts = ", ".join(f"{n} {p}" for p, n in result.plugins.items()) or "no plugin nodes"
    out.print(f"  plugins: {counts}; {result.ptx_kernels} kernel variants as PTX for {', '.join(result.targets)}")
    for name, p in result.parity.items():
        decisions = p["routing_decisions"]
        routing = f"routing: {p['routing']}" if decisions is None else f"routing decisions {share(decisions)}"
        if p.get("routing_flips"):
            routing += f" ({p['routing_flips']} flips, all within the gates' rounding)"
        out.print(
            f"  {escape(name)} vs PyTorch ({p['backend']}, batch {p['batch']}): max rel err "
            f"{p['max_rel_err']:.2g}, {routing} {mark(p['passed'])}"
        )
    for layer in result.declined:
        out.print(f"[yellow]declined[/yellow] {escape(layer['layer'])}: {escape(layer['reason'])}")
    print_notes(result.notes)
    out.print(f"next, on the target: moe-export build engine {escape(str(result.path))}  (see its README.md)")
