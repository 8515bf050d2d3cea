"""torch.export of a model whoever wrote it: a dynamic batch where the code allows one, the truth where it
does not, and eval-time randomness named.

``trace`` tries the strategies in ``STRATEGIES`` in order: a non-strict export with a dynamic batch
(the usual case); one that defers guards to runtime assertions (torch.onnx's first strategy); a
strict (TorchDynamo) one, which keeps ``int()`` of a float computed from the batch symbolic; the same
reasoning about sizes >= 2 "size-obliviously", so that reshapes of a batch-sized dimension need no
guard (DeepSpeed's buffers); a draft export; then, when the code fixes the batch, exports with the
traced batch (``dynamic=False``, and the note says where and why). Deferred assertions and draft
exports let a size computed for the traced batch through without a word (torch.onnx used them so,
which is how wrong graphs got written): their trace must give the model's outputs at another batch
before it is used.

A failure is one line with the cause and the user's ``file:line`` (the last frame outside torch);
torch's own messages, FX dumps and logs go to a log file that the line names. Random ops reached in
eval are named with their module and line; one whose draw does not change the output (two seeds) is
replaced by its mean (the export is proven equal to PyTorch afterwards); any other is an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sysconfig
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.errors import UserError, one_line

#: The packages whose loggers write to the log file, never to the terminal, while tracing.
TORCH_LOGGERS = ("torch", "onnxscript", "onnx_ir")
#: The logger that says where each shape guard came from ("[guard added] (file.py:27 in forward)").
GUARDS_LOGGER = "torch.fx.experimental.symbolic_shapes"

#: Random ops (aten overload packets, trailing ``_`` removed) that a model in eval should not reach.
RANDOM_OPS = frozenset(
    "uniform rand rand_like randn randn_like randint randint_like randperm normal bernoulli exponential "
    "multinomial poisson geometric cauchy log_normal random native_dropout".split()
)
#: Their means, for draws that do not change the output: ``name -> f(node) -> value``.
_MEANS = {
    "uniform": lambda n: (_arg(n, 1, "from", 0.0) + _arg(n, 2, "to", 1.0)) / 2,
    "rand": lambda n: 0.5,
    "rand_like": lambda n: 0.5,
    "randn": lambda n: 0.0,
    "randn_like": lambda n: 0.0,
    "normal": lambda n: _arg(n, 1, "mean", 0.0),
}
#: What to set for a known package whose layer draws random numbers in eval.
EVAL_SETTINGS = {
    "mixture_of_experts": "second_policy_eval='all' (or 'none')",
    "st_moe_pytorch": "threshold_eval=0",
    "deepspeed": "use_rts=False, top2_2nd_expert_sampling=False and noisy_gate_policy=None",
}


@dataclass
class Traced:
    """An ExportedProgram and how it was made."""

    program: torch.export.ExportedProgram
    dynamic: bool
    strategy: str  # "non-strict" or "strict"
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RandomOp:
    op: str  # aten name, e.g. "uniform_"
    module: str  # qualified module name, e.g. "blocks.1.mlp.gate"
    cls: str  # its class, e.g. "mixture_of_experts.mixture_of_experts.Top2Gating"
    where: str  # "file.py:line" of the call, or ""

    def describe(self) -> str:
        at = f" ({self.where})" if self.where else ""
        return f"{self.module or 'the model'} ({self.cls.rsplit('.', 1)[-1]}) draws {self.op} in eval{at}"


# --- tracing -------------------------------------------------------------------------------------


#: ``(name, strict, size-oblivious, deferred runtime assertions, draft, dynamic batch)``, tried in order.
STRATEGIES = (
    ("non-strict", False, False, False, False, True),
    ("non-strict, runtime assertions deferred", False, False, True, False, True),
    ("strict", True, False, False, False, True),
    ("strict, size-oblivious", True, True, False, False, True),
    ("draft", False, False, False, True, True),
    ("non-strict", False, False, False, False, False),
    ("strict", True, False, False, False, False),
)


def trace(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_dim,
    *,
    log: ExportLog,
    other: torch.Tensor | None = None,
    verify: bool = True,
) -> Traced:
    """torch.export of ``model`` on ``images``, the batch dynamic (``batch_dim``) where the code allows.

    A trace that defers guards to runtime assertions, or a draft export (both of which let a size
    computed for the traced batch through), must also give the model's own outputs on ``other``
    (another batch) before it is used: else it fixed a size, and the next strategy is tried.
    ``verify=False`` skips that (a structure-only trace of a model without weights: its op set)."""
    first: BaseException | None = None
    fixed_by: BaseException | None = None
    fixed_at = ""
    for strategy, strict, oblivious, deferred, draft, dynamic in STRATEGIES:
        if not dynamic and fixed_by is None:
            break  # the batch was never the problem: a fixed batch would fail the same way
        if (deferred or draft) and ((other is None and verify) or fixed_by is None):
            continue  # they help only where a guard fixed a size, and must be checked at another batch
        shapes = ({0: batch_dim},) if dynamic else None
        try:
            with log.capture(f"torch.export ({strategy}, {'dynamic' if dynamic else 'fixed'} batch)"):
                with _size_oblivious(oblivious):
                    if draft:
                        program = torch.export.draft_export(model, (images,), dynamic_shapes=shapes)
                        if _data_dependent(program):
                            raise _Specialized("the draft trace fixed a value computed from the images")
                    else:
                        program = torch.export.export(
                            model,
                            (images,),
                            dynamic_shapes=shapes,
                            strict=strict,
                            prefer_deferred_runtime_asserts_over_guards=deferred,
                        )
                if (deferred or draft) and verify and not same_outputs(program, model, other):
                    raise _Specialized(
                        f"the {strategy} trace computes other outputs than the model at batch {other.shape[0]} "
                        "(a size fixed at the traced batch)"
                    )
        except Exception as e:  # noqa: BLE001 (torch raises anything; classified below)
            if isinstance(e, UserError) or _wrapped_user_error(e):
                raise
            first = first or e
            if dynamic and (_fixes_the_batch(e) or isinstance(e, _Specialized)):
                fixed_by, fixed_at = fixed_by or e, fixed_at or guard_location(log.text)
            continue
        notes = []
        if not dynamic:
            at = f" at {fixed_at}" if fixed_at else ""
            notes.append(f"the batch is fixed at {images.shape[0]}{at}: {failure_line(fixed_by, log.path)}")
        log.failed = bool(notes)  # the log stays where a note names it, not for strategies that led here
        return Traced(program, dynamic, strategy, notes)
    raise UserError(f"export failed: {failure_line(first, log.path)}") from None


class _Specialized(RuntimeError):
    """A trace that claims a dynamic batch but computes for the traced one only."""


def _data_dependent(program: torch.export.ExportedProgram) -> bool:
    """Whether a draft export specialised a value computed from tensor values (its report's
    data-dependent failures: the graph holds for the traced images only)."""
    report = getattr(program, "_report", None)
    return any(getattr(f.failure_type, "name", "") == "DATA_DEPENDENT_ERROR" for f in getattr(report, "failures", ()))


def same_outputs(program: torch.export.ExportedProgram, model: torch.nn.Module, images: torch.Tensor) -> bool:
    """Whether ``program`` gives the model's outputs on ``images`` (another batch than the traced one):
    floats within float32 noise, routing decisions (booleans, integers) exactly."""
    with torch.no_grad():
        try:
            got = _flat(program.module(check_guards=False)(images))
        except Exception:  # noqa: BLE001 (a size fixed at the traced batch fails in many ways)
            return False
        torch.manual_seed(0)
        want = _flat(model(images))
    return len(got) >= len(want) and all(_close(g, w) for g, w in zip(got, want))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal shapes, and values equal (integers, booleans: routing decisions) or close (floats)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if not want.is_floating_point():
        return torch.equal(got, want)
    scale = max(1.0, float(want.nan_to_num().abs().max())) if want.numel() else 1.0
    return torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)


def guard_location(log_text: str) -> str:
    """``file.py:line in function`` of the first guard that fixed a size to a constant, outside torch's
    own files: torch's ``[guard added]`` log lines name the frame that added each, and TorchDynamo's
    also the model's source line (``... # path/model.py:43 in forward (torch frame)``)."""
    for line in log_text.splitlines():
        if "[guard added]" not in line or "Eq(" not in line:
            continue
        for match in re.finditer(r"(?:# |\()([^()\s]+\.py):(\d+) in (\w+)", line):
            path = match.group(1)
            if not (Path(_TORCH_DIR, path).exists() or str(Path(path).resolve()).startswith(_TORCH_DIR)):
                return f"{Path(path).name}:{match.group(2)} in {match.group(3)}"
    return ""


