"""The deploy bundle's layout: its file names, its manifest, and reading back what it stores (the
engine and the graph it came from, the sample inputs and PyTorch's outputs on them). numpy and onnx
only: ``validate BUNDLE`` on the target needs neither torch nor the model's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

from exporter import settings
from exporter.errors import UserError
from exporter.fileio import publish_dir, sha256, temp_dir
from exporter.formats.arrays import load_npz
from exporter.formats.graph import ROUTING_PREFIX, read_header, routing_layers, routing_output_names

FORMAT = "moe-export-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE, SIGNATURE_ALGORITHM = "manifest.sig", "Ed25519"  # build bundle --sign-key; see signed_payload
TARGET_KEYS = ("engine",)  # manifest keys build engine writes on the target: not covered by the signature
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
    """The manifest of a bundle folder, each key a reader relies on checked (a missing or ill-typed
    one is a damaged bundle); one clear error when it is not one (or another format)."""
    path = Path(path)
    file = path / MANIFEST
    try:
        st = file.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise UserError(f"{file} is not a regular file (a link or a special file); refusing the bundle")
        if st.st_size > settings.MAX_MANIFEST_BYTES:
            raise UserError(f"{file} holds {st.st_size:,} bytes, more than a manifest can; refusing the bundle")
        manifest = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} is not a moe-export bundle (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path} is a bundle of format {found!r}; this moe-export reads {FORMAT}")
    if problem := _manifest_problem(manifest):
        raise UserError(f"{file} is damaged: {problem}; refusing the bundle (rebuild it)")
    return manifest


def _manifest_problem(m: dict) -> str | None:
    """What is missing or ill-typed among the keys moe-export reads from a manifest (None if nothing)."""

    def count(v, low=1):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v < 2**31

    def entry(e):
        return (
            isinstance(e, dict)
            and isinstance(e.get("sha256"), str)
            and re.fullmatch("[0-9a-f]{64}", e["sha256"]) is not None
            and count(e.get("bytes"), 0)
        )

    def io(v):
        return isinstance(v, list) and all(
            isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("shape"), list) for x in v
        )

    model, sample, engine, files = m.get("model"), m.get("sample"), m.get("engine", False), m.get("files")
    checks = {
        "'files' (a map of file names to their sha256 and bytes)": isinstance(files, dict)
        and all(entry(e) for e in files.values()),
        "'model' (its name, family and batch_multiple)": isinstance(model, dict)
        and isinstance(model.get("name"), str)
        and isinstance(model.get("family"), str)
        and count(model.get("batch_multiple")),
        "'sample' (its batch and seed)": isinstance(sample, dict)
        and count(sample.get("batch"))
        and (sample.get("seed") is None or count(sample["seed"], 0)),
        "'created' (a time)": isinstance(m.get("created"), str),
        "'inputs' and 'outputs' (names and shapes)": io(m.get("inputs")) and io(m.get("outputs")),
        "'engine' (none, or the engine's file, graph and precision)": engine is None
        or (
            isinstance(engine, dict)
            and engine.get("file") in (files or {})
            and engine.get("graph") in (PORTABLE, PLUGINS)
            and engine.get("precision") in settings.PRECISIONS
        ),
        "'signature' (none, or its file, algorithm and key)": m.get("signature") is None
        or (
            isinstance(m["signature"], dict)
            and m["signature"].get("file") == SIGNATURE
            and m["signature"].get("algorithm") == SIGNATURE_ALGORITHM
            and isinstance(m["signature"].get("public_key_sha256"), str)
        ),
    }
    if missing := next((what for what, ok in checks.items() if not ok), None):
        return f"{missing} is missing or ill-typed"
    if bad := next((n for n in files if not inside_name(n)), None):
        return f"it lists {bad!r}, which is not a relative path inside the bundle"
    return None


def inside_name(name: str) -> bool:
    """Whether a manifest's file name is a relative POSIX path that stays inside the bundle (no
    ``..``, no absolute path, no empty or ``.`` part, no backslash) and is not the manifest or its
    signature."""
    if not isinstance(name, str) or not name or len(name) > settings.MAX_NAME_CHARS or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    return name not in (MANIFEST, SIGNATURE) and all(p not in ("", ".", "..") for p in parts)


def check_files(bundle: str | Path, names=None, manifest: dict | None = None) -> None:
    """Each named file (default: every file the manifest lists) exists as a regular file inside the
    bundle (no link on its way: a link is refused, never followed) and has the size and SHA-256 the
    manifest records; a user error naming the first that does not. Every command that reads a bundle
    calls this before it uses the files, so a tampered or damaged bundle is refused, never trusted."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    files = manifest["files"]
    for name in files if names is None else names:
        path = bundle / name
        want = files.get(name)
        if want is None:
            raise UserError(f"{path} is not in the bundle's manifest; rebuild the bundle")
        kind = _kind(bundle, name)
        if kind is None:
            raise UserError(f"{path} is missing from the bundle (the manifest lists it); rebuild the bundle")
        if kind != "file":
            raise UserError(f"{path} is {kind} in the bundle, not a file; refusing the bundle (links are not followed)")
        if path.stat().st_size != want["bytes"] or sha256(path) != want["sha256"]:
            raise UserError(
                f"{path} has changed since the bundle was built (its SHA-256 differs from the manifest's); "
                "refusing a tampered or damaged bundle"
            )


