"""Output shape and type of ``moe::SoftCombine`` (see ``plugins/topk_route/shapes.py`` for the
expressions these functions take)."""

from __future__ import annotations


def output_dtypes(dtypes, num_experts: int, expert_major: int) -> tuple[str, ...]:
    """The tokens in the slot outputs' dtype."""
    return (dtypes[0],)


def output_shapes(shapes, num_experts: int, expert_major: int, *, smax=max, smin=min) -> tuple[tuple, ...]:
    """Tokens ``[B, m, D]`` from slot outputs (``[n, B*p, D]`` or ``[B, S, D]``) and combine ``[B, m, S]``."""
    images, tokens, _ = shapes[1]
    return ((images, tokens, shapes[0][2]),)
