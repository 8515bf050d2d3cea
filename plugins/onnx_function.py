"""A small builder for the model-local ONNX functions that carry each plugin's standard-op decomposition.

Every plugin node in a rewritten graph has a FunctionProto of the same name and domain beside it, so
ONNX Runtime runs the rewritten graph natively and TensorRT without the plugins registered still
builds it (it inlines the function; with the plugin registered, the ``plugin_namespace`` attribute
makes TensorRT >= 10.16 prefer the plugin). Attributes reach the body as attribute references.
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from plugins.spec import NAMESPACE

DOMAIN = NAMESPACE
OPSET = 18  # the standard opset the function bodies are written in; the rewrite stamps the graph's own (>= this)
# Attributes every plugin node carries for TensorRT's ONNX parser; declared on the function too, with
# defaults, so that checkers and runtimes see a complete signature.
PARSER_ATTRIBUTES = {"plugin_namespace": DOMAIN, "aot": 1}


class FunctionBuilder:
    """Collects nodes of one FunctionProto; ``op`` returns the output name(s) of the node it adds."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str], attributes: dict[str, object]):
        self.name, self.inputs, self.outputs, self.attributes = name, inputs, outputs, attributes
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"_{hint.lower()}{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def ints(self, values: list[int]) -> str:
        """A 1-D int64 constant."""
        return self.op("Constant", value_ints=list(values))

    def scalar(self, value: int | float) -> str:
        if isinstance(value, float):
            return self.op("Constant", value_float=value)
        return self.op("Constant", value_int=value)

    def attr_int(self, attribute: str) -> str:
        """A scalar int64 tensor holding the value of one of the function's int attributes."""
        out = self._fresh(attribute)
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(AttributeProto(name="value_int", ref_attr_name=attribute, type=AttributeProto.INT))
        self.nodes.append(node)
        return out

    def attr_float(self, attribute: str) -> str:
        """A scalar float32 tensor holding the value of one of the function's float attributes."""
        out = self._fresh(attribute)
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(AttributeProto(name="value_float", ref_attr_name=attribute, type=AttributeProto.FLOAT))
        self.nodes.append(node)
        return out

    def dim(self, tensor: str, axis: int) -> str:
        """A scalar int64: ``tensor.shape[axis]``."""
        return self.op("Squeeze", self.op("Shape", tensor, start=axis, end=axis + 1), self.ints([0]))

    def shape(self, *dims: str) -> str:
        """A 1-D shape tensor from scalar int64 dims (or 1-D int64 constants)."""
        return self.op("Concat", *[self.op("Reshape", d, self.ints([1])) for d in dims], axis=0)

    def build(self) -> onnx.FunctionProto:
        defaults = [helper.make_attribute(k, v) for k, v in {**self.attributes, **PARSER_ATTRIBUTES}.items()]
        function = helper.make_function(
            DOMAIN,
            self.name,
            self.inputs,
            self.outputs,
            self.nodes,
            opset_imports=[helper.make_opsetid("", OPSET)],
            attribute_protos=defaults,
        )
        return function


def float_zero_like(b: FunctionBuilder, tensor: str) -> str:
    return b.op("CastLike", b.scalar(0.0), tensor)


INT32, INT64, FLOAT, BOOL = TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT, TensorProto.BOOL

__all__ = [
    "DOMAIN",
    "OPSET",
    "PARSER_ATTRIBUTES",
    "FunctionBuilder",
    "float_zero_like",
    "INT32",
    "INT64",
    "FLOAT",
    "BOOL",
]
