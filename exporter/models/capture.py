"""Collect the routing decisions of every V-MoE layer during one forward pass.

A context variable rather than module state, so that the same code path runs in eager PyTorch and
under torch.export (which executes the Python of a non-strict trace) and nothing leaks between calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

from exporter.routing import TopKRouting

_ACTIVE: ContextVar[list | None] = ContextVar("moe_export_routing", default=None)


def record(layer: nn.Module, routing: TopKRouting) -> None:
    """Called by a V-MoE layer with its routing; a no-op outside ``capture_routing``."""
    records = _ACTIVE.get()
    if records is not None:
        records.append((layer, routing))


@contextmanager
def capture_routing() -> Iterator[list[tuple[nn.Module, TopKRouting]]]:
    """``with capture_routing() as records: model(x)`` fills ``records`` with (layer, routing)."""
    records: list = []
    token = _ACTIVE.set(records)
    try:
        yield records
    finally:
        _ACTIVE.reset(token)


def layer_names(model: nn.Module, records) -> list[str]:
    """Qualified module names of the recorded layers, in call order."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names.get(id(layer), f"moe{i}") for i, (layer, _) in enumerate(records)]
