"""One runner interface for every backend, in the shape of Polygraphy's runners
(``polygraphy/backend/base/runner.py``): a name, ``activate`` (load: a session, an engine),
``infer`` (named numpy inputs -> named numpy outputs) and ``deactivate``; ``with runner:`` does both.
Subclasses implement ``activate_impl``/``infer_impl``/``deactivate_impl`` only.

PyTorch (``exporter.backends.torch``), ONNX Runtime (``exporter.backends.onnxruntime``), TensorRT
(``exporter.backends.tensorrt``) and TensorRT for RTX (``exporter.backends.tensorrt_rtx``) each have
one; ``exporter.parity.parity.compare_runner`` is the one loop that runs any of them on PyTorch's
reference inputs and compares, for validate, the bundle and bench.
"""

from __future__ import annotations

import time

import numpy as np


class Runner:
    """Base of the runners: ``with OnnxRuntimeRunner(path) as runner: outputs = runner.infer(feeds)``."""

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self._inference_seconds: float | None = None

    def activate(self) -> None:
        if self.is_active:
            raise RuntimeError(f"{self.name} is already active")
        self.activate_impl()
        self.is_active = True

    def infer(self, feed_dict: dict[str, np.ndarray]) -> dict:
        """Named outputs of one run on ``feed_dict``; the runner must be active."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} must be activated before inference (use `with runner:`)")
        start = time.perf_counter()
        outputs = self.infer_impl(feed_dict)
        self._inference_seconds = time.perf_counter() - start
        return outputs

    def last_inference_time(self) -> float | None:
        """Seconds of the last ``infer`` call (None before the first)."""
        return self._inference_seconds

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self.deactivate_impl()
            finally:
                self.is_active = False

    def activate_impl(self) -> None:
        pass

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()


__all__ = ["Runner"]
