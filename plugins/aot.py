"""Ahead-of-time compilation of the plugin kernels to PTX, and precompiled PTX bundles.

``triton.compile`` with an explicit ``GPUTarget`` needs no GPU, so PTX for any architecture can be
produced here and shipped (``compile_all``), then loaded where Triton is missing (a Jetson building
its engine): ``compiled_kernel`` looks in ``$MOE_PLUGINS_PTX_DIR`` first.

Triton >= 3.3 appends two pointer parameters to every kernel (global and profile scratch), after
the parameters TensorRT passes (inputs, scalars, outputs). They are only dereferenced when the
kernel asks for scratch memory; ``compile_ptx`` refuses a kernel that does, and removes the two
unused parameters from the PTX entry, so the kernel takes exactly what TensorRT passes: whether a
TensorRT version pads the launch with null pointers (11.x does; 10.x is not documented) no longer
matters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from plugins.recipe import KernelRecipe

__all__ = [
    "DEFAULT_PTX_VERSION",
    "PER_ARCH",
    "ptx_version_for",
    "target_unsupported",
    "triton_version",
    "PTX_DIR_ENV",
    "CompiledPTX",
    "compile_all",
    "compile_ptx",
    "strip_unused_params",
    "compile_recipe",
    "compiled_kernel",
    "current_arch",
    "load_precompiled",
    "node_recipes",
]

#: PTX ISA 8.5 (CUDA 12.5): loadable by the drivers of JetPack 6 and of current datacenter GPUs.
DEFAULT_PTX_VERSION = 85
#: The lowest PTX ISA that names each newer architecture (CUDA's PTX ISA notes): a lower one makes
#: LLVM abort the whole process ("PTX version 8.5 does not support target 'sm_100a'"), so never ask.
MIN_PTX_VERSION = {100: 86, 101: 86, 120: 87, 103: 88, 121: 88, 110: 90}
#: ``ptx_version=PER_ARCH``: the lowest PTX ISA the target accepts, at least DEFAULT_PTX_VERSION.
PER_ARCH = 0
#: The oldest Triton whose bundled ptxas knows the target (Triton 3.6.0's has no sm_110a; 3.9.0's has).
MIN_TRITON = {110: (3, 9)}


def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, read from its metadata (no import), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor, *_ = version("triton").split(".")
        return int(major), int(minor)
    except (PackageNotFoundError, ValueError):
        return None


def target_unsupported(arch: int) -> str | None:
    """Why this Triton cannot compile for ``sm_<arch>``, or None."""
    need, have = MIN_TRITON.get(arch), triton_version()
    if have is None:
        return "Triton is not installed"
    if need and have < need:
        return f"sm_{arch} needs Triton >= {need[0]}.{need[1]} (installed: {have[0]}.{have[1]})"
    return None


PTX_DIR_ENV = "MOE_PLUGINS_PTX_DIR"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CompiledPTX:
    """What TensorRT's AOT implementation needs: the entry name, the PTX, warps and dynamic shared memory."""

    name: str
    ptx: str
    num_warps: int
    shared: int
    arch: int
    ptx_version: int | None


def ptx_version_for(arch: int, ptx_version: int | None = PER_ARCH) -> int | None:
    """The PTX ISA to compile ``sm_<arch>`` with: ``PER_ARCH`` -> max(8.5, the arch's minimum); an
    explicit version is checked against that minimum (ValueError, not an LLVM abort); None keeps
    Triton's own default."""
    floor = MIN_PTX_VERSION.get(arch, max(MIN_PTX_VERSION.values()) if arch > 90 else DEFAULT_PTX_VERSION)
    if ptx_version == PER_ARCH:
        return max(DEFAULT_PTX_VERSION, floor)
    if ptx_version is not None and ptx_version < floor:
        need, got = f"{floor // 10}.{floor % 10}", f"{ptx_version // 10}.{ptx_version % 10}"
        raise ValueError(f"sm_{arch} needs PTX ISA >= {need}, got {got}")
    return ptx_version


def _jit_function(kernel):
    """The compilable ``JITFunction`` of a kernel, also when it was decorated under ``TRITON_INTERPRET=1``."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def compile_ptx(
    kernel,
    signature: Mapping[str, str],
    constexprs: Mapping[str, object],
    arch: int,
    ptx_version: int | None = PER_ARCH,
    num_warps: int = 4,
    num_stages: int = 2,
) -> CompiledPTX:
    """PTX of a Triton kernel for ``sm_<arch>`` (``sm_90a`` for 90), without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget

    ptx_version = ptx_version_for(arch, ptx_version)
    options: dict = {"num_warps": num_warps, "num_stages": num_stages}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    source = triton.compiler.ASTSource(fn=_jit_function(kernel), signature=dict(signature), constexprs=dict(constexprs))
    if _interpreting():
        # Triton decorated its own library as interpreted functions at import: nothing compiles here.
        raise RuntimeError("cannot compile PTX in a process with TRITON_INTERPRET=1; use a separate process")
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, scratch, 0):
            raise RuntimeError(f"{meta.name} needs {scratch}={getattr(meta, scratch)}; TensorRT passes no scratch")
    params = sum(1 for kind in signature.values() if kind != "constexpr")
    ptx = strip_unused_params(compiled.asm["ptx"], meta.name, params)
    return CompiledPTX(meta.name, ptx, meta.num_warps, meta.shared, arch, ptx_version)


