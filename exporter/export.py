"""PyTorch -> portable ONNX with torch.onnx (dynamo), a dynamic batch, and the routing of every
V-MoE layer optionally exposed as graph outputs."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from exporter import settings
from exporter.errors import UserError
from exporter.fileio import atomic_dir
from exporter.models.capture import capture_routing, layer_names
from exporter.portable import check_portable, op_histogram
from exporter.source import METADATA_KEY, PREPROCESSING_KEY, LoadedModel, check_batch

INPUT_NAME = "images"
ROUTING_PREFIX = "routing."
ROUTING_FIELDS = ("expert_index", "kept", "buffer_slot")
ROUTING_LAYERS_KEY = "moe_export.routing_layers"
VMOE_LAYERS_KEY = "moe_export.vmoe_layers"


def routing_output_names(layer: str) -> list[str]:
    return [f"{ROUTING_PREFIX}{layer}.{f}" for f in ROUTING_FIELDS]


@dataclass
class ExportResult:
    path: Path
    seconds: float
    opset: int
    inputs: dict[str, list]
    outputs: dict[str, list]
    op_counts: dict[str, int]
    routing_layers: list[str]
    findings: list[str] = field(default_factory=list)
    dynamic_batch: bool = True

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def _flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten_outputs(o)]
    raise UserError(f"model output of type {type(out).__name__} is not a tensor, tuple, list or dict of tensors")


def run_with_routing(model: torch.nn.Module, images: torch.Tensor):
    """(flat outputs, {layer name: TopKRouting}) of one no-grad forward pass; a model that fails on
    the input is a user error naming the input shape."""
    with torch.no_grad(), capture_routing() as records:
        try:
            out = _flatten_outputs(model(images))
        except UserError:
            raise
        except Exception as e:
            shape = "x".join(map(str, images.shape))
            raise UserError(f"model does not run on input {shape}: {type(e).__name__}: {e}") from None
    return out, dict(zip(layer_names(model, records), (r for _, r in records)))


@contextlib.contextmanager
def _forward_exposing_routing(model: torch.nn.Module):
    """Temporarily makes ``model.forward`` also return every V-MoE layer's routing.

    Done on the instance rather than with a wrapper module so that parameter names and scope
    metadata in the graph stay those of the user's model.
    """
    original = model.forward

    @functools.wraps(original)  # keeps the signature torch.export matches inputs against
    def forward(*args, **kwargs):
        with capture_routing() as records:
            outs = _flatten_outputs(original(*args, **kwargs))
        for _, r in records:
            outs += [r.expert.to(torch.int32), r.slot >= 0, r.slot.to(torch.int32)]
        return tuple(outs)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._inductor", "onnxscript", "torch.fx")


def quiet_torch(level: int = logging.ERROR):
    """torch.onnx and torch.compile print progress and warnings of their own; the CLI shows its own
    progress. Silences stdout, warnings and those loggers below ``level`` for the block."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(level)
    return stack


def _value_info(values) -> dict[str, list]:
    out = {}
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out[v.name] = [onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims]
    return out


def export_onnx(
    loaded: LoadedModel,
    dest: str | Path,
    *,
    opset: int = settings.DEFAULT_OPSET,
    routing_outputs: bool = False,
    example_batch: int | None = None,
    step: Callable[[str], ContextManager] = lambda _: contextlib.nullcontext(),
) -> ExportResult:
    """Exports a loaded model to ``dest`` atomically and checks the result.

    Args:
        loaded: The model and its source (``exporter.source.load``).
        dest: The .onnx file to write (weights over 2 GB go to ``<dest>.data`` beside it).
        opset: ONNX opset, at least 18.
        routing_outputs: Also output each V-MoE layer's expert index, kept mask and buffer slot.
        example_batch: Images in the tracing example; defaults to two routing groups.
        step: Context-manager factory the CLI uses to show progress of each stage.
    """
    if opset < settings.MIN_OPSET:
        raise UserError(f"opset must be at least {settings.MIN_OPSET}, got {opset}")
    dest = Path(dest)
    model, multiple = loaded.module, loaded.batch_multiple
    batch = example_batch or 2 * multiple
    check_batch(batch, loaded)
    images = torch.randn((batch, *loaded.source.input_shape), generator=torch.Generator().manual_seed(0))

    if loaded.source.kind == "zoo":  # the config fixes the input shape and the outputs
        names, layers = ["logits"], list(loaded.routing_layers)
    else:
        with step("Checking the model runs on the input shape"):
            outputs, routing = run_with_routing(model, images)
        names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
        layers = list(routing)
    if routing_outputs:
        names += [n for layer in layers for n in routing_output_names(layer)]

    start = time.perf_counter()
    with step("Tracing to ONNX (torch.export + torch.onnx)"):
        program, dynamic = _torch_export(model, images, multiple, opset, names, routing_outputs)
    if routing_outputs and dynamic and multiple > 1:
        for value in program.model.graph.outputs:  # name the routing outputs' group axis
            if value.name.startswith(ROUTING_PREFIX) and value.shape is not None:
                value.shape = ir.Shape(["groups", *value.shape[1:]])
    _name_folded_weights(program.model.graph)
    program.model.metadata_props[METADATA_KEY] = loaded.source.to_json()
    program.model.metadata_props[ROUTING_LAYERS_KEY] = json.dumps(layers if routing_outputs else [])
    program.model.metadata_props[VMOE_LAYERS_KEY] = json.dumps(vmoe_layer_settings(model))
    program.model.metadata_props[PREPROCESSING_KEY] = settings.PREPROCESSING
    program.model.producer_name = "moe-export"

    with step(f"Writing and checking {dest.name}"), atomic_dir(dest) as tmp:
        path = tmp / dest.name
        program.save(str(path))
        del program
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise RuntimeError(f"the exported graph fails onnx.checker: {e}") from e
        proto = onnx.load(str(path), load_external_data=False)
    seconds = time.perf_counter() - start
    return ExportResult(
        path=dest,
        seconds=seconds,
        opset=opset,
        inputs=_value_info(proto.graph.input),
        outputs=_value_info(proto.graph.output),
        op_counts=dict(sorted(op_histogram(proto).items())),
        routing_layers=layers if routing_outputs else [],
        findings=check_portable(proto),
        dynamic_batch=dynamic,
    )


