"""The rewrite's rules: each finds one family of MoE layer in any graph, whoever wrote it, checks what
it computes by value, and replaces its routing, dispatch and combine with plugin nodes.

A rule is one file, in the shape of the onnxscript rewriter's rules: ``find`` returns the candidate
layers of a graph (and the layers it recognised but must decline, with the reason); a candidate's
``names`` are the tensors the probe exposes, its ``check`` reads their values (``Probe``, at as many
batches as it needs) and returns the layer's plan with the rewrite to apply. The family a rule
carries (``"vmoe"`` for top-k layers, ``"soft_moe"``) names the layer's kind in reports. The next
author's layer is one new file here and one line in ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from exporter.rewrite.plan import LayerPlan
from exporter.settings import Precision


@dataclass
class GraphContext:
    """What a rule reads: the graph, each node's module path (torch.onnx's scopes), and moe-export's
    own records where the graph has them (a fast path: every layer is still checked by value)."""

    graph: gs.Graph
    paths: dict[str, list[str]]  # node name -> ["blocks.1", "blocks.1.mlp", ...]
    recorded: dict[str, dict] = field(default_factory=dict)  # moe-export's V-MoE settings, by layer
    precision: Precision = Precision.FP32  # the graph's (a BF16 graph runs emulated: its BF16 tensors can be read)

    def path(self, node: gs.Node) -> list[str]:
        return self.paths.get(node.name, [])

    def readable(self, t: gs.Tensor) -> bool:
        """Whether the probe can read the tensor: NumPy has no bfloat16, so in a graph that is not BF16
        (and so not emulated) a BF16 tensor (bfloat16 dispatch's rounding) cannot be exposed."""
        import onnx

        return t.dtype != onnx.TensorProto.BFLOAT16 or self.precision == Precision.BF16


class Probe(Protocol):
    """The values of the exposed tensors at a batch of images (one ONNX Runtime run each, cached)."""

    batches: list[int]  # batches the graph accepts, in the order checks use them (the default first)
    multiple: int  # every batch is a multiple of this (V-MoE routing groups of moe-export's own graphs)

    def at(self, batch: int) -> dict[str, np.ndarray]: ...


class Candidate(Protocol):
    layer: str
    family: str

    def names(self) -> set[str]: ...

    def check(self, probe: Probe, rtol: float) -> tuple[LayerPlan, Callable[[gs.Graph], None]]: ...


class Rule(Protocol):
    family: str

    def find(self, ctx: GraphContext) -> tuple[list[Candidate], list[LayerPlan]]: ...


def rules() -> tuple[Rule, ...]:
    """Every rule, in the order the rewrite runs them."""
    from exporter.rewrite.rules.soft_moe import SoftMoERule
    from exporter.rewrite.rules.topk import TopKRule

    return (TopKRule(), SoftMoERule())
