"""Stacked MLP experts, run as two batched matmuls (never a Python loop over experts); the bfloat16
rounding of their inputs and outputs (``bf16_dispatch``)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class StackedMlpExperts(nn.Module):
    """``E`` MLPs ``Dense(M) -> gelu(tanh) -> Dense(D)`` with weights ``[E, D, M]`` and ``[E, M, D]``.

    ``forward`` takes ``[E, R, D]`` (R rows per expert) and returns ``[E, R, D]``.
    """

    def __init__(self, num_experts: int, dim: int, mlp_dim: int):
        super().__init__()
        self.num_experts, self.dim, self.mlp_dim = num_experts, dim, mlp_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, mlp_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, mlp_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, mlp_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        # Every expert gets its own weights: identical experts would hide routing errors in parity.
        self.w1.normal_(0.0, 1.0 / math.sqrt(self.dim), generator=generator)
        self.w2.normal_(0.0, 1.0 / math.sqrt(self.mlp_dim), generator=generator)
        self.b1.normal_(0.0, 0.02, generator=generator)
        self.b2.normal_(0.0, 0.02, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(x, self.w1) + self.b1.unsqueeze(1)
        h = F.gelu(h, approximate="tanh")
        return torch.matmul(h, self.w2) + self.b2.unsqueeze(1)


# Called with (x, x rounded) at every bfloat16 rounding of a forward pass, in order; what it returns is
# used instead of the rounded value. Unset (None) everywhere but inside ``bfloat16_rounding``.
_ROUNDING = contextvars.ContextVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None](
    "moe_export_bfloat16_rounding", default=None
)


def round_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bfloat16 (nearest even) and back to its own dtype: a Cast pair in ONNX."""
    rounded = x.to(torch.bfloat16).to(x.dtype)
    hook = _ROUNDING.get()
    return rounded if hook is None else hook(x, rounded)


@contextlib.contextmanager
def bfloat16_rounding(hook: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every ``round_to_bfloat16`` of the models calls ``hook(x, rounded)`` and uses
    what it returns (``exporter.backends.torch.rounding_as``: PyTorch rounding as a graph did)."""
    token = _ROUNDING.set(hook)
    try:
        yield
    finally:
        _ROUNDING.reset(token)