def _kind(bundle: Path, name: str) -> str | None:
    """``"file"``, None when missing, else what stands in the way: ``"a link"`` (at the file or at a
    folder on its way), ``"a folder"``, ``"a special file"``."""
    path = bundle
    parts = name.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            return "a link"
        last = i == len(parts) - 1
        if last and stat.S_ISREG(mode):
            return "file"
        if not stat.S_ISDIR(mode):
            return "a special file"
        if last:
            return "a folder"
    return None


def unlisted(bundle: str | Path, manifest: dict) -> list[str]:
    """Entries of a bundle folder its manifest does not list (links included, never followed):
    moe-export neither uses nor copies them. Python's ``__pycache__`` folders are not counted."""
    bundle = Path(bundle)
    listed = set(manifest["files"]) | {MANIFEST, SIGNATURE}
    found = []
    for root, dirs, names in os.walk(bundle):
        dirs[:] = [d for d in dirs if d != "__pycache__" or os.path.islink(os.path.join(root, d))]
        rel = Path(root).relative_to(bundle)
        for name in sorted(names) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            entry = (rel / name).as_posix()
            if entry not in listed:
                found.append(entry + (" (a link)" if os.path.islink(os.path.join(root, name)) else ""))
    return sorted(found)


def local_files(manifest: dict) -> set[str]:
    """Files the target added to the bundle (``build engine``'s engine): not part of what was signed."""
    engine = manifest.get("engine")
    return {engine["file"]} if engine else set()


def signed_payload(manifest: dict) -> bytes:
    """The bytes a bundle's signature covers: its manifest as ``build bundle`` wrote it (canonical
    JSON: sorted keys, no spaces), less what the target adds later (``engine`` and its file)."""
    content = {k: v for k, v in manifest.items() if k not in TARGET_KEYS}
    content["files"] = {n: e for n, e in manifest["files"].items() if n not in local_files(manifest)}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def verify_bundle(bundle: str | Path, key: str | Path, manifest: dict | None = None) -> dict:
    """Checks a bundle's Ed25519 signature with the public key file ``key``, then every file it lists:
    a user error for an unsigned bundle, one signed by another key, a manifest changed after signing
    (naming it) or a changed file (naming it). Returns the manifest."""
    from exporter.formats.signing import verify

    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    signature = manifest.get("signature")
    if signature is None:
        raise UserError(f"{bundle} is not signed: `verify_key` takes only a bundle built with `sign_key`")
    if _kind(bundle, SIGNATURE) != "file":
        raise UserError(f"{bundle / SIGNATURE} is missing or not a file: the bundle's signature was removed")
    verify(signed_payload(manifest), (bundle / SIGNATURE).read_bytes(), key, signature["public_key_sha256"],
           what=f"{bundle / MANIFEST}")  # fmt: skip
    check_files(bundle, None, manifest)
    return manifest


