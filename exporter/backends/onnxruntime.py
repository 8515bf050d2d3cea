"""ONNX Runtime: the one place sessions are made (CPU by default), and a run on named numpy inputs.

BF16 graphs run through ``exporter.backends.emulation`` (an FP32 copy rounded to BF16 after every op):
ONNX Runtime's CPU provider has no BFLOAT16 kernels. FP16 graphs run as they are, except those whose
routing is FP16 too (see ``emulation_type``)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from exporter.backends.runner import Runner
from exporter.errors import CheckFailed, UserError, one_line

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception types (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
    return tuple(getattr(state, n) for n in names + ("RuntimeException", "EPFail") if hasattr(state, n))


def session(model, *, provider: str = CPU, threads: int | None = None):
    """An ``InferenceSession`` for a model file (or serialized bytes, or an ``onnx.ModelProto``),
    quiet, on one provider.

    ``threads`` sets the intra-op threads (and one inter-op thread), as the benchmarks want.
    A graph ONNX Runtime refuses is a user error naming the file.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    what = str(model) if isinstance(model, (str, Path)) else "the graph"
    with contextlib.ExitStack() as stack:
        model = _runnable(model, provider, stack)
        try:
            return ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), options, providers=[provider]
            )
        except _errors() as e:
            raise UserError(f"ONNX Runtime cannot load {what}: {_reason(e)}") from None


def _runnable(model, provider: str, stack: contextlib.ExitStack) -> str | Path | bytes:
    """What ``InferenceSession`` takes: the model as a path or serialized, or on CPU its emulation where
    ``emulation_type`` asks for one: serialized, or over 2 GB a file with its weights beside it in a
    temporary folder (removed by ``stack`` once the session has read it)."""
    import onnx

    from exporter.backends.emulation import emulated, emulated_file, emulation_type

    in_memory = isinstance(model, (bytes, onnx.ModelProto))
    if provider != CPU:
        return model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        if isinstance(model, onnx.ModelProto):
            header = model
        elif isinstance(model, bytes):
            header = onnx.load_from_string(model)
        else:
            header = onnx.load(str(model), load_external_data=False)
    except Exception:  # ONNX Runtime says what is wrong with it
        return model
    dtype = emulation_type(header)
    if dtype is None:
        return header.SerializeToString() if isinstance(model, onnx.ModelProto) else model

    def folder() -> Path:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moe-export-emulated-")))

    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    if in_memory or not external:
        proto = header if in_memory else onnx.load(str(model))
        if proto.ByteSize() < 2**30 - 2**20:  # its FP32 copy stays under protobuf's 2 GB
            return emulated(proto, dtype).SerializeToString()
        if in_memory:
            model = folder() / "model.onnx"
            onnx.save(proto, str(model))
        del proto
    # converted weight by weight into a temporary folder, which the session reads once
    return emulated_file(model, folder(), dtype)


def run(sess, feeds: dict[str, np.ndarray], *, what: str = "the graph") -> dict[str, np.ndarray]:
    """Every output of one run, by name. A graph moe-export wrote that fails on a batch it takes is a
    failed check (CheckFailed, exit 1: the graph is wrong); another's is a user error (exit 2)."""
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except _errors() as e:
        batch = next((f"at batch {v.shape[0]} " for v in feeds.values() if getattr(v, "ndim", 0)), "")
        ours = sess.get_modelmeta().producer_name == "moe-export"
        failure = CheckFailed if ours else UserError
        raise failure(f"ONNX Runtime fails on {what} {batch}(a batch it takes): {_reason(e)}") from None
    return dict(zip(names, values))


def run_onnxruntime(path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One CPU run of a graph file."""
    return run(session(path), feeds, what=str(path))


def run_exposing(path: Path, header, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A run of the graph at ``path`` (its weights-free ``header``) whose outputs are the tensors ``names``."""
    with OnnxRuntimeRunner(path, header=header, outputs=names) as runner:
        return runner.infer(feeds)


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on one provider (CPU by default) as a runner (``exporter.backends.runner``).

    ``outputs`` names the tensors a run returns (default: the graph's outputs): any internal tensor,
    such as the router tensors ``compare_runner`` reads, is exposed as an output (typed where the
    graph knows its type, so a BF16 tensor is emulated like the rest). BF16 graphs, and FP16 graphs
    whose routing is FP16, run emulated on CPU (``exporter.backends.emulation``)."""

    def __init__(
        self,
        path: str | Path,
        *,
        header=None,
        outputs: list[str] | None = None,
        provider: str = CPU,
        threads: int | None = None,
        name: str | None = None,
    ):
        super().__init__(name or ("onnxruntime-cpu" if provider == CPU else "onnxruntime-cuda"))
        self.path, self.header, self.outputs = Path(path), header, outputs
        self.provider, self.threads = provider, threads
        self._session = None

    def activate_impl(self) -> None:
        if self.outputs is None:
            self._session = session(self.path, provider=self.provider, threads=self.threads)
            return
        import onnx

        header = self.header if self.header is not None else onnx.load(str(self.path), load_external_data=False)
        exposed = onnx.ModelProto()
        exposed.CopyFrom(header)
        known = {v.name: v for v in [*header.graph.value_info, *header.graph.output]}
        del exposed.graph.output[:]
        exposed.graph.output.extend(known.get(n, onnx.ValueInfoProto(name=n)) for n in self.outputs)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
        with contextlib.ExitStack() as stack:
            if external:  # relative weight paths resolve from the model's folder
                fd, tmp = tempfile.mkstemp(prefix=".exposed-", suffix=".onnx", dir=self.path.parent)
                os.close(fd)
                stack.callback(os.unlink, tmp)
                onnx.save(exposed, tmp)
                exposed = tmp
            self._session = session(exposed, provider=self.provider, threads=self.threads)

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run(self._session, feed_dict, what=str(self.path))

    @property
    def active_provider(self) -> str:
        """The provider the session runs on (ONNX Runtime falls back to CPU when CUDA does not load)."""
        return self._session.get_providers()[0]

    def deactivate_impl(self) -> None:
        self._session = None


def _reason(e: BaseException) -> str:
    """ONNX Runtime's message without its status prefix and C++ source location, where the reason
    is (``Unsupported model IR version: 14, max supported IR version: 13``)."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).strip())
    text = re.sub(r"^Load model from .*? failed:", "", text)  # the caller names the file
    text = re.sub(r"/onnxruntime_src/\S+ \S+?\((?:[^()]|\([^()]*\))*\) ", "", text)
    return one_line(RuntimeError(text), 300).removeprefix("RuntimeError: ")
