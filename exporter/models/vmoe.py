"""The V-MoE layer: softmax router, top-k routing with capacity, gather dispatch, batched experts,
gather combine. As ``vmoe.nn.vit_moe.MlpMoeBlock`` with the einsum dispatcher, at inference."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from exporter import settings
from exporter.errors import UserError
from exporter.models.capture import record
from exporter.models.experts import StackedMlpExperts, round_to_bfloat16
from exporter.models.routing import TopKRouting, check_capacity_factor, compute_capacity, route_top_k


class TopKRouter(nn.Module):
    """Gates ``[G, S, E]`` -> routing decisions (top-k, capacity, priority). No parameters."""

    def __init__(self, k: int, batch_priority: bool):
        super().__init__()
        self.k, self.batch_priority = k, batch_priority

    def forward(self, gates: torch.Tensor, capacity: int) -> TopKRouting:
        return route_top_k(gates, self.k, capacity, self.batch_priority)


class Dispatch(nn.Module):
    """Tokens ``[G, S, D]`` -> expert inputs ``[E, G*C, D]``, a gather; empty slots are zeros."""

    def forward(self, x: torch.Tensor, routing: TopKRouting, num_experts: int, capacity: int) -> torch.Tensor:
        num_groups, group_size, dim = x.shape
        per_expert = slot_tokens(routing, num_experts, capacity).reshape(num_groups, num_experts, capacity)
        per_expert = per_expert.transpose(0, 1)  # [E, G, C]
        offset = (torch.arange(num_groups, device=x.device) * group_size).view(1, num_groups, 1)
        rows = (per_expert.clamp(min=0) + offset).reshape(-1)
        gathered = x.reshape(num_groups * group_size, dim).index_select(0, rows)
        filled = (per_expert >= 0).reshape(-1, 1).to(x.dtype)
        return (gathered * filled).reshape(num_experts, num_groups * capacity, dim)


class Combine(nn.Module):
    """Expert outputs ``[E, G*C, D]`` -> tokens ``[G, S, D]``: per token, the gate-weighted sum of
    its kept choices (a gather and a k-term dot product; no scatter, deterministic)."""

    def forward(self, expert_out: torch.Tensor, routing: TopKRouting, capacity: int) -> torch.Tensor:
        num_experts, rows, dim = expert_out.shape
        num_groups, group_size, k = routing.slot.shape
        group = torch.arange(num_groups, device=expert_out.device).view(num_groups, 1, 1)
        row = routing.expert * rows + group * capacity + routing.slot.clamp(min=0)  # rows == G*C
        picked = expert_out.reshape(num_experts * rows, dim).index_select(0, row.reshape(-1))
        picked = picked.reshape(num_groups * group_size, k, dim)
        weight = routing.weight.to(expert_out.dtype).reshape(num_groups * group_size, 1, k)
        return torch.matmul(weight, picked).reshape(num_groups, group_size, dim)


def slot_tokens(routing: TopKRouting, num_experts: int, capacity: int) -> torch.Tensor:
    """``[G, E*C]`` int64: the group-local token in each buffer slot ``e*C + c``, ``-1`` when empty.

    A ScatterElements without reduction: every kept (token, choice) writes its token index to its
    own slot; dropped choices all write to one spare slot that is cut off afterwards. The table is at
    least as wide as the S*k writes: TensorRT's ONNX parser refuses a ScatterElements whose indices
    are wider than its data on any axis ("Indices dimensions must be less than data dimensions"),
    which a capacity factor below 1 would otherwise give.
    """
    num_groups, group_size, k = routing.slot.shape
    spare = num_experts * capacity
    target = torch.where(routing.slot >= 0, routing.expert * capacity + routing.slot, spare)
    token = torch.arange(group_size, device=target.device).view(1, group_size, 1).expand_as(target)
    width = max(spare + 1, group_size * k)
    table = torch.full((num_groups, width), -1, dtype=torch.int64, device=target.device)
    table = table.scatter(1, target.reshape(num_groups, group_size * k), token.reshape(num_groups, group_size * k))
    return table[:, :spare]


class VMoEMlp(nn.Module):
    """Sparse MoE of MLPs with top-k routing and a fixed capacity per routing group.

    Args:
        dim: Token width D.
        mlp_dim: Expert hidden width M.
        num_experts: E.
        k: Experts per token.
        capacity_factor: Capacity ``ceil(k*S*C/E)`` padded to ``multiple_of``; or give ``capacity``.
        capacity: A fixed capacity per expert and group, instead of ``capacity_factor``.
        batch_priority: Batch Prioritized Routing.
        group_images: Images per routing group; a batch must hold a multiple of it.
        bf16_dispatch: Round the expert inputs and outputs to bfloat16 (and back), as the reference's
            ``Bfloat16Dispatcher`` (``dispatcher.bfloat16 = True`` in the paper configs); the router,
            the experts and the weighted combine stay float32.
    """

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        num_experts: int,
        *,
        k: int = 2,
        capacity_factor: float | None = 1.05,
        capacity: int | None = None,
        batch_priority: bool = False,
        group_images: int = settings.DEFAULT_GROUP_IMAGES,
        ceil_or_round: str = settings.DEFAULT_CAPACITY_CEIL_OR_ROUND,
        multiple_of: int | None = settings.DEFAULT_CAPACITY_MULTIPLE_OF,
        bf16_dispatch: bool = False,
    ):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise UserError(f"k must be between 1 and the number of experts ({num_experts}), got {k}")
        if capacity is None:
            check_capacity_factor(capacity_factor)
        if group_images < 1:
            raise UserError(f"group size must be at least 1 image, got {group_images}")
        self.num_experts, self.k, self.batch_priority = num_experts, k, batch_priority
        self.capacity_factor, self.fixed_capacity = capacity_factor, capacity
        self.group_images, self.ceil_or_round, self.multiple_of = group_images, ceil_or_round, multiple_of
        self.bf16_dispatch = bf16_dispatch
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.routing = TopKRouter(k, batch_priority)
        self.dispatch = Dispatch()
        self.experts = StackedMlpExperts(num_experts, dim, mlp_dim)
        self.combine = Combine()

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        self.router.weight.normal_(0.0, 1.0 / math.sqrt(self.router.in_features), generator=generator)
        self.experts.init_(generator)

    def capacity(self, group_size: int) -> int:
        """Slots per expert and routing group of ``group_size`` tokens; refuses a capacity whose expert
        hidden activations ``[E, capacity, mlp_dim]`` (FP32, per group) exceed
        ``settings.MAX_EXPERT_BUFFER_BYTES``, naming the tensor and its size."""
        capacity = self.fixed_capacity
        if capacity is None:
            capacity = compute_capacity(
                group_size * self.k, self.num_experts, self.capacity_factor, self.ceil_or_round, self.multiple_of
            )
        mlp_dim = self.experts.mlp_dim
        size = self.num_experts * capacity * mlp_dim * 4
        if size > settings.MAX_EXPERT_BUFFER_BYTES:
            given = f"capacity {capacity}" if self.fixed_capacity else f"capacity factor {self.capacity_factor:g}"
            capacity, group_size, size = int(capacity), int(group_size), int(size)  # (symbolic while tracing)
            raise UserError(
                f"{given} gives {capacity:,} slots per expert for {group_size:,} tokens a group: the expert "
                f"activations [{self.num_experts}, {capacity}, {mlp_dim}] would take {size / 2**30:,.1f} GiB per "
                f"group (limit {settings.MAX_EXPERT_BUFFER_BYTES / 2**30:g} GiB)"
            )
        return capacity

    def route(self, x: torch.Tensor) -> tuple[TopKRouting, int]:
        """Routing of grouped tokens ``[G, S, D]`` and the capacity it used."""
        gates = torch.softmax(self.router(x).float(), dim=-1)  # the router stays float32
        capacity = self.capacity(x.shape[1])
        return self.routing(gates, capacity), capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, tokens, dim = x.shape
        if images % self.group_images != 0:
            raise UserError(f"batch of {images} images is not a multiple of the routing group ({self.group_images})")
        grouped = x.reshape(-1, self.group_images * tokens, dim)
        routing, capacity = self.route(grouped)
        record(self, routing)
        tokens_in = round_to_bfloat16(grouped) if self.bf16_dispatch else grouped
        expert_in = self.dispatch(tokens_in, routing, self.num_experts, capacity)
        expert_out = self.experts(expert_in)
        if self.bf16_dispatch:
            expert_out = round_to_bfloat16(expert_out)
        return self.combine(expert_out, routing, capacity).reshape(images, tokens, dim)

    def extra_repr(self) -> str:
        cap = f"capacity={self.fixed_capacity}" if self.fixed_capacity else f"capacity_factor={self.capacity_factor}"
        bf16 = ", bf16_dispatch=True" if self.bf16_dispatch else ""
        groups = f"group_images={self.group_images}"
        return f"E={self.num_experts}, k={self.k}, {cap}, bpr={self.batch_priority}, {groups}{bf16}"


def vmoe_layers(module: nn.Module) -> list[tuple[str, VMoEMlp]]:
    """``(qualified name, layer)`` of every V-MoE layer of a model, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, VMoEMlp)]


