"""A user's own model, written without the zoo: a conv stem, two transformer blocks of its own, and
moe-export's V-MoE layer as the MLP of the second block (Batch Prioritized Routing, one image per
routing group for batch-1 edge inference, capacity factor 0.75 so some patches are dropped).

    moe-export export --module samples/01_user_module/my_vit.py:build --input-shape 4,3,32,32 \
        --routing-outputs -o my_vit.onnx
    moe-export validate my_vit.onnx
"""

import torch
from torch import nn

from exporter.models import VMoEMlp


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MyViT(nn.Module):
    def __init__(self, dim: int = 48, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(dim // 2, dim, 4, stride=4)
        )
        dense = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        moe = VMoEMlp(dim, 2 * dim, num_experts=6, k=2, capacity_factor=0.75, batch_priority=True, group_images=1)
        self.blocks = nn.Sequential(Block(dim, 4, dense), Block(dim, 4, moe))
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.stem(images).flatten(2).transpose(1, 2)  # [N, 16, dim] for 32x32 images
        return self.head(self.blocks(x).mean(dim=1))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = MyViT()
    for layer in model.modules():  # the MoE layer's own seeded init: distinct experts, non-trivial router
        if isinstance(layer, VMoEMlp):
            layer.init_(torch.Generator().manual_seed(0))
    return model