def _fixes_the_batch(e: BaseException) -> bool:
    text = str(e)
    return "Constraints violated" in text or "specializ" in text or "marked" in text and "dynamic" in text


def _wrapped_user_error(e: BaseException) -> bool:
    from exporter.errors import wrapped_user_error

    return wrapped_user_error(e) is not None


@contextlib.contextmanager
def _size_oblivious(on: bool):
    """Reason about sizes >= 2 without guards on 0/1 (``backed_size_oblivious``), for the strict attempt:
    a reshape of a batch-sized dimension then needs no divisibility guard. Whatever the reasoning
    assumed is checked afterwards: the graph is run at two batches, one of them the smallest."""
    if not on:
        yield
        return
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True):
        yield


# --- what went wrong, in one line ----------------------------------------------------------------

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_OWN_DIR = str(Path(__file__).resolve().parents[1])
_STDLIB = str(Path(sysconfig.get_paths()["stdlib"]).resolve())
#: Helper libraries a model calls into: the line to show is the model's call, not theirs.
_HELPERS = ("einops", "beartype", "typeguard")


def user_frame(e: BaseException) -> str:
    """``file.py:line in function`` of the innermost frame of the model's code (outside torch,
    moe-export and the standard library) that led to ``e``; from the traceback, or from the location
    Dynamo writes into its message; "" when there is none."""
    best = ""
    for err in _chain(e):
        for frame in traceback.extract_tb(err.__traceback__):
            path = str(Path(frame.filename).resolve())
            if path.startswith((_TORCH_DIR, _OWN_DIR, _STDLIB)) or frame.filename.startswith("<"):
                continue
            if any(f"{os.sep}{name}{os.sep}" in path for name in _HELPERS):
                continue
            best = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    if best:
        return best
    match = re.search(r"#\s*(\S+\.py):(\d+) in (\w+)", str(e))
    return f"{Path(match.group(1)).name}:{match.group(2)} in {match.group(3)}" if match else ""


