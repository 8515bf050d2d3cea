"""Top-k routing exactly as tutel (microsoft/tutel) computes it for Swin-MoE, with static shapes.

From ``tutel/impls/moe_layer.py`` (``MOELayer.forward``) and ``tutel/impls/fast_dispatch.py``
(``extract_critical``, the dispatch and combine kernels) at inference, for the ``N`` tokens of one
call (Swin-MoE calls its MoE layer on the whole batch ``[B, L, D]``, so ``N = B * L`` and the routing
group is the batch):

- **gates**: ``softmax(logits, dim=experts)`` in float32 (the gate is built with ``fp32_gate``); the
  noise ``gate_noise * randn / E`` is added in training only.
- **choices**: ``topk(gates, k)`` (here repeated ArgMax: the first maximum on ties; ``torch.topk`` does
  not document its tie order); ``k = min(k, E)``. The gate of a choice is the gate of its expert.
- **order**: a choice's location in its expert's buffer counts every choice of an earlier pass (all
  first choices go before any second choice) and, within its pass, the choices of the tokens that go
  before it: token order, or with Batch Prioritized Routing (``use_bpr``) descending top-1 gate
  (``argsort(-max gate)``; tutel's argsort is not stable, here ties go to the lower token).
- **capacity**: ``spe = ceil(N / E)``; ``cf > 0``: ``k * int(cf * spe)``; ``cf == 0``: the largest
  entry of ``locations2[-1] + 1`` (tutel's last-pass locations of the last token plus its earlier-pass
  offsets: the busiest expert's load without BPR; under BPR the last token's own location decides it,
  tutel's behaviour kept as is); ``cf < 0``: that, at most ``k * int(-cf * spe)``; then rounded up to a
  multiple of ``alignment`` (tutel's ``sharded_count * a2a_ffn_overlap_degree``: 1 for Swin-MoE on one
  device). A choice is kept when its location is below the capacity; a dropped one contributes zero
  (tutel's kernels skip it) and is not re-routed.
- **combine weights**: the raw gates; with ``normalize_gate`` and ``k > 1`` each gate divided by
  ``max(sum of the token's k gates, float32 eps)``, dropped choices included in the sum.

Everything is static-shaped and portable: no CumSum, no sort, no NonZero. ``int(cf * spe)`` is integer
shape arithmetic (``capacity_ratio``), so an exported graph computes the capacity of whatever batch it
is given; under a dynamic capacity (``cf <= 0``) the expert buffers have their static upper bound and
the capacity is a tensor that decides which locations are kept.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from exporter.errors import UserError
from exporter.models.routing import TopKRouting

# int(cf * x) is checked against the rational (p * x) // q for every x up to this many tokens per expert.
RATIO_CHECK_TOKENS = 1 << 20


@functools.cache
def capacity_ratio(capacity_factor: float) -> tuple[int, int]:
    """``(p, q)`` with ``(p * x) // q == int(abs(cf) * x)`` (Python float arithmetic, as tutel) for every
    ``0 <= x <= RATIO_CHECK_TOKENS``: the capacity rule as integer arithmetic a graph can do on its batch
    size. The simplest such fraction is found from ``cf``'s continued fraction and checked exhaustively.
    Some decimals have none (0.7 is a little below 7/10 in binary, and ``int(0.7 * 90) == 62`` while
    ``int(0.7 * 10) == 7``): those are refused, naming a token count where the float product breaks the rule."""
    cf = abs(float(capacity_factor))
    if not math.isfinite(cf):
        raise UserError(f"capacity factor must be finite, got {capacity_factor}")
    x = np.arange(RATIO_CHECK_TOKENS + 1, dtype=np.int64)
    want = np.trunc(cf * x.astype(np.float64)).astype(np.int64)  # IEEE double products, as Python's
    for limit in (10, 100, 1000, 10_000, 100_000, 1_000_000):
        ratio = Fraction(cf).limit_denominator(limit)
        p, q = ratio.numerator, ratio.denominator
        if p * RATIO_CHECK_TOKENS < 2**62 and np.array_equal((p * x) // q, want):
            return p, q
    ratio = Fraction(cf).limit_denominator(100)
    bad = int(np.argmax((ratio.numerator * x) // ratio.denominator != want))
    raise UserError(
        f"capacity factor {capacity_factor!r}: tutel's int({cf!r} * tokens) in floating point is no fixed fraction "
        f"of the token count (int({cf!r} * {bad}) == {int(cf * bad)}), so a graph cannot compute it from its batch "
        "size; use a binary-exact factor such as 0.75 or 1.25"
    )


def tutel_capacity(num_tokens, num_experts: int, k: int, capacity_factor: float, alignment: int = 1):
    """tutel's static capacity ``k * int(cf * ceil(N / E))`` rounded up to ``alignment``, for ``cf > 0``;
    for ``cf < 0`` the bound ``k * int(-cf * ceil(N / E))`` (unaligned: the dynamic capacity is clipped to
    it before the alignment); for ``cf == 0`` the largest possible load, ``N``. A Python ``num_tokens`` is
    computed as tutel does, in floats; a symbolic one (torch.export) with ``capacity_ratio``'s integers,
    equal for every token count up to ``RATIO_CHECK_TOKENS`` per expert."""
    per_expert = (num_tokens + num_experts - 1) // num_experts
    if capacity_factor == 0:
        return num_tokens
    if isinstance(per_expert, int):
        capacity = k * int(abs(capacity_factor) * per_expert)
    else:
        p, q = capacity_ratio(capacity_factor)
        capacity = k * ((p * per_expert) // q)
    return align(capacity, alignment) if capacity_factor > 0 else capacity


def align(capacity, alignment: int):
    """Rounded up to a multiple of ``alignment`` (``capacity + alignment - remainder`` when it has one)."""
    if alignment <= 1:
        return capacity
    return (capacity + alignment - 1) // alignment * alignment


def buffer_slots(num_tokens, num_experts: int, k: int, capacity_factor: float, alignment: int = 1):
    """Slots per expert the buffers hold: the capacity (``cf > 0``) or its upper bound (``cf <= 0``),
    at least one (tutel cannot run a capacity of 0; here every choice is then dropped)."""
    bound = tutel_capacity(num_tokens, num_experts, k, capacity_factor, alignment)
    if capacity_factor <= 0:
        bound = align(bound, alignment)
    return torch.sym_max(bound, 1) if isinstance(bound, torch.SymInt) else max(bound, 1)


def _top_k(gates: torch.Tensor, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``k`` passes of ArgMax (first maximum) over the experts: indices and gates of each choice."""
    expert_ids = torch.arange(gates.shape[-1], device=gates.device)
    masked, indices, values = gates, [], []
    for _ in range(k):
        index = masked.argmax(dim=-1)
        indices.append(index)
        values.append(gates.gather(-1, index.unsqueeze(-1)).squeeze(-1))
        masked = masked.masked_fill(index.unsqueeze(-1) == expert_ids, float("-inf"))
    return indices, values


