"""PTX precompilation for a bundle: which kernel variants the plugin graph needs, compiled by Triton
for each target (no GPU needed), and the plugin package copied beside them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx

import plugins
from exporter import settings
from exporter.errors import UserError, environment_failure_in
from exporter.formats.bundle import PLUGINS, PTX_DIR
from exporter.rewrite.probe import probe
from plugins import registry
from plugins.aot import node_recipes, target_unsupported


def default_targets() -> list[int]:
    """``settings.DEFAULT_PTX_TARGETS`` less the newer ones this Triton cannot compile."""
    return [a for a in settings.DEFAULT_PTX_TARGETS if a < 100 or target_unsupported(a) is None]


def parse_targets(targets) -> list[int]:
    out = []
    for t in targets:
        text = str(t).lower().removeprefix("sm_").removesuffix("a")
        if not text.isdigit() or not 50 <= int(text) <= 200:
            raise UserError(f"`target={t!r}` is not a CUDA architecture like sm_87 or 90")
        out.append(int(text))
    for arch in out:
        if arch >= 100 and (reason := target_unsupported(arch)):
            raise UserError(f"cannot precompile for sm_{arch}: {reason}")
    return sorted(set(out))


def check_triton() -> None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise UserError("precompiling the plugin kernels needs Triton: pip install 'moe-export[plugins]'")


def plugin_node_shapes(path: Path, seed: int) -> list[tuple[str, dict, list[tuple[int, ...]], str]]:
    """(op, attributes, input shapes, first input's dtype) of every moe:: plugin node, the shapes
    measured in one ONNX Runtime run, the dtype as the graph types it (a strongly typed network runs
    the plugin in exactly that type)."""
    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in proto.graph.node if registry.is_plugin_node(n)]
    names = {t for n in nodes for t in n.input}
    if not nodes:
        return []
    full = onnx.load(str(path)) if not _external(proto) else proto
    values = probe(path, full, names, seed)
    typed = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input]}
    out = []
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        first = node.input[0]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(typed[first]).name if first in typed else values[first].dtype.name
        out.append((node.op_type, attrs, [tuple(values[t].shape) for t in node.input], dtype))
    return out


def _external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


COMPILE = """
import json, pickle, sys
from plugins.aot import compile_all
recipes, out, targets, ptx_version = pickle.load(open(sys.argv[1], "rb"))
compile_all(recipes, out, targets=targets, ptx_version=ptx_version)
"""


def precompile(folder: Path, arches: list[int], ptx_version: int, seed: int) -> int:
    """PTX of every kernel variant the plugin graph's nodes need, per target; returns the variant count.

    Compiled in a child process: Triton cannot compile in a process that runs kernels in its
    interpreter (TRITON_INTERPRET=1, as the tests do), and a child keeps the compiler's memory apart.
    """
    import pickle

    recipes = {}
    for op, attrs, shapes, dtype in plugin_node_shapes(folder / PLUGINS, seed):
        for recipe in node_recipes(op, shapes, attrs, dtypes=[dtype]):
            recipes[recipe.key()] = recipe
    if not recipes:
        return 0
    job = folder / ".recipes.pkl"
    job.write_bytes(pickle.dumps((list(recipes.values()), str(folder / PTX_DIR), arches, ptx_version)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # no line info: it names the source files by their absolute paths (this checkout's, the virtual
    # environment's), which a bundle must not carry, and two checkouts would build different PTX
    env["TRITON_DISABLE_LINE_INFO"] = "1"
    root = str(Path(plugins.__file__).resolve().parents[1])  # the folder holding the plugins package
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", COMPILE, str(job)], capture_output=True, text=True, env=env, timeout=1800
        )
    finally:
        job.unlink(missing_ok=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if environment := environment_failure_in(last):  # the disk, not Triton
            raise UserError(f"writing the PTX kernels to {folder / PTX_DIR} failed: {environment}")
        raise UserError(f"Triton could not compile the plugin kernels to PTX: {last[:300]}")
    return len(recipes)


def copy_plugin_package(dest: Path) -> None:
    """The ``plugins`` package's Python files (specs, references, kernels, TensorRT registrations)."""
    src = Path(plugins.__file__).parent
    for path in sorted(src.rglob("*.py")):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
