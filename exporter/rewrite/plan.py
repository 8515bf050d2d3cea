"""What the rewrite decides per MoE layer: the plugin nodes that replace it, or why it is left alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_graphsurgeon as gs

from plugins import registry


@dataclass
class PluginNode:
    plugin: str
    attrs: dict

    def describe(self) -> str:
        """``Name(attr=value, ...)``, leaving out the attributes at their spec's default."""
        defaults = {a.name: a.default for a in registry.spec(self.plugin).attributes}
        args = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.attrs.items() if defaults.get(k) != v
        )
        return f"{self.plugin}({args})" if args else self.plugin


@dataclass
class LayerPlan:
    """One MoE layer the rewrite replaces (``nodes``) or declines (``reason``)."""

    layer: str
    family: str
    nodes: list[PluginNode] = field(default_factory=list)
    reason: str | None = None
    apply: Callable[[gs.Graph], None] | None = field(default=None, repr=False)
    semantics: str | None = None  # what the layer computes, as the check found it (top-k layers)
    notes: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        out = dict(layer=self.layer, family=self.family, replaced=self.replaced)
        if self.replaced:
            out["plugins"] = [
                dict(plugin=n.plugin, role=registry.spec(n.plugin).role, attrs=n.attrs) for n in self.nodes
            ]
            if self.semantics:
                out["semantics"] = self.semantics
        else:
            out["reason"] = self.reason
        if self.notes:
            out["notes"] = self.notes
        return out


@dataclass
class RewriteResult:
    source: Path
    path: Path | None
    layers: list[LayerPlan]
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Replacements per plugin kind."""
        counts = dict.fromkeys(registry.specs(), 0)
        for layer in self.layers:
            for node in layer.nodes if layer.replaced else []:
                counts[node.plugin] += 1
        return {p: n for p, n in counts.items() if n}

    @property
    def declined(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if not layer.replaced]

    def to_dict(self) -> dict:
        return dict(
            source=str(self.source),
            path=str(self.path) if self.path else None,
            seconds=round(self.seconds, 3),
            counts=self.counts,
            layers=[layer.to_dict() for layer in self.layers],
            op_counts=self.op_counts,
        )


class Decline(Exception):
    """A candidate layer that does not meet a precondition; the message is the reason."""