def _before(priority: torch.Tensor | None, num_tokens, device) -> torch.Tensor:
    """``[N, N]``: 1 where token ``j`` takes its buffer slot before token ``i`` (row ``i``): token order,
    or descending priority with ties to the lower token."""
    token = torch.arange(num_tokens, device=device)
    earlier = token.unsqueeze(0) < token.unsqueeze(1)
    if priority is None:
        return earlier.float()
    p_i, p_j = priority.unsqueeze(-1), priority.unsqueeze(-2)
    return ((p_j > p_i) | ((p_j == p_i) & earlier)).float()


def route_tutel(
    gates: torch.Tensor,
    *,
    k: int,
    capacity_factor: float,
    batch_priority: bool,
    normalize_gate: bool = False,
    alignment: int = 1,
) -> tuple[TopKRouting, torch.Tensor | int]:
    """tutel's routing of one call's tokens (see the module docstring).

    Args:
        gates: ``[1, N, E]`` float32 softmax gates of the ``N`` tokens routed together.
        k: Experts per token (tutel uses ``min(k, E)``).
        capacity_factor: tutel's ``capacity_factor``: > 0 static, 0 dynamic, < 0 dynamic and bounded.
        batch_priority: Batch Prioritized Routing (``use_bpr``).
        normalize_gate: Divide the k gates of a token by their sum (``normalize_gate``; k > 1 only).
        alignment: The capacity is rounded up to a multiple of this.

    Returns:
        The routing (expert ``[1, N, k]``, slot: the location when kept, else -1; weight: the combine
        weight when kept, else 0) and the capacity: an int, a symbolic size, or (``cf <= 0``) a 0-d
        int64 tensor.
    """
    if gates.ndim != 3 or gates.shape[0] != 1:
        raise UserError(f"gates must be [1, N, E] (one routing group), got {tuple(gates.shape)}")
    if alignment < 1:
        raise UserError(f"alignment must be at least 1, got {alignment}")
    gates = gates.float()
    _, num_tokens, num_experts = gates.shape
    k = min(k, num_experts)
    indices, values = _top_k(gates[0], k)
    passes = _locations(gates, indices, values, batch_priority)
    capacity, bound = _capacity(passes, num_tokens, num_experts, k, capacity_factor, batch_priority, alignment)
    weights = _combine_weights(values, k, normalize_gate)
    location = passes.location.transpose(0, 1).unsqueeze(0)  # [1, N, k]
    kept = location < capacity
    if bound is not None:  # a symbolic bound stays shape arithmetic (a tensor of it would fix the batch size)
        kept = kept & (location < bound)
        if isinstance(bound, int):
            capacity = torch.clamp(capacity, max=bound)
    weight = torch.stack(weights, dim=-1).unsqueeze(0)
    routing = TopKRouting(
        expert=torch.stack(indices, dim=-1).unsqueeze(0),
        slot=torch.where(kept, location, torch.full_like(location, -1)),
        weight=torch.where(kept, weight, torch.zeros_like(weight)),
    )
    return routing, capacity


