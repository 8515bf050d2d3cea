"""A Triton Inference Server model-repository entry for a TensorRT engine.

Layout, under ``repo_dir``::

    <model_name>/config.pbtxt     the model configuration (protobuf text format)
    <model_name>/1/model.plan     the engine, copied atomically (absent when no engine is given yet)
    <model_name>/README.txt       the tritonserver and perf_analyzer commands for this entry

Batching follows the routing. A V-MoE routes tokens in groups of ``batch_multiple`` images with a
fixed expert capacity per group, so an image's routing depends on the other images of its group.
With ``batch_multiple == 1`` (Soft-MoE, or a V-MoE routing each image alone) every image is routed on
its own and Triton's dynamic batcher may merge requests freely: the config gets ``dynamic_batching``.
With ``batch_multiple > 1`` merging requests would change their results, so there is no
``dynamic_batching``: each request runs as sent, and clients send whole groups (a batch that is a
multiple of the group). An engine whose batch axis is static is written with ``max_batch_size: 0``
and full shapes.

Files are written plan first and config last, each by an atomic rename, so a server polling the
repository never sees a config whose plan is half copied.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exporter import settings
from exporter.errors import UserError
from exporter.fileio import atomic_path

PLATFORM = "tensorrt_plan"
VERSION = "1"
CONFIG_FILE = "config.pbtxt"
PLAN_FILE = "model.plan"
README_FILE = "README.txt"
PLUGIN_MODES = ("aot", "none", "jit")

#: numpy-style dtype name -> Triton ``DataType``.
DATA_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

_PLUGIN_COMMENTS = {
    "aot": [
        "Plugins: the engine embeds the moe:: plugin kernels (AOT Quickly Deployable Plugins, TensorRT >= 10.9).",
        "The TensorRT backend loads model.plan as is: no plugin library, no Python registration.",
    ],
    "none": ["Plugins: none. A portable engine of standard TensorRT layers."],
}
_PLAN_PORTABILITY_LINES = [
    "model.plan runs only under the TensorRT version that built it, on the same GPU architecture:",
    "serve it with a Triton release that ships that TensorRT.",
]
_PLAN_PORTABILITY = " ".join(_PLAN_PORTABILITY_LINES)


@dataclass
class IOSpec:
    """One engine input or output.

    Attributes:
        name: The engine's tensor name (Triton matches config names to the engine's).
        dtype: numpy-style: ``"float32"``, ``"float16"``, ``"int32"``, ``"int64"``, ``"bool"``, ...
        dims: The full shape, batch first; ``-1`` or None for a dynamic axis.
    """

    name: str
    dtype: str
    dims: list[int | None]

    @property
    def data_type(self) -> str:
        dtype = _DTYPE_ALIASES.get(str(self.dtype).lower(), str(self.dtype).lower())
        if dtype not in DATA_TYPES:
            raise UserError(
                f"tensor {self.name!r}: dtype {self.dtype!r} has no Triton type (known: {', '.join(DATA_TYPES)})"
            )
        return DATA_TYPES[dtype]

    def shape(self) -> list[int]:
        """The dims with every dynamic axis as -1."""
        out = []
        for d in self.dims:
            if d is None or d == -1:
                out.append(-1)
            elif isinstance(d, int) and not isinstance(d, bool) and d >= 1:
                out.append(int(d))
            else:
                raise UserError(f"tensor {self.name!r}: dim {d!r} is neither a size >= 1 nor -1/None (dynamic)")
        if not out:
            raise UserError(f"tensor {self.name!r} has no dims; the first dim must be the batch")
        return out


@dataclass
class TritonRepoEntry:
    """What ``write_triton_repo`` wrote.

    Attributes:
        path: ``repo_dir/<model_name>``.
        model_name: The Triton model name.
        files: The files written by this call, relative to ``path``.
        notes: What a user must know (batching rule, plugins, a missing plan, an adjusted batch).
        complete: True when ``1/model.plan`` was written: the entry is servable as is.
        max_batch_size: As written in the config (0: the engine's batch axis is static).
        dynamic_batching: Whether the config lets Triton merge requests.
    """

    path: Path
    model_name: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    complete: bool = False
    max_batch_size: int = 0
    dynamic_batching: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def default_preferred_batches(max_batch: int) -> list[int]:
    """``max_batch`` and its halvings, ``settings.TRITON_PREFERRED_BATCHES`` of them, ascending (32 -> [16, 32])."""
    sizes = {max_batch >> i for i in range(settings.TRITON_PREFERRED_BATCHES)} - {0}
    return sorted(sizes)


def write_triton_repo(
    repo_dir: str | Path,
    model_name: str,
    *,
    engine_path: str | Path | None,
    inputs: list[IOSpec],
    outputs: list[IOSpec],
    max_batch: int,
    batch_multiple: int,
    plugins: str,
    preferred_batches: list[int] | None = None,
    queue_delay_us: int = settings.TRITON_MAX_QUEUE_DELAY_US,
) -> TritonRepoEntry:
    """Writes ``repo_dir/<model_name>/`` (config, plan, README) for Triton's TensorRT backend.

    Args:
        repo_dir: The model repository (created if missing); other models in it are left alone.
        model_name: The Triton model name and folder name.
        engine_path: The serialized engine to copy to ``1/model.plan``; None writes the config and
            README only, and the entry is marked incomplete.
        inputs, outputs: The engine's I/O tensors, image (batch) axis first. Triton splits every
            output along that axis, so outputs indexed otherwise (a V-MoE's per-group routing
            outputs) cannot be served: export without routing outputs.
        max_batch: The largest batch the engine's optimization profile accepts.
        batch_multiple: Images per routing group (1 for Soft-MoE); the engine takes batches that are
            multiples of it.
        plugins: How the engine holds the moe:: plugins: ``"aot"`` (embedded kernels), ``"none"``
            (portable engine) or ``"jit"`` (Python plugins: refused, the backend cannot load them).
        preferred_batches: Preferred batch sizes of the dynamic batcher (``batch_multiple == 1``
            only); default: ``default_preferred_batches(max_batch)``.
        queue_delay_us: The dynamic batcher's longest wait for more requests, in microseconds.

    Raises:
        UserError: a JIT-plugin engine, a missing engine file, an unknown dtype, a batch that cannot
            hold one routing group, and other impossible settings. Nothing is written then.
    """
    plan = _check_inputs(model_name, engine_path, inputs, outputs, plugins, batch_multiple, max_batch, queue_delay_us)
    plugins = plugins.strip().lower()
    max_batch_size, notes, dynamic = _batch_axis(inputs, outputs, max_batch, batch_multiple, preferred_batches)
    notes.append(" ".join(_PLUGIN_COMMENTS[plugins]) + " " + _PLAN_PORTABILITY)

    entry_dir = Path(repo_dir) / model_name
    entry = TritonRepoEntry(path=entry_dir, model_name=model_name, max_batch_size=max_batch_size)
    entry.dynamic_batching = dynamic is not None
    _write_plan(entry, plan, notes)
    entry.notes = notes

    readme = _readme(Path(repo_dir), model_name, inputs, max_batch_size, batch_multiple, notes)
    _write_text(entry, README_FILE, readme)
    config = _config(model_name, inputs, outputs, max_batch_size, batch_multiple, plugins, dynamic, queue_delay_us)
    _write_text(entry, CONFIG_FILE, config)
    return entry


def _batch_axis(
    inputs: list[IOSpec],
    outputs: list[IOSpec],
    max_batch: int,
    batch_multiple: int,
    preferred_batches: list[int] | None,
) -> tuple[int, list[str], list[int] | None]:
    """(max_batch_size, notes, preferred batch sizes or None for no dynamic batching) of the engine's
    batch axis: dynamic in every tensor (``_batched``), or the same static size in every tensor."""
    notes: list[str] = []
    first_dims = [spec.shape()[0] for spec in inputs + outputs]
    if all(d == -1 for d in first_dims):
        max_batch_size, batching_notes, dynamic = _batched(max_batch, batch_multiple, preferred_batches)
        notes += batching_notes
    elif all(d != -1 for d in first_dims) and len(set(first_dims)) == 1:
        if preferred_batches is not None:
            raise UserError("preferred batch sizes need a dynamic batch axis; this engine's batch is static")
        fixed = first_dims[0]
        if fixed % batch_multiple:
            raise UserError(f"the static batch {fixed} is not a multiple of the routing group {batch_multiple}")
        max_batch_size, dynamic = 0, None
        notes.append(
            f"the engine's batch axis is static ({fixed} images): max_batch_size 0, dims are full shapes, and "
            f"every request must hold exactly {fixed} images"
        )
    else:
        raise UserError(
            f"the first dims {first_dims} of the inputs and outputs must all be the batch axis: "
            "all dynamic (-1/None), or all the same static size"
        )
    return max_batch_size, notes, dynamic


def _write_plan(entry: TritonRepoEntry, plan: Path | None, notes: list[str]) -> None:
    """Copies the engine to ``1/model.plan`` (the entry is then complete); without one, a note says
    the entry is not servable (and whether a plan of an earlier write is there)."""
    plan_dest = entry.path / VERSION / PLAN_FILE
    if plan is not None:
        with atomic_path(plan_dest) as tmp:
            shutil.copyfile(plan, tmp)
        entry.files.append(f"{VERSION}/{PLAN_FILE}")
        entry.complete = True
    else:
        missing = f"no engine given: {VERSION}/{PLAN_FILE} was not written; the entry is not servable until it is"
        if plan_dest.exists():
            missing += f" (the {VERSION}/{PLAN_FILE} already there is from an earlier write and may not match)"
        notes.append(missing)


def _write_text(entry: TritonRepoEntry, name: str, text: str) -> None:
    with atomic_path(entry.path / name) as tmp:
        tmp.write_text(text)
    entry.files.append(name)


# --- checks ----------------------------------------------------------------------------------------


def _check_inputs(model_name, engine_path, inputs, outputs, plugins, batch_multiple, max_batch, queue_delay_us):
    """Every check that can fail, before anything is written; returns the engine path (or None)."""
    mode = str(plugins).strip().lower()
    if mode == "jit":
        raise UserError(
            "an engine with JIT moe:: plugins needs their Python registration (tensorrt.plugin) in the process "
            "that deserializes it; Triton's TensorRT backend loads model.plan without Python, so it cannot serve "
            "it. Build the engine with AOT plugins (TensorRT >= 10.9) or as a portable engine without plugins"
        )
    if mode not in PLUGIN_MODES:
        raise UserError(f"plugins {plugins!r} is not one of {', '.join(PLUGIN_MODES)}")
    if not _MODEL_NAME.fullmatch(model_name or ""):
        raise UserError(f"model name {model_name!r}: use letters, digits, '_', '.' and '-' (a folder name)")
    if not inputs or not outputs:
        raise UserError("a Triton model needs at least one input and one output")
    names = [spec.name for spec in inputs + outputs]
    for name in names:
        if not name or any(ord(c) < 32 for c in name):
            raise UserError(f"tensor name {name!r} is empty or holds control characters")
    if len(set(names)) != len(names):
        raise UserError(f"tensor names repeat: {names}")
    for spec in inputs + outputs:
        _ = spec.shape(), spec.data_type  # raise on bad dims or dtypes
    if batch_multiple < 1:
        raise UserError(f"batch_multiple must be >= 1, got {batch_multiple}")
    if max_batch < 1:
        raise UserError(f"max_batch must be >= 1, got {max_batch}")
    if queue_delay_us < 0:
        raise UserError(f"queue delay must be >= 0 microseconds, got {queue_delay_us}")
    if engine_path is None:
        return None
    plan = Path(engine_path)
    if not plan.is_file():
        raise UserError(f"engine {plan} does not exist or is not a file")
    return plan


def _batched(max_batch: int, group: int, preferred: list[int] | None) -> tuple[int, list[str], list[int] | None]:
    """(max_batch_size, notes, preferred batch sizes or None for no dynamic batching) of a dynamic batch axis."""
    if group == 1:
        sizes = default_preferred_batches(max_batch) if preferred is None else sorted(set(preferred))
        if not sizes or any(not 1 <= b <= max_batch for b in sizes):
            raise UserError(f"preferred batch sizes {preferred} must lie in 1..{max_batch} (max_batch)")
        note = (
            "dynamic batching is on and exact: every image is routed on its own (Soft-MoE, or V-MoE groups of "
            "one image), so merging requests into one batch changes no result"
        )
        return max_batch, [note], sizes
    if preferred is not None:
        raise UserError(
            f"preferred batch sizes need dynamic batching, which stays off for routing groups of {group} images"
        )
    if max_batch < group:
        raise UserError(f"max_batch {max_batch} cannot hold one routing group of {group} images")
    notes = [
        f"no dynamic batching: the model routes groups of {group} images with a fixed expert capacity per group, "
        "so images of different requests sharing a group would change each other's routing. Each request runs as "
        f"sent: clients must send whole groups, a batch that is a multiple of {group} (at most "
        f"{max_batch - max_batch % group})"
    ]
    if max_batch % group:
        notes.append(
            f"max_batch_size is {max_batch - max_batch % group}, the largest multiple of the routing group "
            f"{group} within max_batch {max_batch}"
        )
    return max_batch - max_batch % group, notes, None


# --- rendering -------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(spec: IOSpec, batched: bool) -> list[int]:
    return spec.shape()[1:] if batched else spec.shape()


def _tensor_block(specs: list[IOSpec], batched: bool) -> list[str]:
    lines = []
    for i, spec in enumerate(specs):
        dims = _dims(spec, batched)
        lines += ["  {", f"    name: {_quote(spec.name)}", f"    data_type: {spec.data_type}"]
        if dims:
            lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
        else:  # one value per image: Triton needs a non-empty dims, the engine has no axis left
            lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        lines.append("  }," if i < len(specs) - 1 else "  }")
    return lines


def _config(name, inputs, outputs, max_batch_size, group, plugins, preferred, queue_delay_us) -> str:
    batched = max_batch_size > 0
    lines = ["# Written by moe-export (exporter/triton_repo.py) for Triton's TensorRT backend."]
    lines += [f"# {line}" for line in _PLUGIN_COMMENTS[plugins]]
    lines += [f"# {line}" for line in _PLAN_PORTABILITY_LINES]
    lines.append("#")
    if not batched:
        lines.append("# The engine's batch axis is static: max_batch_size 0 and full shapes; no request batching.")
    elif preferred is not None:
        lines += [
            "# Every image is routed on its own (Soft-MoE, or V-MoE groups of one image), so the dynamic",
            "# batcher may merge requests freely: the results do not change.",
        ]
    else:
        lines += [
            f"# NO dynamic batching: the model routes groups of {group} images with a fixed expert capacity per",
            "# group, so mixing requests in a group would change their routing. Each request runs as sent.",
            f"# Clients must send whole groups: a batch that is a multiple of {group}, at most {max_batch_size}.",
        ]
    lines += [
        "",
        f"name: {_quote(name)}",
        f"platform: {_quote(PLATFORM)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        *_tensor_block(inputs, batched),
        "]",
        "output [",
        *_tensor_block(outputs, batched),
        "]",
        "instance_group [",
        "  {",
        "    kind: KIND_GPU",
        "    count: 1",
        "  }",
        "]",
    ]
    if preferred is not None:
        lines += [
            "dynamic_batching {",
            f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
            f"  max_queue_delay_microseconds: {queue_delay_us}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _readme(repo_dir: Path, name: str, inputs: list[IOSpec], max_batch_size: int, group: int, notes) -> str:
    batched = max_batch_size > 0
    shapes = " ".join(f"--shape {spec.name}:{','.join(map(str, _dims(spec, batched)))}" for spec in inputs)
    if not batched:
        perf = f"perf_analyzer -m {name} {shapes}"
    elif group == 1:
        perf = f"perf_analyzer -m {name} -b 1 {shapes} --concurrency-range 1:16:4"
    else:
        perf = f"perf_analyzer -m {name} -b {group} {shapes} --concurrency-range 1:4"
    dynamic_dims = any(-1 in _dims(spec, batched) for spec in inputs)
    lines = [
        f"{name}: a Triton Inference Server model (TensorRT plan), written by moe-export.",
        "",
        "Serve it (in a Triton release whose TensorRT is the one that built 1/model.plan):",
        "",
        f"    tritonserver --model-repository={repo_dir.resolve()}",
        "",
        "Load-test it (perf_analyzer, from Triton's client SDK):",
        "",
        f"    {perf}",
        "",
    ]
    if dynamic_dims:
        lines += ["(replace each -1 in --shape with the size to test)", ""]
    lines += ["Notes:", ""] + [textwrap.fill(note, 100, initial_indent="- ", subsequent_indent="  ") for note in notes]
    return "\n".join(lines) + "\n"
