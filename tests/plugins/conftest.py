"""Plugin kernel tests run the Triton kernels on CPU through Triton's interpreter when no GPU is
present. Triton reads ``TRITON_INTERPRET`` when a kernel is decorated; the kernel modules decorate
lazily on first launch, so setting it here (before any test runs) is early enough."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default


def _squeeze_interpreter_scalars() -> None:
    """Triton < 3.8's interpreter turns a scalar kernel argument into an int with
    ``int(handle.data)`` on a 1-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"); Triton 3.8 squeezes first. The same fix, applied to the
    interpreter only (compiled kernels never see it), so the kernel tests run on Triton 3.6 too."""
    import numpy as np

    from plugins.aot import triton_version

    version = triton_version()
    if version is None or version >= (3, 8) or tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _squeeze_interpreter_scalars()


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernels run: the GPU, or the CPU under Triton's interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