def strip_unused_params(ptx: str, entry: str, keep: int) -> str:
    """The PTX with the entry's parameters after the first ``keep`` removed (Triton's scratch
    pointers). Refuses (ValueError) when the body reads one of them."""
    import re

    head = re.search(rf"\.entry {re.escape(entry)}\(\s*\n(.*?)\n\)", ptx, re.S)
    if head is None:
        raise ValueError(f"no .entry {entry}( ... ) in the PTX")
    params = [line.rstrip(",") for line in head.group(1).splitlines()]
    if len(params) < keep:
        raise ValueError(f"{entry} has {len(params)} parameters, fewer than the {keep} of its signature")
    extra = params[keep:]
    for line in extra:
        name = line.split()[-1]
        if ptx.count(name) != 1:
            raise ValueError(f"{entry} reads its parameter {name}: it cannot be dropped")
    if not extra:
        return ptx
    kept = ",\n".join(params[:keep])
    return ptx[: head.start(1)] + kept + ptx[head.end(1) :]


def kernel_for(recipe: KernelRecipe):
    """The Triton kernel a recipe names (``plugins.<op>.kernels``)."""
    from plugins import registry

    return registry.kernel(recipe.kernel)


def node_recipes(
    op: str, shapes, attrs: Mapping, dtypes: Iterable[str] = ("float32", "float16", "bfloat16")
) -> list[KernelRecipe]:
    """Every kernel variant TensorRT may ask of one plugin node: one per token dtype in ``dtypes`` that
    the spec's first input takes (a strongly typed network asks for the graph's own type only), from
    the node's input shapes and attributes (``plugin_namespace``, ``aot`` and other parser attributes
    are ignored)."""
    from plugins import registry

    spec, kernels = registry.spec(op), registry.module(op, "kernels")
    args = spec.attribute_values(attrs)
    variants = [d for d in spec.inputs[0].dtypes if d in tuple(dtypes)]
    return [kernels.node_recipe(shapes, dtype, **args) for dtype in variants]


def compile_recipe(recipe: KernelRecipe, arch: int, ptx_version: int | None = PER_ARCH) -> CompiledPTX:
    return compile_ptx(
        kernel_for(recipe), recipe.signature, recipe.constexprs, arch, ptx_version, recipe.num_warps, recipe.num_stages
    )


def _file_key(recipe: KernelRecipe, arch: int, ptx_version: int | None) -> str:
    ptx_version = ptx_version_for(arch, ptx_version)
    return f"{recipe.key()}@sm_{arch}/ptx{ptx_version or 'default'}"


def compile_all(
    recipes: Iterable[KernelRecipe],
    out_dir: str | os.PathLike,
    targets: Iterable[int],
    ptx_version: int | None = PER_ARCH,
) -> Path:
    """Writes the PTX of every recipe for every target under ``out_dir`` plus a ``manifest.json``.

    The manifest maps each variant (kernel, pointer types, constexprs, warps, arch, PTX version) to
    its file, entry name, warps and shared memory; returns the manifest's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for recipe in {r.key(): r for r in recipes}.values():
        for arch in targets:
            compiled = compile_recipe(recipe, arch, ptx_version)
            entry = asdict(compiled)
            ptx = entry.pop("ptx")
            key = _file_key(recipe, arch, ptx_version)
            known = manifest.get(key, {}).get("file")  # a variant compiled again overwrites its file
            entry["file"] = known or f"sm_{arch}/{compiled.name}-{len(manifest):04d}.ptx"
            (out / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
            (out / entry["file"]).write_text(ptx)
            manifest[key] = entry
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest_path


def load_precompiled(
    recipe: KernelRecipe, arch: int, ptx_version: int | None, ptx_dir: str | os.PathLike
) -> CompiledPTX | None:
    """The variant ``compile_all`` wrote for this recipe and target, or None."""
    manifest_path = Path(ptx_dir) / MANIFEST
    if not manifest_path.exists():
        return None
    entry = json.loads(manifest_path.read_text()).get(_file_key(recipe, arch, ptx_version))
    if entry is None:
        return None
    ptx = (Path(ptx_dir) / entry.pop("file")).read_text()
    return CompiledPTX(ptx=ptx, **entry)


def current_arch() -> int:
    """Compute capability of the current CUDA device as ``major*10 + minor`` (87 for Orin, 90 for H100/H200)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def compiled_kernel(recipe: KernelRecipe, arch: int | None = None, ptx_version: int | None = PER_ARCH):
    """PTX for a recipe on this GPU: precompiled from ``$MOE_PLUGINS_PTX_DIR`` if there, else compiled now."""
    arch = current_arch() if arch is None else arch
    ptx_dir = os.environ.get(PTX_DIR_ENV)
    if ptx_dir and (found := load_precompiled(recipe, arch, ptx_version, ptx_dir)) is not None:
        return found
    return compile_recipe(recipe, arch, ptx_version)


def launch_params(recipe: KernelRecipe, compiled: CompiledPTX) -> dict:
    """What the AOT implementation hands TensorRT, as plain values (ints or ShapeExprs).

    ``grid`` and ``block`` are (x, y, z); ``scalars`` are the extra kernel arguments in order, which
    TensorRT passes after the tensor inputs and before the tensor outputs.
    """
    return {
        "grid": tuple(recipe.grid),
        "block": (compiled.num_warps * 32, 1, 1),
        "shared": compiled.shared,
        "scalars": recipe.scalar_values,
    }
