"""PyTorch -> portable ONNX with torch.onnx (dynamo), a dynamic batch, and the routing of every
V-MoE layer optionally exposed as graph outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from exporter import settings
from exporter.backends.tensorrt_rtx import parse_structure, rtx_available
from exporter.errors import DEBUG_ENV, CheckFailed, UserError
from exporter.export.portable import check_portable
from exporter.export.precision import PrecisionResult, check_precision, reduce_precision
from exporter.fileio import atomic_dir, check_output, check_space
from exporter.formats.graph import (
    BATCH_KEY,
    INPUT_NAME,
    PRECISION_KEY,
    PREPROCESSING_KEY,
    ROUTING_LAYERS_KEY,
    SCOPE_KEY,
    SOURCE_KEY,
    TUTEL_LAYERS_KEY,
    VMOE_LAYERS_KEY,
    image_input,
    input_dims,
    op_histogram,
    routing_output_names,
)
from exporter.models.capture import capture_routing, flatten_outputs, run_with_routing
from exporter.models.vmoe import vmoe_layers
from exporter.progress import phase
from exporter.settings import Precision, RoutingPrecision
from exporter.sources.loading import LoadedModel, ModelSource, check_batch, load
from exporter.versions import package_version

log = logging.getLogger(__name__)


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
    precision: Precision = Precision.FP32
    routing_precision: RoutingPrecision = RoutingPrecision.FP32
    casts: int = 0  # Cast nodes the reduced-precision pass inserted
    fp32_nodes: dict[str, int] = field(default_factory=dict)  # float nodes kept in FP32, by reason
    overflows: list[str] = field(default_factory=list)  # weights/constants whose finite values became infinite
    size_bytes: int = 0  # the graph and its weights on disk
    # substitutions, a fixed batch and why, replaced draws, options that did not apply: each said once
    notes: list[str] = field(default_factory=list)
    checked: dict[int, float] = field(default_factory=dict)  # batch -> max rel err of the graph against PyTorch
    quantization: dict | None = None  # int8/fp8/w8/w4: what was quantized, the calibration (QuantizeResult)
    rtx_parse: dict | None = None  # TensorRT for RTX's parser on the graph, where it is installed (ParseReport)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


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
            outs = flatten_outputs(original(*args, **kwargs))
        for _, r in records:
            outs += [r.expert.to(torch.int32), r.slot >= 0, r.slot.to(torch.int32)]
        return tuple(outs)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def sound_onnx_rewrites():
    """torch.onnx's optimizer without onnxscript's rules that drop the Reshapes around a MatMul that
    broadcasting seems to make redundant: up to onnxscript 0.7 they never compare the contracted
    dimensions (``[1,128,1] x [128,8]`` taken for ``[128,1,1] x [128,1,8]``), and a graph with a fixed
    batch came out invalid (a top-1 Combine's gate-weighted sum). Restored afterwards."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _broadcast_to_matmul
    except ImportError:  # another onnxscript layout: its rules as they are
        yield
        return
    saved = rewriter._DEFAULT_REWRITE_RULES
    unsound = {id(rule) for rule in _broadcast_to_matmul.rules.rules}
    rewriter._DEFAULT_REWRITE_RULES = tuple(rule for rule in saved if id(rule) not in unsound)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


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


@dataclass(frozen=True)
class ExportOptions:
    """The settings of one export, checked once and handed to each phase (as Torch-TensorRT's
    ``CompilationSettings`` are): ``export_onnx``, ``export_model`` and ``build_bundle`` take them as
    keyword arguments and build this."""

    opset: int = settings.DEFAULT_OPSET
    routing_outputs: bool = False
    example_batch: int | None = None
    precision: Precision = settings.DEFAULT_PRECISION
    routing_precision: RoutingPrecision = RoutingPrecision.FP32
    calibration: str | Path | None = None

    def check(self) -> ExportOptions:
        if self.opset < settings.MIN_OPSET:
            raise UserError(f"opset must be at least {settings.MIN_OPSET}, got {self.opset}")
        check_precision(self.precision, self.routing_precision)
        return self


@dataclass
class _Traced:
    """What tracing gave: the ONNX program, the torch.export program (an FP16/BF16 graph is compared by
    its FP32 trace), the output names, the V-MoE layers, the two batches traced and the notes."""

    program: object
    exported: object
    layers: list[str]
    batch: int
    second: int
    notes: list[str]


def export_onnx(loaded: LoadedModel, dest: str | Path, **options) -> ExportResult:
    """Exports a loaded model to ``dest`` atomically and checks the result.

    Args:
        loaded: The model and its source (``exporter.sources.loading.load``).
        dest: The .onnx file to write (weights over 2 GB go to ``<dest>.data`` beside it).
        opset: ONNX opset, at least 18.
        routing_outputs: Also output each V-MoE layer's expert index, kept mask and buffer slot.
        example_batch: Images in the tracing example (the N of an input shape N,C,H,W, recorded in the
            graph for validate); defaults to ``settings.EXPORT_EXAMPLE_GROUPS`` routing groups (one would
            let torch.export fix the batch).
        precision: ``fp32``, or ``fp16``/``bf16``: tokens, weights and experts in that type, the routing
            in FP32 (``exporter.export.precision``); ``int8``/``fp8``/``w8``/``w4``: quantized
            (``exporter.export.quantize``); the input and outputs stay FP32.
        routing_precision: ``fp32`` (pinned), or ``reduced``: the routing in the reduced type too, to
            measure what pinning buys.
        calibration: ``int8``/``fp8``: an .npz of the graph's input or a folder of images to take the
            activations' scales over; seeded random images without it.
    """
    opts = ExportOptions(**options).check()
    dest = check_output(dest)
    calibration = _calibration(loaded, opts.precision, opts.calibration)  # bad input: before tracing
    check_space(dest, graph_bytes(loaded.module), f"the export of {loaded.source.name}")
    start = time.perf_counter()
    traced = _trace(loaded, opts)
    converted, quantized, opset = _convert(traced.program.model, loaded, opts, calibration)
    _record(traced.program.model, loaded, opts, traced, dest)
    proto, dynamic, checked = _write_and_check(traced, loaded, opts, dest)
    seconds = time.perf_counter() - start
    rtx_parse = None
    if rtx_available() is None:  # the real parser's word beside the allow-list's
        with phase(log, "Parsing with TensorRT for RTX"):
            rtx_parse = parse_structure(dest).to_dict()
    ignored = (
        [
            f"`routing_outputs=True` is ignored: {loaded.source.name} has no layer of moe-export's V-MoE class (a "
            "Soft-MoE routes by weights; another author's top-k layer does not name its decisions)"
        ]
        if opts.routing_outputs and not traced.layers
        else []
    )
    return ExportResult(
        path=dest,
        seconds=seconds,
        opset=opset,
        inputs=_value_info(proto.graph.input),
        outputs=_value_info(proto.graph.output),
        op_counts=dict(sorted(op_histogram(proto).items())),
        routing_layers=traced.layers if opts.routing_outputs else [],
        findings=check_portable(proto),
        dynamic_batch=dynamic,
        precision=opts.precision,
        routing_precision=opts.routing_precision,
        casts=converted.casts,
        fp32_nodes=converted.fp32_nodes,
        overflows=converted.overflows,
        size_bytes=sum(f.stat().st_size for f in (dest, dest.with_name(dest.name + ".data")) if f.exists()),
        notes=traced.notes + ignored,
        checked=checked,
        quantization=None if quantized is None else dataclasses.asdict(quantized),
        rtx_parse=rtx_parse,
    )


def _trace(loaded: LoadedModel, opts: ExportOptions) -> _Traced:
    """The example images, the output names, then torch.export and torch.onnx at two batches."""
    model, multiple = loaded.module, loaded.batch_multiple
    batch = opts.example_batch or settings.EXPORT_EXAMPLE_GROUPS * multiple
    check_batch(batch, loaded)
    generator = torch.Generator().manual_seed(settings.EXPORT_EXAMPLE_SEED)
    images = torch.randn((batch, *loaded.source.input_shape), generator=generator)
    if loaded.source.kind == "zoo":  # the config fixes the input shape and the outputs
        names, layers = ["logits"], list(loaded.routing_layers)
    else:
        with phase(log, "Checking the model runs on the input shape"):
            outputs, routing = run_with_routing(model, images)
        names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
        layers = list(routing)
    if opts.routing_outputs:
        names += [n for layer in layers for n in routing_output_names(layer)]
    second = _second_batch(batch, multiple)
    with phase(log, "Tracing to ONNX (torch.export + torch.onnx)"):
        probes = [images, torch.randn((second, *loaded.source.input_shape), generator=generator)]
        exposing = opts.routing_outputs and bool(layers)  # (only moe-export's own layers name their decisions)
        program, exported, notes = _torch_export(
            model, probes, multiple, opts.opset, names, exposing, user_code=loaded.source.kind == "module"
        )
    _name_folded_weights(program.model.graph)
    _strip_build_machine_metadata(program.model)
    return _Traced(program, exported, layers, batch, second, notes)


def _convert(model_ir, loaded: LoadedModel, opts: ExportOptions, calibration: tuple):
    """The precision pass: quantized (int8, fp8, w8, w4) or reduced (fp16, bf16), the routing in FP32;
    ``(PrecisionResult, QuantizeResult or None, the opset now: quantizing may raise it)``. Runs before
    the routing outputs are named: they are integers either way."""
    precision, routing, model = opts.precision, opts.routing_precision, loaded.module
    converted, quantized = PrecisionResult(precision, routing), None
    if precision in settings.QUANTIZED_PRECISIONS + settings.WEIGHT_ONLY_PRECISIONS:
        from exporter.export.quantize import quantize
        from exporter.models.soft_moe import soft_moe_layers

        tutel = tutel_layer_settings(model)  # Swin-MoE: its routers stay FP32 too
        images, note = calibration
        what = "expert weights only" if images is None else f"calibrating on {len(images)} images"
        multiple = loaded.batch_multiple
        with phase(log, f"Quantizing to {precision} ({what})"):
            quantized = quantize(
                model_ir,
                precision,
                moe_layers=[n for n, _ in vmoe_layers(model)] + [n for n, _ in soft_moe_layers(model)] + list(tutel),
                images=images,
                calibration=note,
                batch=max(settings.CALIBRATION_CHUNK_IMAGES // multiple, 1) * multiple,
            )
    elif precision != Precision.FP32:
        with phase(
            log, f"Converting to {precision} (routing in {'FP32' if routing == RoutingPrecision.FP32 else precision})"
        ):
            converted = reduce_precision(
                model_ir, precision, routing=routing, vmoe_layers=[n for n, _ in vmoe_layers(model)]
            )
    return converted, quantized, model_ir.graph.opset_imports[""] if quantized is not None else opts.opset


def _record(model_ir, loaded: LoadedModel, opts: ExportOptions, traced: _Traced, dest: Path) -> None:
    """What the graph records for validate, rewrite and the bundle (``exporter.formats.graph``'s keys)."""
    model, props = loaded.module, model_ir.metadata_props
    props[PRECISION_KEY] = json.dumps({"precision": opts.precision, "routing": opts.routing_precision})
    props[SOURCE_KEY] = loaded.source.relative_to(dest.parent).to_json()
    props[ROUTING_LAYERS_KEY] = json.dumps(traced.layers if opts.routing_outputs else [])
    props[VMOE_LAYERS_KEY] = json.dumps(vmoe_layer_settings(model))
    if tutel := tutel_layer_settings(model):
        props[TUTEL_LAYERS_KEY] = json.dumps(tutel)
    props[PREPROCESSING_KEY] = loaded.source.preprocessing
    if opts.example_batch is not None:  # the user's N: validate runs it too
        props[BATCH_KEY] = str(traced.batch)
    model_ir.producer_name, model_ir.producer_version = "moe-export", package_version("moe-export") or ""


def _write_and_check(traced: _Traced, loaded: LoadedModel, opts: ExportOptions, dest: Path):
    """Writes the graph atomically after onnx.checker and a run against PyTorch at the traced batch and
    (dynamic) a second one: a graph that differs is never written as right. ``(proto, dynamic, checked)``."""
    with phase(log, f"Writing and checking {dest.name}"), atomic_dir(dest) as tmp:
        path = tmp / dest.name
        traced.program.save(str(path))
        traced.program = None
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise RuntimeError(f"the exported graph fails onnx.checker: {e}") from e
        proto = onnx.load(str(path), load_external_data=False)
        dynamic = not isinstance(input_dims(image_input(proto))[0], int)
        batches = [traced.batch, traced.second] if dynamic else [traced.batch]
        if loaded.source.kind == "zoo" and dynamic:
            batches = [traced.second]  # moe-export's own models: the smallest batch, where a fixed size would show
        with phase(log, f"Checking the graph against PyTorch at batch {' and '.join(map(str, batches))}"):
            trace = traced.exported if opts.precision != Precision.FP32 else None
            shape = loaded.source.input_shape
            checked = check_graph(path, loaded.module, shape, batches, traced.batch, trace=trace)
        traced.exported = None
    return proto, dynamic, checked


def _calibration(loaded: LoadedModel, precision: str, calibration) -> tuple:
    """``(images, one line saying what they are)`` an int8/fp8 export calibrates on, ``(None, "")`` for
    other precisions; a user error for calibration given where none is used, or for bad data."""
    from exporter.export.quantize import calibration_images, whole_groups

    if precision not in settings.QUANTIZED_PRECISIONS:
        if calibration is not None:
            why = "quantizes weights only" if precision in settings.WEIGHT_ONLY_PRECISIONS else "has no scales"
            raise UserError(
                f"`calibration` applies to `precision` {' and '.join(settings.QUANTIZED_PRECISIONS)} only "
                f"({precision} {why})"
            )
        return None, ""
    multiple, shape = loaded.batch_multiple, loaded.source.input_shape
    if calibration is None:
        count = settings.CALIBRATION_DEFAULT_GROUPS * multiple if multiple > 1 else settings.CALIBRATION_DEFAULT_IMAGES
        images = np.random.default_rng(settings.DEFAULT_SEED).standard_normal((count, *shape), dtype=np.float32)
        return images, (
            f"no `calibration`: {count} seeded N(0, 1) images, the inputs validate checks with by default, not real "
            "ones (give `calibration=FILE.npz|DIR` for scales that fit real images)"
        )
    images = calibration_images(calibration, INPUT_NAME, shape, normalization=loaded.source.normalization)
    images = whole_groups(images, multiple, str(calibration))
    return images, f"{len(images)} images of {calibration}"


def export_model(
    source: ModelSource,
    dest: str | Path,
    *,
    example_batch: int | None = None,
    opset: int = settings.DEFAULT_OPSET,
    routing_outputs: bool = False,
    precision: Precision = settings.DEFAULT_PRECISION,
    routing_precision: RoutingPrecision = RoutingPrecision.FP32,
    calibration: str | Path | None = None,
) -> ExportResult:
    """Builds a model (a zoo name, a model folder, a user module, a checkpoint: ``exporter.from_zoo``,
    ``from_module``, ...) and exports it: what ``moe-export export`` does. See ``export_onnx`` for the
    arguments."""
    options = ExportOptions(opset, routing_outputs, example_batch, precision, routing_precision, calibration).check()
    check_output(dest)
    with phase(log, f"Building {source.name}"):
        loaded = load(source)
    return export_onnx(loaded, dest, **dataclasses.asdict(options))


def graph_bytes(model: torch.nn.Module) -> int:
    """About the size of the .onnx a model exports to: its weights and buffers, plus 5% and 1 MiB
    for the graph itself."""
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors) * 1.05) + (1 << 20)