class _Passes(NamedTuple):
    """The buffer locations of the ``k`` passes of choices, and what the capacity rule reads."""

    choice: torch.Tensor  # [k, N, E]: one-hot expert of each token's choice
    same_pass: torch.Tensor  # [k, N, E]: earlier choices of e in the same pass
    per_pass: torch.Tensor  # [k, 1, E]: choices of e in each pass
    offset: torch.Tensor  # [k, 1, E]: choices of e in the earlier passes
    location: torch.Tensor  # [k, N]: each choice's location in its expert's buffer


def _locations(gates: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor], batch_priority: bool):
    """Each choice's location in its expert's buffer: every choice of an earlier pass goes first, then
    the same pass's choices of the tokens before it (token order, or BPR's descending top-1 gate)."""
    _, num_tokens, num_experts = gates.shape
    k = len(indices)
    expert_ids = torch.arange(num_experts, device=gates.device)
    choice = torch.stack([(i.unsqueeze(-1) == expert_ids) for i in indices]).float()  # [k, N, E]
    before = _before(values[0] if batch_priority else None, num_tokens, gates.device)
    same_pass = torch.matmul(before, choice)  # [k, N, E]: earlier choices of e in the same pass
    per_pass = choice.sum(dim=1, keepdim=True)  # [k, 1, E]
    earlier_passes = [torch.zeros_like(per_pass[0])]
    for c in range(1, k):
        earlier_passes.append(earlier_passes[-1] + per_pass[c - 1])
    offset = torch.stack(earlier_passes)  # [k, 1, E]
    location = ((same_pass + offset) * choice).sum(dim=-1).to(torch.int64)  # [k, N]
    return _Passes(choice, same_pass, per_pass, offset, location)


def _capacity(
    passes: _Passes,
    num_tokens,
    num_experts: int,
    k: int,
    capacity_factor: float,
    batch_priority: bool,
    alignment: int,
):
    """(capacity, bound): tutel's capacity (an int or a symbolic size for ``cf > 0``, else a 0-d tensor)
    and, for ``cf < 0``, the bound the dynamic capacity is clipped to (else None)."""
    bound = None  # cf < 0: the dynamic capacity is clipped to this (aligned, as tutel aligns the clipped value)
    if capacity_factor > 0:
        capacity = tutel_capacity(num_tokens, num_experts, k, capacity_factor, alignment)
    else:  # tutel: locations2[-1] + 1, its largest entry
        if batch_priority:  # only the last token's own location in the last pass counts (BPR's masked cumsum)
            last = (passes.same_pass[k - 1, -1] * passes.choice[k - 1, -1]).sum()
            load = passes.offset[k - 1, 0] + 1 + passes.choice[k - 1, -1] * last
        else:
            load = passes.per_pass.sum(dim=0)[0]
        capacity = align(load.max().to(torch.int64), alignment)
        if capacity_factor < 0:  # align(min(c, b)) == min(align(c), align(b)): compared with each, no tensor
            bound = align(tutel_capacity(num_tokens, num_experts, k, capacity_factor, alignment), alignment)
    return capacity, bound


def _combine_weights(values: list[torch.Tensor], k: int, normalize_gate: bool) -> list[torch.Tensor]:
    """The raw gates; with ``normalize_gate`` and ``k > 1``, each divided by the sum of the token's k
    gates (at least float32 eps)."""
    weights = values
    if normalize_gate and k > 1:
        total = values[0]
        for v in values[1:]:
            total = total + v
        denom = torch.clamp(total, min=torch.finfo(torch.float32).eps)
        weights = [v / denom for v in values]
    return weights


class TutelRouting(nn.Module):
    """Gates ``[1, N, E]`` -> tutel's routing decisions and the buffer slots per expert. No parameters;
    the settings are attributes so that tools can change them (``exporter.models.swin_moe.routing_settings``)."""

    def __init__(
        self, k: int, capacity_factor: float, batch_priority: bool, normalize_gate: bool = False, alignment: int = 1
    ):
        super().__init__()
        self.k, self.capacity_factor, self.batch_priority = k, capacity_factor, batch_priority
        self.normalize_gate, self.alignment = normalize_gate, alignment

    def forward(self, gates: torch.Tensor) -> tuple[TopKRouting, int]:
        routing, _ = route_tutel(
            gates,
            k=self.k,
            capacity_factor=self.capacity_factor,
            batch_priority=self.batch_priority,
            normalize_gate=self.normalize_gate,
            alignment=self.alignment,
        )
        tokens, experts = gates.shape[1], gates.shape[2]
        return routing, buffer_slots(tokens, experts, min(self.k, experts), self.capacity_factor, self.alignment)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, capacity_factor={self.capacity_factor}, bpr={self.batch_priority}, "
            f"normalize_gate={self.normalize_gate}, alignment={self.alignment}"
        )
