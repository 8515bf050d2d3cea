"""A Soft-MoE layer written the way lucidrains' ``soft-moe-pytorch`` writes it, not moe-export's class:

- slot embeddings are a ``[experts, slots, dim]`` parameter;
- RMSNorm (l2-normalise, times sqrt(dim), times a learned gain) on the tokens and on the slots, and the
  *normalised* tokens are what the slots mix;
- einsums with their own axis orders (``b n e s``); experts are a ModuleList run in a Python loop.

Run:  moe-export export --module samples/03_other_soft_moe/rmsnorm_soft_moe.py:build --input-shape 2,3,32,32 -o rms.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit_parts import SmallViT  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class SoftMoE(nn.Module):
    def __init__(self, dim: int, num_experts: int = 4, slots_per_expert: int = 2, mult: int = 2):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.slot_norm = RMSNorm(dim)
        self.slot_embeds = nn.Parameter(torch.randn(num_experts, slots_per_expert, dim))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim)) for _ in range(num_experts)
        )

    def forward(self, x):
        x = self.norm(x)
        slot_embeds = self.slot_norm(self.slot_embeds)
        logits = torch.einsum("b n d, e s d -> b n e s", x, slot_embeds)
        dispatch_weights = logits.softmax(dim=1)
        b, n, e, s = logits.shape
        combine_weights = logits.reshape(b, n, e * s).softmax(dim=-1)
        slots = torch.einsum("b n d, b n e s -> b e s d", x, dispatch_weights)
        out = torch.stack([expert(slots[:, i]) for i, expert in enumerate(self.experts)], dim=1)
        out = out.reshape(b, e * s, -1)
        return torch.einsum("b s d, b n s -> b n d", out, combine_weights)


def build() -> nn.Module:
    torch.manual_seed(0)
    model = SmallViT(lambda i: SoftMoE(48) if i >= 2 else None)
    with torch.no_grad():  # trained-looking gains, so the normalisation is not an identity
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.gamma.uniform_(0.5, 1.5)
    return model.eval()
