"""Declarative description of a plugin: its inputs, outputs and attributes (no torch, no TensorRT)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NAMESPACE", "AttrSpec", "PluginSpec", "TensorSpec"]

NAMESPACE = "moe"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, the dtypes it may have, and its shape in symbols (``"[G, S, E]"``)."""

    name: str
    dtypes: tuple[str, ...]
    shape: str
    doc: str = ""


@dataclass(frozen=True)
class AttrSpec:
    """One attribute; ``type`` is ``"int"``, ``"float"`` or ``"str"`` (what the ONNX parser can pass on).
    ``default``: the value a node without it means (None: the attribute is required)."""

    name: str
    type: str
    doc: str = ""
    default: object = None

    def __post_init__(self):
        if self.type not in ("int", "float", "str"):
            raise ValueError(f"attribute {self.name}: type must be int, float or str, got {self.type!r}")


@dataclass(frozen=True)
class PluginSpec:
    """The contract of one plugin node: ``op_type`` = ``name``, ``plugin_namespace`` = ``namespace``."""

    name: str
    namespace: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...] = ()
    doc: str = ""
    role: str = ""  # its part of an MoE layer, as reports name it: "routing", "dispatch" or "combine"

    @property
    def id(self) -> str:
        return f"{self.namespace}::{self.name}"

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def attribute_values(self, attrs) -> dict:
        """Every attribute's value from a node's ``attrs`` (a mapping), defaults filled in; a KeyError
        names a required attribute the node lacks."""
        values = {}
        for a in self.attributes:
            if a.name in attrs:
                values[a.name] = attrs[a.name]
            elif a.default is not None:
                values[a.name] = a.default
            else:
                raise KeyError(f"{self.id} node lacks its attribute {a.name!r}")
        return values