def vmoe_layer_settings(model: torch.nn.Module) -> dict[str, dict]:
    """Routing settings of every V-MoE layer, stored in the graph for the plugin rewrite (capacity
    depends on the group size, so the rule is stored rather than one number)."""
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
        for name, m in vmoe_layers(model)
    }


SMALL_CONSTANT = 64  # elements: what trace_structure keeps as initializers (shapes, axes, scalars)


def tutel_layer_settings(model: torch.nn.Module) -> dict[str, dict]:
    """Routing settings of every Swin-MoE (tutel) layer, stored in the graph: the whole batch is one routing
    group, and the capacity rule (not a number: it follows the batch size) is tutel's
    ``align(k * int(capacity_factor * ceil(tokens / num_experts)), alignment)``
    (``exporter.models.tutel_routing``)."""
    from exporter.models.swin_moe import swin_moe_layers

    return {
        name: dict(
            routing="tutel",
            group="batch",
            num_experts=m.num_experts,
            k=m.routing.k,
            capacity_factor=m.routing.capacity_factor,
            batch_priority=bool(m.routing.batch_priority),
            normalize_gate=bool(m.routing.normalize_gate),
            alignment=m.routing.alignment,
        )
        for name, m in swin_moe_layers(model)
    }


def trace_structure(
    config,
    *,
    opset: int = settings.DEFAULT_OPSET,
    routing_outputs: bool = False,
    precision: str = settings.DEFAULT_PRECISION,
) -> onnx.ModelProto:
    """The graph a zoo config exports to, without its weights: uninitialised parameter memory that is
    never touched, so every zoo model's op set can be checked in seconds (0.5 GB for a 3.7B model).

    With a reduced ``precision`` the graph is converted as ``export --precision`` does. Its weights
    become typed graph inputs (constants of up to ``SMALL_CONSTANT`` elements stay), so that
    ``onnx.checker``'s full check types every node and TensorRT's parser takes the graph."""
    import tempfile

    from exporter.sources.loading import describe
    from exporter.sources.zoo import build_model

    module = build_model(config, device="meta").to_empty(device="cpu").eval()
    source = ModelSource("zoo", config.name, config.input_shape, config)
    loaded = LoadedModel(module, source, *describe(module))
    images = torch.zeros((settings.EXPORT_EXAMPLE_GROUPS * loaded.batch_multiple, *config.input_shape))
    names = ["logits"]
    if routing_outputs:
        names += [n for layer in loaded.routing_layers for n in routing_output_names(layer)]
    program, _, _ = _torch_export(module, [images], loaded.batch_multiple, opset, names, routing_outputs, verify=False)
    graph = program.model.graph
    if precision in settings.REDUCED_PRECISIONS:
        reduce_precision(program.model, precision, vmoe_layers=[n for n, _ in vmoe_layers(module)])
    for value in list(graph.initializers.values()):
        if value.const_value is not None and value.const_value.size <= SMALL_CONSTANT:
            continue  # shapes, axes and scalars stay: parsers read them as values
        graph.initializers.pop(value.name)
        value.const_value = None
        graph.inputs.append(value)
    with tempfile.TemporaryDirectory() as tmp:
        program.save(f"{tmp}/graph.onnx")
        return onnx.load(f"{tmp}/graph.onnx")