def failure_line(e: BaseException | None, log_path: Path | None = None) -> str:
    """The cause of a tracing or conversion failure and where in the model's code it happened."""
    if e is None:
        return "no reason recorded"
    text = " ".join(str(e).split())
    where = user_frame(e)
    at = f" at {where}" if where else ""
    if "data-dependent" in text or "GuardOnDataDependent" in type(e).__name__:
        cause = f"a size computed from tensor values (a data-dependent shape){at}, which torch.export cannot trace"
    elif isinstance(e, _Specialized):
        cause = str(e) + at
    elif "Constraints violated" in text:
        guard = re.search(r"satisfy the generated guard (.+?)\.(?:\s|$)", text)
        cause = "the model's code fixes the batch size" + (f" ({guard.group(1)[:120]})" if guard else "") + at
    elif m := re.search(r"No decompositions registered for|DispatchError|Unsupported FX nodes: \{'(\S+)'", text):
        op = re.search(r"aten\.\w+(?:\.\w+)?", text)
        cause = f"no ONNX translation for {op.group(0) if op else m.group(0)}{at}"
    else:
        cause = one_line(e) + at
    return cause + (f" (full log: {log_path})" if log_path else "")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


class ExportLog:
    """Where torch's own output of one export goes: a file in the temporary folder (named in error
    lines), not the terminal. Kept only when something failed or ``keep`` is set (``--debug``)."""

    def __init__(self, keep: bool = False):
        fd, name = tempfile.mkstemp(prefix="moe-export-", suffix=".log")
        os.close(fd)
        self.path, self.keep, self.failed, self.text = Path(name), keep, False, ""

    @contextlib.contextmanager
    def capture(self, what: str) -> Iterator[None]:
        """Everything torch prints or logs in the block (and a failure's traceback) into the file: every
        torch and onnxscript logger writes to the file only (their levels unchanged), and so do stdout,
        stderr and warnings."""
        buffer = io.StringIO()
        handler = logging.StreamHandler(buffer)
        names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in TORCH_LOGGERS]
        saved = []
        for name in {*names, *TORCH_LOGGERS, GUARDS_LOGGER}:
            logger = logging.getLogger(name)
            saved.append((logger, logger.propagate, logger.handlers[:], logger.level))
            logger.handlers, logger.propagate = [handler], False
        logging.getLogger(GUARDS_LOGGER).setLevel(logging.INFO)  # where a guard fixed a size, for the note
        try:
            with (
                contextlib.redirect_stdout(buffer),
                contextlib.redirect_stderr(buffer),
                _warnings_to(buffer),
            ):
                yield
        except BaseException:
            self.failed = True
            buffer.write(traceback.format_exc())
            raise
        finally:
            for logger, propagate, handlers, level in saved:
                logger.handlers, logger.propagate = handlers, propagate
                logger.setLevel(level)
            self.text = buffer.getvalue()
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f"=== {what}\n{self.text}\n")

    def close(self) -> None:
        if not (self.keep or self.failed):
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _warnings_to(buffer):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        saved = warnings.showwarning
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: buffer.write(
            warnings.formatwarning(message, category, filename, lineno, line)
        )
        try:
            yield
        finally:
            warnings.showwarning = saved


