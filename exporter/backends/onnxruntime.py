"""ONNX Runtime: the one place sessions are made (CPU by default), and a run on named numpy inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from exporter.errors import UserError, one_line

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception types (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
    return tuple(getattr(state, n) for n in names + ("RuntimeException", "EPFail") if hasattr(state, n))


def session(model: str | Path | bytes, *, provider: str = CPU, threads: int | None = None):
    """An ``InferenceSession`` for a model file (or serialized bytes), quiet, on one provider.

    ``threads`` sets the intra-op threads (and one inter-op thread), as the benchmarks want.
    A graph ONNX Runtime refuses is a user error naming the file.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    what = "the graph" if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=[provider])
    except _errors() as e:
        raise UserError(f"ONNX Runtime cannot load {what}: {_reason(e)}") from None


def run(sess, feeds: dict[str, np.ndarray], *, what: str = "the graph") -> dict[str, np.ndarray]:
    """Every output of one run, by name."""
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except _errors() as e:
        raise UserError(f"ONNX Runtime failed to run {what}: {_reason(e)}") from None
    return dict(zip(names, values))


def run_onnxruntime(path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One CPU run of a graph file."""
    return run(session(path), feeds, what=str(path))


def _reason(e: BaseException) -> str:
    """ONNX Runtime's message without its status prefix and C++ source location, where the reason
    is (``Unsupported model IR version: 14, max supported IR version: 13``)."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).strip())
    text = re.sub(r"^Load model from .*? failed:", "", text)  # the caller names the file
    text = re.sub(r"/onnxruntime_src/\S+ \S+?\((?:[^()]|\([^()]*\))*\) ", "", text)
    return one_line(RuntimeError(text), 300).removeprefix("RuntimeError: ")
