"""A Soft-MoE layer written the way bwconrad's ``soft-moe`` writes it, not moe-export's class:

- ``phi`` is a ``[dim, experts, slots]`` parameter with a learned scalar ``scale``;
- ``F.normalize`` (an eps clamp on the norm, not eps inside an rsqrt) on tokens and on ``phi``;
- the combine softmax runs on ``logits.flatten(start_dim=2)``; einsums ``b m d, d n p -> b m n p``;
- experts are a ModuleList; their outputs are stacked image-major and flattened to ``[b, n*p, d]``.

Run:  moe-export export --module samples/03_other_soft_moe/paper_soft_moe.py:build --input-shape 2,3,32,32 -o paper.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit_parts import SmallViT  # noqa: E402


class SoftMoELayerWrapper(nn.Module):
    def __init__(self, dim: int, num_experts: int = 8, slots_per_expert: int = 1):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(dim, num_experts, slots_per_expert) / dim**0.5)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(num_experts)
        )

    def forward(self, x):
        phi = F.normalize(self.phi, dim=0)
        x_n = F.normalize(x, dim=2) * self.scale
        logits = torch.einsum("b m d, d n p -> b m n p", x_n, phi)
        d = torch.softmax(logits, dim=1)
        c = torch.softmax(logits.flatten(start_dim=2), dim=-1)
        xs = torch.einsum("b m d, b m n p -> b n p d", x, d)
        ys = torch.stack([f_i(xs[:, i, :, :]) for i, f_i in enumerate(self.experts)], dim=1)
        ys = ys.flatten(1, 2)
        return torch.einsum("b m s, b s d -> b m d", c, ys)


def build() -> nn.Module:
    torch.manual_seed(1)
    return SmallViT(lambda i: SoftMoELayerWrapper(48) if i % 2 == 1 else None).eval()