def open_bundle(bundle: str | Path, verify_key: str | Path | None = None) -> tuple[dict, list[str]]:
    """A bundle's manifest, with ``verify_key`` its signature and files checked (``verify_bundle``;
    without, the caller checks the files it uses, ``check_files``); and notes for the report: what the
    signature covers, and the entries the manifest does not list (never used or copied)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    notes = []
    signature = manifest.get("signature")
    if verify_key is not None:
        verify_bundle(bundle, verify_key, manifest)
        notes.append(f"signature verified: {SIGNATURE_ALGORITHM}, key {signature['public_key_sha256'][:16]}...")
        notes += [f"{n} was added on this target, not signed" for n in sorted(local_files(manifest))]
    elif signature is not None:
        notes.append("the bundle is signed: pass `verify_key=PUBLIC_KEY` to check its signature")
    if extra := unlisted(bundle, manifest):
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        notes.append(f"not in the manifest, so neither used nor copied: {', '.join(extra[:5])}{more}")
    return manifest, notes


def copy_bundle(src: str | Path, dest: str | Path) -> Path:
    """Copies an intact bundle to a new folder ``dest``: only the files its manifest lists (plus the
    manifest and its signature), each read without following links and checked against its hash as
    it is copied; nothing unlisted is copied. Assembled beside ``dest`` and moved into place."""
    src, dest = Path(src), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise UserError(f"{dest} exists; -o must be a new folder for a copy of {src}")
    manifest = read_manifest(src)
    check_files(src, None, manifest)
    extra = [SIGNATURE] if manifest.get("signature") and _kind(src, SIGNATURE) == "file" else []
    with temp_dir(dest) as tmp:
        for name in [*manifest["files"], MANIFEST, *extra]:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            fd = os.open(src / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fin, open(target, "wb") as fout:
                while block := fin.read(1 << 22):
                    digest.update(block)
                    fout.write(block)
            want = manifest["files"].get(name, {}).get("sha256")
            if want is not None and digest.hexdigest() != want:
                raise UserError(f"{src / name} changed while it was copied; refusing a tampered or damaged bundle")
        if (tmp / MANIFEST).read_bytes() != (src / MANIFEST).read_bytes() or read_manifest(tmp) != manifest:
            raise UserError(f"{src / MANIFEST} changed while it was copied; refusing a tampered or damaged bundle")
        publish_dir(tmp, dest)
    return dest


def file_entry(path: Path) -> dict:
    """A manifest's record of one file: its SHA-256 and size."""
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def hashes(folder: str | Path) -> dict[str, dict]:
    """``{relative path: file_entry}`` of every file of a bundle folder but the manifest."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MANIFEST, SIGNATURE):
            files[rel] = file_entry(path)
    return files


def bundle_listing(path: str | Path) -> set[str] | None:
    """Every file a moe-export bundle in ``path`` consists of (its manifest, signature and listed
    files), or None when ``path`` holds no readable moe-export manifest: what ``build bundle`` may
    replace there (``fileio.check_replaceable``)."""
    try:
        manifest = read_manifest(path)
    except UserError:
        return None
    return set(manifest["files"]) | {MANIFEST, SIGNATURE}


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
                f"are; on this machine, check its graphs on CPU against PyTorch on its sample images: "
                f"validate {path / PLUGINS} with `inputs_npz={path / INPUTS_JSON}` (or {PORTABLE})"
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
        raise UserError(f"give `engine_graph=GRAPH`: the ONNX graph {engine.name} was built from")
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
    samples, stored = load_npz(bundle / INPUTS_NPZ), load_npz(bundle / REFERENCE_NPZ)
    if len(samples) != 1:
        raise UserError(f"{bundle / INPUTS_NPZ} holds {len(samples)} arrays, not the one sample input")
    ((input_name, images),) = samples.items()
    plain = [o.name for o in header.graph.output if not o.name.startswith(ROUTING_PREFIX)]
    wanted = plain + [n for layer in routing_layers(header) for n in routing_output_names(layer)]
    if missing := [n for n in wanted if n not in stored]:
        raise UserError(f"{bundle / REFERENCE_NPZ} lacks the graph's output {missing[0]}; refusing the bundle")
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