def _torch_export(model, probes, multiple, opset, names, routing_outputs, user_code: bool = False, verify=True):
    """``(ONNXProgram, ExportedProgram, notes)``: torch.export (``exporter.export.tracing``) and torch.onnx's
    conversion, with a dynamic batch where the model's code allows (``8*groups`` for V-MoE groups, else
    ``batch``).

    ``probes[0]`` is the tracing example; every probe proves the substitutions first, and the second
    checks a trace that may have fixed a size (``verify=False``: a model without weights, traced for
    its structure only). A failure tracing
    a user's module is a user error (one line, torch's output in a log file); tracing a zoo model it
    is our bug, and propagates."""
    from exporter.export.substitutions import substituted
    from exporter.export.tracing import ExportLog, failure_line, settle_random_ops, trace

    images = probes[0]
    dim = torch.export.Dim("groups", min=1) * multiple if multiple > 1 else torch.export.Dim("batch", min=1)
    ctx = _forward_exposing_routing(model) if routing_outputs else contextlib.nullcontext()
    log = ExportLog(keep=os.environ.get(DEBUG_ENV, "") not in ("", "0"))
    with ctx:
        if not user_code:  # moe-export's own models: a failure is our bug, with its traceback
            try:
                other = probes[1] if len(probes) > 1 else None
                traced = trace(model, images, dim, log=log, other=other, verify=verify)
            except UserError as e:
                raise RuntimeError(f"tracing {type(model).__name__} failed: {e}") from e
        else:
            with substituted(model, probes) as substitutions:
                traced = trace(model, images, dim, log=log, other=probes[1] if len(probes) > 1 else None)
            traced.notes[:0] = substitutions
            settle_random_ops(traced, model, images)
        kwargs = dict(dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=names, verbose=False)
        try:
            with log.capture("torch.onnx (ExportedProgram -> ONNX)"), sound_onnx_rewrites():
                program = torch.onnx.export(traced.program, **kwargs)
        except Exception as e:
            if not user_code:
                raise
            raise UserError(f"conversion to ONNX failed: {failure_line(e, log.path)}") from None
        finally:
            log.close()
    _name_batch_axis(program.model, multiple)
    return program, traced.program, traced.notes