# --- random ops in eval --------------------------------------------------------------------------


def random_ops(program: torch.export.ExportedProgram) -> list[tuple[torch.fx.Node, RandomOp]]:
    """The random ops a traced model reaches, with the module that calls each and where."""
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function" or _op_name(node).rstrip("_") not in RANDOM_OPS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module, cls = next(reversed(stack.values()), ("", ""))
        cls = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
        where = f"{Path(frames[-1][0]).name}:{frames[-1][1]}" if frames else ""
        found.append((node, RandomOp(_op_name(node), module, cls, where)))
    return found


def _op_name(node: torch.fx.Node) -> str:
    packet = getattr(node.target, "_overloadpacket", None)
    return getattr(packet, "__name__", "") or getattr(node.target, "__name__", "")


def _arg(node: torch.fx.Node, index: int, name: str, default):
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    return float(value)


def settle_random_ops(
    traced: Traced, model: torch.nn.Module, images: torch.Tensor, *, seeds: tuple[int, ...] = (1, 2)
) -> None:
    """Random ops reached in eval: each whose draw does not change the model's output (the same
    output under ``seeds``) is replaced by its distribution's mean, and said in ``traced.notes``; any
    other is a UserError naming the module, the op and the setting that makes it deterministic."""
    found = random_ops(traced.program)
    if not found:
        return
    outputs = []
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(_flat(model(images)))
    inert = all(len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(outputs, outputs[1:]))
    first = found[0][1]
    replaceable = all(_op_name(n).rstrip("_") in _MEANS and _single_use(n) for n, _ in found)
    if not inert or not replaceable:
        package = first.cls.split(".", 1)[0]
        hint = EVAL_SETTINGS.get(package)
        change = f": set {hint}" if hint else ": make the layer deterministic in eval (no sampling when not training)"
        why = "and the output depends on it" if not inert else f"({first.op} has no deterministic stand-in)"
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{first.describe()}{more} {why}{change}")
    graph = traced.program.graph
    for node, op in found:
        mean = _MEANS[_op_name(node).rstrip("_")](node)
        with graph.inserting_before(node):
            if _op_name(node) in ("rand", "randn"):
                size = node.args[0]
                kwargs = {k: node.kwargs[k] for k in ("dtype", "device") if k in node.kwargs}
                constant = graph.call_function(torch.ops.aten.full.default, (size, mean), kwargs)
            else:
                constant = graph.call_function(torch.ops.aten.full_like.default, (node.args[0], mean))
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
        traced.notes.append(f"{op.describe()}; the draw does not change the output: replaced by its mean {mean:g}")
    traced.program.graph_module.recompile()


def _single_use(node: torch.fx.Node) -> bool:
    """An in-place draw into a tensor nothing else reads (``zeros_like(x).uniform_()``), or a new tensor."""
    if not _op_name(node).endswith("_"):
        return True
    source = node.args[0]
    return isinstance(source, torch.fx.Node) and len(source.users) == 1


def _flat(out) -> list[torch.Tensor]:
    from exporter.models.capture import flatten_outputs

    return flatten_outputs(out)
