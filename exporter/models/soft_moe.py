"""The Soft-MoE layer, as ``vmoe/projects/soft_moe/router.py: SoftRouter`` with its einsum
dispatcher: every slot mixes all tokens of an image, every token mixes all slot outputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from exporter.errors import UserError
from exporter.models.experts import StackedMlpExperts, round_to_bfloat16
from exporter.models.routing import soft_moe_logits


class SoftRouter(nn.Module):
    """Tokens ``[B, m, d]`` -> dispatch and combine weights ``[B, m, n*p]`` from one logits tensor."""

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int):
        super().__init__()
        self.mu = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        self.mu.normal_(0.0, 1.0 / math.sqrt(self.mu.shape[0]), generator=generator)  # lecun normal
        self.scale.fill_(1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, tokens, dim = x.shape
        # NOTE: per-image element counts decide where `scale` goes (the reference counts the whole
        # batch); identical math, and the exported graph does not depend on the batch size.
        logits = soft_moe_logits(x, self.mu, self.scale, scale_inputs=tokens * dim < self.mu.numel())
        return torch.softmax(logits, dim=1), torch.softmax(logits, dim=-1)  # over tokens; over slots


class SoftDispatch(nn.Module):
    """Slots ``[n, B*p, d]``: every slot a dispatch-weighted mix of the raw tokens of its image."""

    def forward(self, x: torch.Tensor, dispatch: torch.Tensor, num_experts: int) -> torch.Tensor:
        images, _, dim = x.shape
        slots = torch.matmul(dispatch.transpose(1, 2), x)  # [B, n*p, d]
        return slots.reshape(images, num_experts, -1, dim).transpose(0, 1).reshape(num_experts, -1, dim)


class SoftCombine(nn.Module):
    """Tokens ``[B, m, d]``: every token a combine-weighted mix of all slot outputs of its image."""

    def forward(self, slot_out: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        num_experts, rows, dim = slot_out.shape
        images = combine.shape[0]
        slot_out = slot_out.reshape(num_experts, images, -1, dim).transpose(0, 1).reshape(images, -1, dim)
        return torch.matmul(combine, slot_out)


class SoftMoEMlp(nn.Module):
    """Soft MoE of ``num_experts`` MLPs with ``slots_per_expert`` slots each.

    Each image is its own group. ``router.mu [d, n, p]`` and the scalar ``router.scale`` are the
    reference's parameters; the stacked experts see their ``p`` slots of every image as one batch.
    ``bf16_dispatch`` rounds the tokens entering the dispatch and the slot outputs entering the
    combine to bfloat16, as the reference does (always, in Soft-MoE's router).
    """

    def __init__(
        self, dim: int, mlp_dim: int, num_experts: int, *, slots_per_expert: int = 1, bf16_dispatch: bool = False
    ):
        super().__init__()
        if num_experts < 1 or slots_per_expert < 1:
            raise UserError(f"need at least one expert and one slot, got {num_experts} and {slots_per_expert}")
        self.num_experts, self.slots_per_expert, self.bf16_dispatch = num_experts, slots_per_expert, bf16_dispatch
        self.router = SoftRouter(dim, num_experts, slots_per_expert)
        self.dispatch = SoftDispatch()
        self.experts = StackedMlpExperts(num_experts, dim, mlp_dim)
        self.combine = SoftCombine()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dispatch, combine = self.router(x)
        if self.bf16_dispatch:  # the reference's Bfloat16Dispatcher: tokens and slot outputs rounded
            slot_out = self.experts(self.dispatch(round_to_bfloat16(x), dispatch, self.num_experts))
            return self.combine(round_to_bfloat16(slot_out), combine)
        return self.combine(self.experts(self.dispatch(x, dispatch, self.num_experts)), combine)

    def extra_repr(self) -> str:
        bf16 = ", bf16_dispatch=True" if self.bf16_dispatch else ""
        return f"E={self.num_experts}, slots_per_expert={self.slots_per_expert}{bf16}"


def soft_moe_layers(module: nn.Module) -> list[tuple[str, SoftMoEMlp]]:
    """``(qualified name, layer)`` of every Soft-MoE layer of a model, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, SoftMoEMlp)]
