"""Output shapes and types of ``moe::SoftRoute`` (see ``plugins/topk_route/shapes.py`` for the
expressions these functions take)."""

from __future__ import annotations


def output_dtypes(dtypes) -> tuple[str, ...]:
    """Dispatch and combine weights, float32 as the logits."""
    return ("float32", "float32")


def output_shapes(shapes, *, smax=max, smin=min) -> tuple[tuple, ...]:
    """Dispatch and combine weights ``[B, m, S]``, the logits' shape."""
    return (tuple(shapes[0]), tuple(shapes[0]))
