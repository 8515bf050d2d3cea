"""The bundle's README.md: what the target needs, and the exact commands to build and check the engine."""

from __future__ import annotations

from exporter import settings
from exporter.formats.bundle import (
    ENGINE,
    INPUTS_BIN,
    INPUTS_JSON,
    INPUTS_NPZ,
    MANIFEST,
    NETWORK_SCRIPT,
    PLUGINS,
    PORTABLE,
    PTX_DIR,
    REFERENCE_JSON,
    REFERENCE_NPZ,
)
from exporter.settings import Precision


def _shape(name: str, batch: int, image: list) -> str:
    return f"{name}:{'x'.join(str(d) for d in [batch, *image])}"


def render_readme(manifest: dict) -> str:
    """The bundle's README: requirements, and the exact commands to build and check the engine; one
    function per section."""
    typed, routing_rule = _precision_text(manifest)
    sections = (
        _overview(manifest, typed),
        _requirements(),
        _with_moe_export(),
        _with_polygraphy(manifest, routing_rule),
        _with_trtexec(manifest),
        _rtx_gpus(),
    )
    return "\n".join(sections)


def _precision_text(manifest: dict) -> tuple[str, str]:
    """(the overview's precision line, the end of the parity rule's sentence: routing decisions)."""
    model = manifest["model"]
    precision = manifest.get("precision", Precision.FP32)
    if precision == Precision.FP32:
        typed = "Precision: FP32 graphs."
        routing_rule = "and 0 for routing decisions (expert, kept, slot), which must be identical."
    else:
        portable = manifest["graphs"]["portable"]
        typed = (
            f"Precision: **{precision}** graphs: tokens, weights and experts in {precision}, the router and the "
            f"routing math in FP32 ({sum(portable.get('fp32_nodes', {}).values())} float nodes, "
            f"{portable.get('casts', 0)} Casts at the boundaries); input and outputs FP32. TensorRT builds them "
            "strongly typed (no precision flags)."
        )
        routing_rule = (
            "and 0 for routing decisions. In reduced precision a token whose two best gates lie within the "
            "rounding may take the other expert, and Polygraphy reports that routing output as a mismatch: "
            "`moe-export validate .` counts such flips per layer, allows the precision's share and explains each."
        )
    if (model.get("source", {}).get("config") or {}).get("bf16_dispatch") and precision == Precision.FP32:
        routing_rule += (
            " This model rounds its expert inputs and outputs to bfloat16 (bf16 dispatch): an element within "
            "float32 noise of the midpoint between two bfloat16 values can round the other way in TensorRT than "
            "in PyTorch, and a few such elements can move an output past its `--atol` with every routing "
            "decision equal. On CPU, `moe-export validate model.plugins.onnx --inputs inputs.json` exposes the "
            "rounded tensors and accounts for them; an engine exposes none, so its check compares as it stands."
        )
    return typed, routing_rule


def _overview(manifest: dict, typed: str) -> str:
    """The model, its inputs and precision, and the table of the bundle's files."""
    model = manifest["model"]
    (inp,) = manifest["inputs"]
    batch = manifest["sample"]["batch"]
    group = model["batch_multiple"]
    plugins = manifest["plugins"]
    counts = ", ".join(f"{n} {op}" for op, n in plugins["nodes"].items()) or "none"
    targets = ", ".join(plugins["ptx_targets"])
    return f"""# Deploy bundle: {model["name"]}

Made by moe-export {manifest["versions"]["moe-export"]} (manifest.json says when). Family: {model["family"]},
MoE layers: {", ".join(model["moe_layers"]) or "none"}.{
        f" The batch must be a multiple of {group} images (one V-MoE routing group)." if group > 1 else ""
    }
Inputs: {manifest["preprocessing"]}.
{typed}

| file | what |
|---|---|
| `{PORTABLE}` | portable ONNX (opset {manifest["graphs"]["portable"]["opset"]}), standard ops only |
| `{PLUGINS}` | the same with moe:: plugin nodes ({counts}) |
| `plugins/`, `{PTX_DIR}/` | the plugin package and its kernels precompiled to PTX for {targets} |
| `{INPUTS_NPZ}`, `{INPUTS_JSON}`, `{INPUTS_BIN}` | {batch} sample images (.npz, Polygraphy JSON, raw float32) |
| `{REFERENCE_NPZ}`, `{REFERENCE_JSON}` | PyTorch's outputs on them, routing decisions included |
| `{MANIFEST}` | model, file hashes, inputs/outputs, tolerances, versions, CPU parity |
"""


