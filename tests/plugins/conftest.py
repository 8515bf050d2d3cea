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


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernels run: the GPU, or the CPU under Triton's interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
