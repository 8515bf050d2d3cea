"""The deploy bundle's layout: its file names, its manifest, and reading back what it stores (the
engine and the graph it came from, the sample inputs and PyTorch's outputs on them). numpy and onnx
only: ``validate BUNDLE`` on the target needs neither torch nor the model's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exporter.errors import UserError
from exporter.fileio import sha256
from exporter.formats.graph import ROUTING_PREFIX, read_header, routing_layers, routing_output_names

FORMAT = "moe-export-bundle/1"
MANIFEST = "manifest.json"
PORTABLE, PLUGINS = "model.onnx", "model.plugins.onnx"
ENGINE = "model.engine"
INPUTS_NPZ, INPUTS_JSON, INPUTS_BIN = "inputs.npz", "inputs.json", "images.bin"
REFERENCE_NPZ, REFERENCE_JSON = "reference_outputs.npz", "reference_outputs.json"
NETWORK_SCRIPT = "polygraphy_network.py"
PTX_DIR = "ptx"
README = "README.md"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    """The manifest of a bundle folder; one clear error when it is not one (or another format)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a moe-export bundle (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / MANIFEST} is unreadable: {e}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is a bundle of format {manifest.get('format')!r}; this moe-export reads {FORMAT}")
    return manifest


def check_files(bundle: str | Path, names=None, manifest: dict | None = None) -> None:
    """Each named file (default: every file the manifest lists) exists and has the SHA-256 the manifest
    records; a user error naming the first that does not. Every command that reads a bundle calls this
    before it uses the files, so a tampered or damaged bundle is refused, never trusted."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    files = manifest.get("files") or {}
    for name in files if names is None else names:
        path = bundle / name
        want = files.get(name, {}).get("sha256")
        if want is None:
            raise UserError(f"{path} is not in the bundle's manifest; rebuild the bundle")
        if not path.is_file():
            raise UserError(f"{path} is missing from the bundle (the manifest lists it); rebuild the bundle")
        if sha256(path) != want:
            raise UserError(
                f"{path} has changed since the bundle was built (its SHA-256 differs from the manifest's); "
                "refusing a tampered or damaged bundle"
            )


def file_entry(path: Path) -> dict:
    """A manifest's record of one file: its SHA-256 and size."""
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def hashes(folder: str | Path) -> dict[str, dict]:
    """``{relative path: file_entry}`` of every file of a bundle folder but the manifest."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = file_entry(path)
    return files


def resolve_engine(path: str | Path, graph: str | Path | None = None) -> tuple[Path, Path, Path | None, str | None]:
    """(engine, the ONNX graph it was built from, sample inputs or None, precision or None) for a
    bundle folder or an engine file (its graph from ``graph`` or from a bundle manifest beside it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = read_manifest(folder) if is_bundle(folder) else None
    if manifest is not None:
        check_files(folder, None, manifest)
    if path.is_dir():
        if manifest is None:
            raise UserError(f"{path} is not a moe-export bundle (no {MANIFEST})")
        if not manifest.get("engine") or not (path / ENGINE).is_file():
            raise UserError(
                f"{path} has no engine yet: build it with `moe-export build engine {path}` where TensorRT and a GPU "
                f"are; on this machine, check its graphs on CPU against PyTorch on its sample images with "
                f"`moe-export validate {path / PLUGINS} --inputs {path / INPUTS_JSON}` (or {PORTABLE})"
            )
        engine = path / ENGINE
    elif path.is_file():
        engine = path
    else:
        raise UserError(f"{path} does not exist")
    built = (manifest or {}).get("engine") or {}
    if graph is None and manifest is not None and engine.name == ENGINE:
        graph = folder / built.get("graph", PLUGINS)
    if graph is None:
        raise UserError(f"give --onnx GRAPH: the ONNX graph {engine.name} was built from")
    inputs = folder / INPUTS_NPZ if manifest is not None else None
    return engine, Path(graph), inputs, built.get("precision")


def read_stored_outputs(bundle: str | Path) -> dict:
    """PyTorch's outputs and routing on the sample inputs, as the bundle stores them, after checking
    both files against the manifest's hashes: ``model``, ``input_name``, ``images``, ``outputs``
    (the plain outputs in graph order), ``routing`` (``{layer: (expert, slot)}``), ``seed``, ``created``.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_files(bundle, (INPUTS_NPZ, REFERENCE_NPZ), manifest)
    header = read_header(bundle / PORTABLE)
    with np.load(bundle / INPUTS_NPZ) as data:
        ((input_name, images),) = data.items()
    with np.load(bundle / REFERENCE_NPZ) as data:
        stored = dict(data.items())
    plain = [o.name for o in header.graph.output if not o.name.startswith(ROUTING_PREFIX)]
    routing = {}
    for layer in routing_layers(header):
        expert, _, slot = routing_output_names(layer)
        routing[layer] = (stored[expert], stored[slot])
    return dict(
        model=manifest["model"]["name"],
        input_name=input_name,
        images=images,
        outputs=[stored[n] for n in plain],
        routing=routing,
        seed=manifest["sample"]["seed"],
        created=manifest["created"],
    )
