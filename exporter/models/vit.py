"""ViT backbone of both families, as ``vmoe.nn.vit_moe.VisionTransformerMoe`` at inference:
pre-LN blocks, LayerNorm eps 1e-6, tanh GELU, learned position embeddings, a class token or GAP,
optional qk-LayerNorm (no bias), optional pre-logits (Dense + tanh)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from exporter import settings


def _layer_norm(dim: int, bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=settings.LAYERNORM_EPS, bias=bias)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = _layer_norm(self.head_dim, bias=False) if qk_norm else nn.Identity()
        self.k_norm = _layer_norm(self.head_dim, bias=False) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.q_norm(q) * (1.0 / math.sqrt(self.head_dim))
        attn = torch.softmax(torch.matmul(q, self.k_norm(k).transpose(-1, -2)), dim=-1)
        return self.out(torch.matmul(attn, v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: nn.Module, qk_norm: bool = False):
        super().__init__()
        self.norm1, self.attn = _layer_norm(dim), Attention(dim, heads, qk_norm)
        self.norm2, self.mlp = _layer_norm(dim), mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@torch.no_grad()
def _init_tree(module: nn.Module, generator: torch.Generator) -> None:
    """Modules with their own ``init_`` own their subtree; Linear/Conv get a lecun-normal init."""
    for child in module.children():
        if hasattr(child, "init_"):
            child.init_(generator)
        elif isinstance(child, (nn.Linear, nn.Conv2d)):
            child.weight.normal_(0.0, 1.0 / math.sqrt(child.weight[0].numel()), generator=generator)
            if child.bias is not None:
                child.bias.normal_(0.0, 0.02, generator=generator)
        else:
            _init_tree(child, generator)


class VisionTransformer(nn.Module):
    """A ViT whose MLP in block ``i`` is ``make_moe(i)`` for ``i`` in ``moe_layers``.

    Input ``[N, C, H, W]`` float images, output ``[N, num_classes]`` logits.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        dim: int,
        mlp_dim: int,
        heads: int,
        layers: int,
        num_classes: int,
        moe_layers: tuple[int, ...] = (),
        make_moe: Callable[[int], nn.Module] | None = None,
        classifier: str = "token",
        representation_size: int | None = None,
        qk_norm: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        self.image_size, self.in_chans, self.classifier = image_size, in_chans, classifier
        tokens = (image_size // patch_size) ** 2 + (1 if classifier == "token" else 0)
        self.embedding = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if classifier == "token" else None
        self.pos_embedding = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, make_moe(i) if i in moe_layers else Mlp(dim, mlp_dim), qk_norm)
            for i in range(layers)
        )
        self.encoder_norm = _layer_norm(dim)
        self.pre_logits = nn.Linear(dim, representation_size) if representation_size else None
        self.head = nn.Linear(representation_size or dim, num_classes)

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        """Seeded random init; non-degenerate everywhere so that parity checks see every path."""
        _init_tree(self, generator)
        if self.cls is not None:
            self.cls.normal_(0.0, 0.02, generator=generator)
        self.pos_embedding.normal_(0.0, 0.02, generator=generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embedding(images).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embedding
        for block in self.blocks:
            x = block(x)
        x = self.encoder_norm(x)
        x = x[:, 0] if self.classifier == "token" else x.mean(dim=1)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        return self.head(x)