def vmoe_layer_settings(model: torch.nn.Module) -> dict[str, dict]:
    """Routing settings of every V-MoE layer, stored in the graph for the plugin rewrite (capacity
    depends on the group size, so the rule is stored rather than one number)."""
    from exporter.models.vmoe import VMoEMlp

    return {
        name: dict(
            num_experts=m.num_experts,
            k=m.k,
            batch_priority=bool(m.batch_priority),
            capacity_factor=m.capacity_factor,
            capacity=m.fixed_capacity,
            ceil_or_round=m.ceil_or_round,
            multiple_of=m.multiple_of,
            group_images=m.group_images,
        )
        for name, m in model.named_modules()
        if isinstance(m, VMoEMlp)
    }


def trace_structure(config, *, opset: int = settings.DEFAULT_OPSET, routing_outputs: bool = False) -> onnx.ModelProto:
    """The graph a zoo config exports to, without its weights: uninitialised parameter memory that is
    never touched, so every zoo model's op set can be checked in seconds (0.5 GB for a 3.7B model)."""
    import tempfile

    from exporter.source import LoadedModel, ModelSource, describe
    from exporter.zoo import build_model

    module = build_model(config, device="meta").to_empty(device="cpu").eval()
    source = ModelSource("zoo", config.name, config.input_shape, config)
    loaded = LoadedModel(module, source, *describe(module))
    images = torch.zeros((2 * loaded.batch_multiple, *config.input_shape))
    names = ["logits"]
    if routing_outputs:
        names += [n for layer in loaded.routing_layers for n in routing_output_names(layer)]
    program, _ = _torch_export(module, images, loaded.batch_multiple, opset, names, routing_outputs)
    with tempfile.TemporaryDirectory() as tmp:
        program.save(f"{tmp}/graph.onnx", include_initializers=False)
        return onnx.load(f"{tmp}/graph.onnx")


def _torch_export(model, images, multiple, opset, names, routing_outputs):
    dim = torch.export.Dim("groups", min=1) * multiple if multiple > 1 else torch.export.Dim("batch", min=1)
    ctx = _forward_exposing_routing(model) if routing_outputs else contextlib.nullcontext()
    kwargs = dict(dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=names, verbose=False)
    with ctx, quiet_torch():
        try:
            return torch.onnx.export(model, (images,), dynamic_shapes=({0: dim},), **kwargs), True
        except Exception as dynamic_error:
            if "Constraints violated" not in str(dynamic_error) and "specializ" not in str(dynamic_error):
                raise UserError(f"export failed: {_first_line(dynamic_error)}") from None
        try:  # the model fixes its batch size: export that size, and say so
            return torch.onnx.export(model, (images,), **kwargs), False
        except Exception as e:
            raise UserError(f"export failed: {_first_line(e)}") from None


def _name_folded_weights(graph) -> None:
    """Gives the transposed weights torch.onnx folds for ``nn.Linear`` (named ``val_<n>``) the name
    of their parameter, ``<module>.weight.T``, so initializers stay readable and findable."""
    for name, value in list(graph.initializers.items()):
        uses = list(value.uses())
        if not name.startswith("val_") or len(uses) != 1 or uses[0][0].op_type not in ("MatMul", "Gemm"):
            continue
        scopes = uses[0][0].metadata_props.get("namespace", "").split("/")
        if len(scopes) < 2 or not scopes[-2].endswith(": torch.nn.modules.linear.Linear"):
            continue
        new = scopes[-2].split(":")[0].strip() + ".weight.T"
        if new not in graph.initializers:
            graph.initializers.pop(name)
            value.name = new
            graph.register_initializer(value)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