def _name_batch_axis(model: ir.Model, multiple: int) -> None:
    """torch.onnx names the batch symbol of an ExportedProgram ``s<n>``; the graph names it ``batch``, or
    ``groups`` for V-MoE routing groups (the image input ``8*groups``, routing outputs ``groups``)."""
    first = model.graph.inputs[0].shape[0] if model.graph.inputs[0].shape is not None else None
    if not isinstance(first, ir.SymbolicDim) or first.value is None:
        return
    symbols = re.findall(r"\b[su]\d+\b", first.value)
    if len(symbols) != 1:
        return
    name = "groups" if multiple > 1 else "batch"
    pattern = re.compile(rf"\b{symbols[0]}\b")
    values = [*model.graph.inputs, *model.graph.outputs]
    values += [v for node in model.graph for v in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(pattern.sub(name, d.value).replace(" ", ""))
            if isinstance(d, ir.SymbolicDim) and d.value
            else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)


def _second_batch(batch: int, multiple: int) -> int:
    """The second batch the graph is checked at: one routing group (or image) when the traced example
    has more, else two (a size that torch.export fixed would show at either)."""
    return multiple if batch != multiple else 2 * multiple


def check_graph(path: Path, model, image_shape, batches: list[int], traced: int, *, trace=None) -> dict[int, float]:
    """Runs the written graph in ONNX Runtime against PyTorch at each batch; the largest error relative
    to the outputs' scale, per batch (``settings.EXPORT_CHECK_RTOL``). A graph that fails to run or does
    not match is a CheckFailed (exit 1), naming the batch: at another batch than the ``traced`` one,
    torch.export fixed a size; at the traced one, the model computes something the graph does not.

    An FP16/BF16 graph differs from the FP32 model by its rounding (and the routing flips that
    causes), so its numbers are compared through ``trace``, the FP32 ExportedProgram it was converted
    from; the graph itself must run at every batch with the model's output shapes."""
    from exporter.backends.onnxruntime import run_onnxruntime
    from exporter.compare import max_rel_err
    from exporter.models.capture import flatten_outputs, run_with_routing

    tolerance = settings.EXPORT_CHECK_RTOL
    errors = {}
    for batch in batches:
        images = torch.randn((batch, *image_shape), generator=torch.Generator().manual_seed(batch))
        expected, _ = run_with_routing(model, images)
        try:
            got = list(run_onnxruntime(path, {INPUT_NAME: images.numpy()}).values())
        except UserError as e:
            raise CheckFailed(f"the exported graph fails in ONNX Runtime at batch {batch}: {e}; not written") from None
        if trace is not None:
            shapes_differ = any(g.shape != tuple(e.shape) for g, e in zip(got, expected))
            with torch.no_grad():
                got = [t.numpy() for t in flatten_outputs(trace.module(check_guards=False)(images))]
        else:
            shapes_differ = False
        shapes_differ = shapes_differ or any(g.shape != tuple(e.shape) for g, e in zip(got, expected))
        errors[batch] = max(
            (max_rel_err(g, e.numpy()) for g, e in zip(got, expected) if g.shape == tuple(e.shape)), default=0.0
        )
        if shapes_differ or not errors[batch] <= tolerance:
            what = "output shapes" if shapes_differ else f"max rel err {errors[batch]:.3g} > {tolerance:g}"
            why = (
                "torch.export fixed a size that depends on the batch"
                if batch != traced
                else "the graph computes something else than the model even at the traced batch (e.g. an order "
                "PyTorch leaves undefined, such as which of equal values torch.topk returns first)"
            )
            raise CheckFailed(
                f"the exported graph does not match the model at batch {batch} ({what}): {why}; not written"
            )
    return errors


def _strip_build_machine_metadata(model: ir.Model) -> None:
    """Keeps, of what torch.onnx writes on nodes and values, only the scope names the rewrite reads
    (``namespace``): its stack traces hold the build machine's absolute source paths, and the FX node
    and class listings depend on the checkout. The graph is then the same from any checkout."""
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for key in [k for k in node.metadata_props if k != SCOPE_KEY]:
                del node.metadata_props[key]
            for value in node.outputs:
                value.metadata_props.clear()
        for value in [*graph.inputs, *graph.initializers.values()]:
            value.metadata_props.clear()
        graph.metadata_props.clear()
        graph.doc_string = None
    model.doc_string = None


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