def _requirements() -> str:
    return f"""## Requirements

- **Plugin engine** (`{PLUGINS}`): TensorRT >= 10.9 with its Python package at build time (AOT Quickly
  Deployable Plugins). The built engine embeds the kernels and runs without Python (trtexec, C++, Triton
  Inference Server).
- **Portable engine** (`{PORTABLE}`): any TensorRT >= 10.3, no plugins.
- **Jetson**: JetPack 6.x (Orin, sm_87) ships TensorRT 10.3: the portable graph only. JetPack 7.x (Thor,
  sm_110) ships TensorRT 10.13 to 10.16: the plugin graph (its PTX is in `{PTX_DIR}/` when the bundle was
  made with Triton >= 3.9).
- **NumPy**: TensorRT 10.9 to 11.1 turn each integer plugin attribute into a Python int with `int(array)`,
  which NumPy >= 2.4 refuses, so no plugin node can be created: with those TensorRT versions use
  `pip install "numpy<2.4"`, or TensorRT >= 11.2. `moe-export build engine` checks this before building.
- Build the engine on the device that runs it (same GPU, JetPack and TensorRT).

Check the files first (every file's SHA-256 is in the manifest):

```bash
python3 - <<'EOF'
import hashlib, json
files = json.load(open("{MANIFEST}"))["files"]
bad = [f for f, v in files.items() if hashlib.sha256(open(f, "rb").read()).hexdigest() != v["sha256"]]
print(bad or "all files intact")
EOF
```
"""


def _with_moe_export() -> str:
    return """## With moe-export (on the device)

Every command here runs in this folder (`cd` into it first), whatever it is called:

```bash
moe-export build engine .    # checks every file's hash, registers the plugins, builds model.engine, validates it
moe-export validate .        # TensorRT vs PyTorch: outputs and routing per layer
```
"""


def _with_polygraphy(manifest: dict, routing_rule: str) -> str:
    (inp,) = manifest["inputs"]
    image = inp["shape"][1:]
    batch = manifest["sample"]["batch"]
    atol = " ".join(f"{n}:{v:g}" for n, v in manifest["polygraphy_atol"].items())
    dims = ",".join(str(d) for d in [batch, *image])
    # Polygraphy builds a profile with every dynamic dimension at 1 unless told: the sample batch must fit
    trt_shapes = " ".join(f"--trt-{k}-shapes {inp['name']}:[{dims}]" for k in ("min", "opt", "max"))
    precision = manifest.get("precision", Precision.FP32)
    rtol = settings.TOLERANCES[precision].rtol
    return f"""## With Polygraphy

```bash
# plugin graph: the script registers the plugins before parsing
PYTHONPATH=. MOE_PLUGINS_PTX_DIR={PTX_DIR} polygraphy run {NETWORK_SCRIPT} --trt {trt_shapes} \\
    --load-inputs {INPUTS_JSON} --load-outputs {REFERENCE_JSON} --rtol 0 --atol {atol}
# portable graph
polygraphy run {PORTABLE} --trt --strongly-typed {trt_shapes} \\
    --load-inputs {INPUTS_JSON} --load-outputs {REFERENCE_JSON} --rtol 0 --atol {atol}
```

The `--trt-*-shapes` give the profile the sample batch (without them Polygraphy sets every dynamic
dimension to 1); Polygraphy leaves TF32 off unless `--tf32` is given.

The `--atol` values are the {precision} parity rule (max |TensorRT - PyTorch| <= {rtol:g} x max |PyTorch|
per output), {routing_rule}
"""


def _with_trtexec(manifest: dict) -> str:
    (inp,) = manifest["inputs"]
    image = inp["shape"][1:]
    batch = manifest["sample"]["batch"]
    shapes = " ".join(f"--{k}Shapes={_shape(inp['name'], batch, image)}" for k in ("min", "opt", "max"))
    return f"""## With plain trtexec (portable graph, no plugins)

```bash
trtexec --onnx={PORTABLE} {shapes} --stronglyTyped --noTF32 --saveEngine=model.portable.engine
trtexec --loadEngine=model.portable.engine --shapes={_shape(inp["name"], batch, image)} \\
    --loadInputs={inp["name"]}:{INPUTS_BIN} --exportOutput=outputs.json
```

`--stronglyTyped`: every layer in the type the graph gives it; `--noTF32`: trtexec allows TF32 by
default, which misses the FP32 parity rule. trtexec cannot build
`{PLUGINS}` (its plugins are Python), but it runs the plugin engine that moe-export
or Polygraphy built: `trtexec --loadEngine={ENGINE} --shapes={_shape(inp["name"], batch, image)}`.
"""


def _rtx_gpus() -> str:
    return f"""## RTX GPUs (TensorRT for RTX: GeForce RTX 30/40/50, RTX PRO, laptops)

TensorRT for RTX builds for named compute capabilities on any machine, GPU or not
(`pip install tensorrt-rtx-cu12 cuda-python`): sm_75, sm_80, sm_86 (RTX 30), sm_89 (RTX 40), sm_120
(RTX 50), sm_121. Its parser takes the plugin graph's moe:: nodes as IPluginV3 plugins whose kernels are
compiled for the target and kept in the engine (Triton, or this folder's `{PTX_DIR}/` where it has the
target's), so the engine runs with Python, `tensorrt_rtx` and cuda-python, and no Triton or torch:

```bash
moe-export build engine . --backend tensorrt-rtx --target sm_89,sm_120   # model.sm_89.engine, model.sm_120.engine
moe-export build engine . --backend tensorrt-rtx --target sm_89 --portable  # from {PORTABLE}
```

Each engine is listed in `{MANIFEST}` (`rtx_engines`, with its hash). Built where no GPU of its target
is, it is not run ("not run" in the manifest and the command's last line); on an RTX GPU of a target,
`build engine` runs that target's engine on the sample images against PyTorch's stored outputs.
"""