@contextlib.contextmanager
def routing_settings(
    module: nn.Module,
    *,
    capacity_factor: float | None = None,
    batch_priority: bool | None = None,
    group_images: int | None = None,
) -> Iterator[None]:
    """Temporarily sets the routing of every V-MoE layer (``None`` keeps a layer's own value)."""
    layers = [m for _, m in vmoe_layers(module)]
    saved = [(m.capacity_factor, m.fixed_capacity, m.batch_priority, m.group_images) for m in layers]
    try:
        for m in layers:
            if capacity_factor is not None:
                check_capacity_factor(capacity_factor)
                m.capacity_factor, m.fixed_capacity = capacity_factor, None
            if batch_priority is not None:
                m.batch_priority = m.routing.batch_priority = batch_priority
            if group_images is not None:
                m.group_images = group_images
        yield
    finally:
        for m, (c, fixed, bpr, group) in zip(layers, saved):
            m.capacity_factor, m.fixed_capacity, m.group_images = c, fixed, group
            m.batch_priority = m.routing.batch_priority = bpr


def unlimited_capacity_factor(module: nn.Module) -> float:
    """A capacity factor at which no V-MoE layer can drop anything: capacity >= the group's tokens.

    Each token sends its k choices to k different experts, so an expert receives at most one choice per
    token; ``ceil(S * k * C / E) >= S`` holds for ``C = E / k``.
    """
    layers = vmoe_layers(module)
    if not layers:
        raise UserError("the model has no V-MoE layers")
    return max(m.num_experts / m.k for _, m in layers)
