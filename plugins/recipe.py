"""How a plugin's Triton kernel is compiled and launched, shared by the torch launcher, the AOT
implementation that TensorRT calls and the tests (no torch, triton or tensorrt here).

A recipe's sizes may be Python ints (a concrete launch) or TensorRT ``ShapeExpr``s (an AOT plan);
the expressions only use ``+``, ``-``, ``*`` and ``//`` with the symbolic operand on the left, which
both support.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["KernelRecipe", "cdiv", "next_pow2", "require_static", "static_dim"]

#: Triton pointer types of the tensor dtypes the kernels take (the plugins' token tensors: float32,
#: float16 and bfloat16).
POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32"}


def cdiv(a, b: int):
    """``ceil(a / b)`` for an int or a ShapeExpr ``a`` and an int ``b``."""
    return (a + (b - 1)) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def static_dim(dim) -> int | None:
    """A dimension's build-time value: the int itself, a constant ShapeExpr's value, else None."""
    if isinstance(dim, int):
        return dim
    if getattr(dim, "is_fake", False) or not getattr(dim, "is_constant", False):
        return None
    return int(dim.constant_value())


def require_static(dim, what: str) -> int:
    """A build-time dimension's value, or a ValueError naming ``what``."""
    value = static_dim(dim)
    if value is None:
        raise ValueError(f"{what} must be static (a build-time constant) for the AOT kernel")
    return value


@dataclass(frozen=True)
class KernelRecipe:
    """One kernel launch: parameters in order (tensor inputs, int32 scalars, tensor outputs), the
    constexprs, the grid, the warps per program (block = ``num_warps * 32`` threads) and the software
    pipeline depth (kept low: every kernel stays under 48 KiB of shared memory, the limit without opt-in).

    ``inputs``/``outputs`` pair each pointer parameter with its dtype name; ``scalars`` pair each
    int32 parameter with its value (int or ShapeExpr).
    """

    kernel: str
    inputs: tuple[tuple[str, str], ...]
    scalars: tuple[tuple[str, Any], ...]
    outputs: tuple[tuple[str, str], ...]
    constexprs: dict[str, int] = field(default_factory=dict)
    grid: tuple[Any, Any, Any] = (1, 1, 1)
    num_warps: int = 4
    num_stages: int = 2

    @property
    def signature(self) -> dict[str, str]:
        """Triton ``ASTSource`` signature, in the kernel's parameter order."""
        sig = {name: POINTER[dtype] for name, dtype in self.inputs}
        sig.update({name: "i32" for name, _ in self.scalars})
        sig.update({name: POINTER[dtype] for name, dtype in self.outputs})
        sig.update({name: "constexpr" for name in self.constexprs})
        return sig

    @property
    def scalar_values(self) -> tuple:
        return tuple(value for _, value in self.scalars)

    @property
    def block(self) -> int:
        return self.num_warps * 32

    def key(self) -> str:
        """A stable name for this compiled variant (kernel, pointer types, constexprs, warps)."""
        sig = ",".join(f"{n}:{t}" for n, t in self.signature.items() if t != "constexpr")
        const = ",".join(f"{n}={v}" for n, v in sorted(self.constexprs.items()))
        return f"{self.kernel}[{sig}][{const}][w{self.num_warps}s{self.num_stages}]"
