"""The small plain-PyTorch ViT the other authors' MoE layers plug into here (``samples/03_other_soft_moe``'s),
and a wrapper for layers that return ``(output, aux_loss, ...)``: a ViT block adds only the output."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "03_other_soft_moe"))
from vit_parts import SmallViT  # noqa: E402

DIM, HIDDEN, EXPERTS = 32, 64, 4  # 32x32 images in 4x4 patches: 64 tokens per image


class FirstOutput(nn.Module):
    """``layer(x)[0]`` for a layer that returns its output with auxiliary losses (training only)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.moe = layer

    def forward(self, x):
        out = self.moe(x)
        return out[0] if isinstance(out, tuple) else out


def vit(make_moe) -> nn.Module:
    """Two blocks, an MoE layer in each (``make_moe(i)``); eval mode."""
    return SmallViT(make_moe, dim=DIM, depth=2, heads=4).eval()
