"""How many buffer slots an expert has per routing group: a fixed number, or a rule of the group's size.

MoE layers written by different authors size their expert buffers differently, and when the routing
group is the whole batch the capacity follows the batch at run time. One rule covers them, in
integer arithmetic (so that TensorRT can evaluate it as a shape expression):

    base = ceil(S / pre)                          # tutel: ceil(S / E); everyone else: pre = 1
    c    = ceil(base * num / den)  or  floor(...)  # the capacity factor as an exact fraction
    c    = ceil(c * mul / align) * align           # tutel multiplies by k; vmoe pads to 4
    c    = min(c, S) if clamp                      # GShard / lucidrains: never more than S
    c    = max(c, minimum)                         # a floor (>= 1)

For example vmoe's ``ceil(k*S*cf/E)`` padded to 4 is ``num/den = k*cf/E``, ``ceil``, ``align=4``;
lucidrains' ``max(min(S, int(S*cf/E)), 4)`` is ``num/den = cf/E``, ``floor``, ``clamp``, ``minimum=4``;
DeepSpeed's ``max(ceil(S/E*cf*k), min_capacity)`` is ``num/den = cf*k/E``, ``ceil``, ``minimum``.

No torch, triton or tensorrt here: the kernels' recipes, the reference, the ONNX function and the
TensorRT shape expressions all evaluate the same :func:`capacity`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

#: The rule's attributes on a ``TopKRoute`` node, with the values that make it the identity (``c = S``).
RULE_DEFAULTS: dict[str, int] = {
    "cap_num": 1,
    "cap_den": 1,
    "cap_ceil": 1,
    "cap_pre": 1,
    "cap_mul": 1,
    "cap_align": 1,
    "cap_min": 1,
    "cap_clamp": 0,
}


def check_rule(attrs: Mapping[str, int]) -> None:
    """A ValueError naming the first attribute outside its range."""
    for name, low in (("cap_num", 1), ("cap_den", 1), ("cap_pre", 1), ("cap_mul", 1), ("cap_align", 1)):
        if int(attrs.get(name, RULE_DEFAULTS[name])) < low:
            raise ValueError(f"{name} must be >= {low}, got {attrs.get(name)}")
    if int(attrs.get("cap_min", 1)) < 1:
        raise ValueError(f"cap_min must be >= 1 (a capacity of at least one slot), got {attrs.get('cap_min')}")


def capacity(tokens, attrs: Mapping[str, int], *, smax: Callable = max, smin: Callable = min):
    """Slots per expert for a group of ``tokens`` (an int, or a symbolic dimension).

    ``attrs`` are a ``TopKRoute`` node's attributes: ``capacity`` > 0 is a fixed capacity; 0 means the
    rule. ``smax``/``smin`` are the maximum and minimum of the dimension type (TensorRT's shape
    expressions have their own); the rest is ``+``, ``*`` and ``//`` with the symbolic operand first.
    """
    fixed = int(attrs.get("capacity", 0))
    if fixed > 0:
        return fixed
    rule = {name: int(attrs.get(name, default)) for name, default in RULE_DEFAULTS.items()}
    check_rule(rule)
    base = tokens if rule["cap_pre"] == 1 else (tokens + (rule["cap_pre"] - 1)) // rule["cap_pre"]
    scaled = base * rule["cap_num"]
    c = (scaled + (rule["cap_den"] - 1)) // rule["cap_den"] if rule["cap_ceil"] else scaled // rule["cap_den"]
    return finish(c, tokens, rule, smax=smax, smin=smin)


def finish(c, tokens, rule: Mapping[str, int], *, smax: Callable = max, smin: Callable = min):
    """The rule's steps after the capacity factor: ``c`` (``ceil`` or ``floor`` of ``base*num/den``)
    multiplied, aligned, clamped to the group's ``tokens`` and floored at the minimum."""
    mul, align = int(rule.get("cap_mul", 1)), int(rule.get("cap_align", 1))
    if mul != 1:
        c = c * mul
    if align != 1:
        c = (c + (align - 1)) // align * align
    if int(rule.get("cap_clamp", 0)):
        c = smin(c, tokens)
    return smax(c, int(rule.get("cap_min", 1)))


def describe(attrs: Mapping[str, int]) -> str:
    """The capacity of a node's attributes in words, e.g. ``max(4, min(S, floor(S*5/16)))``."""
    fixed = int(attrs.get("capacity", 0))
    if fixed > 0:
        return str(fixed)
    r = {name: int(attrs.get(name, default)) for name, default in RULE_DEFAULTS.items()}
    base = "S" if r["cap_pre"] == 1 else f"ceil(S/{r['cap_pre']})"
    frac = base if r["cap_num"] == r["cap_den"] == 1 else f"{base}*{r['cap_num']}/{r['cap_den']}"
    text = frac if r["cap_den"] == 1 else f"{'ceil' if r['cap_ceil'] else 'floor'}({frac})"
    if r["cap_mul"] != 1:
        text = f"{r['cap_mul']}*{text}"
    if r["cap_align"] != 1:
        text = f"align{r['cap_align']}({text})"
    if r["cap_clamp"]:
        text = f"min(S, {text})"
    return text if r["cap_min"] == 1 else f"max({r['cap_min']}, {text})"
