"""The main job on built-in defaults (``moe-export demo``): export and validate a small V-MoE that
drops tokens and a small Soft-MoE, rewrite both into plugin graphs and validate those too, then make
each one's deploy bundle from those graphs (the kernels precompiled to PTX: needs Triton) and draw
its routing, all on CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from exporter import settings
from exporter.deploy import ptx
from exporter.deploy.bundle import BundleResult, build_bundle
from exporter.errors import UserError
from exporter.export.export import ExportResult, export_model
from exporter.fileio import check_output, write_json
from exporter.parity.parity import ParityReport
from exporter.parity.validate import validate_onnx
from exporter.progress import phase
from exporter.rewrite.plan import RewriteResult
from exporter.rewrite.rewrite import rewrite_onnx
from exporter.sources.loading import ModelSource, from_zoo

log = logging.getLogger(__name__)


@dataclass
class DemoRun:
    """One model of the demo: its export, its parity, its rewrite and the plugin graph's parity."""

    model: str
    overrides: dict
    export: ExportResult
    parity: ParityReport
    rewrite: RewriteResult
    plugin_parity: ParityReport
    bundle: BundleResult | None = None  # None when Triton is missing (``bundle_note`` says so)
    bundle_note: str = ""
    picture: object | None = None  # what ``demo(picture=...)`` drew: exporter.tools.inspect_routing.RoutingPicture

    @property
    def passed(self) -> bool:
        bundle_ok = self.bundle is None or self.bundle.passed
        return self.parity.passed and self.plugin_parity.passed and not self.rewrite.declined and bundle_ok


def demo(
    output_dir: str | Path = settings.DEMO_OUTPUT_DIR,
    *,
    runs=settings.DEMO_RUNS,
    picture: Callable[[ModelSource, Path, Path], object] | None = None,
) -> Iterator[DemoRun]:
    """Runs each (zoo model, routing overrides) of ``runs``, yielding each model's ``DemoRun`` as it
    finishes (each model is a logged phase); graphs, JSON parity reports and the deploy bundle
    ``<model>.bundle/`` go to ``output_dir``. Without Triton the bundles are skipped, with a note.
    ``picture(source, graph, dest)`` draws each model's routing to ``<model>.routing.png`` (the CLI passes
    ``exporter.tools.inspect_routing``'s: tools do not import each other)."""
    out = check_output(output_dir, folder=True)
    try:
        ptx.check_triton()
        no_triton = ""
    except UserError as e:
        no_triton = f"no deploy bundle: {e}"
    for name, overrides in runs:
        with phase(log, " ".join([name, *(f"{k}={v}" for k, v in overrides.items())])):
            run = _run(out, name, overrides, no_triton, picture)
        yield run


def _run(out: Path, name: str, overrides: dict, no_triton: str, picture) -> DemoRun:
    source = from_zoo(name, **overrides)
    path, plugin_path = out / f"{name}.onnx", out / f"{name}.plugins.onnx"
    exported = export_model(source, path, routing_outputs=True)
    report = validate_onnx(path, source)
    write_json(out / f"{name}.parity.json", report.to_dict())
    rewritten = rewrite_onnx(path, plugin_path)
    plugin_report = validate_onnx(plugin_path, source)
    write_json(out / f"{name}.plugins.parity.json", plugin_report.to_dict())
    bundle = None
    if not no_triton:  # the graphs above go into the bundle as they are: no second trace and rewrite
        bundle = build_bundle(source, out / f"{name}.bundle", graphs=(exported, rewritten))
    drawn = None if picture is None else picture(source, path, out / f"{name}.routing.png")
    return DemoRun(name, dict(overrides), exported, report, rewritten, plugin_report, bundle, no_triton, drawn)
