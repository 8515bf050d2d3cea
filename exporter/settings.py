"""The one place for defaults and tolerances.

CLI options and library keyword arguments default to these constants; nothing else restates them.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- ONNX export -------------------------------------------------------------------------------
# NOTE: opset 18 keeps the graph parseable by TensorRT 10.3 (JetPack 6), whose parser predates the
# opset-20 Gelu op; LayerNormalization (opset 17) is still used, which TensorRT maps to
# INormalizationLayer.
DEFAULT_OPSET = 18
MIN_OPSET = 18

# --- Routing (V-MoE reference: vmoe/moe.py) -----------------------------------------------------
DEFAULT_GROUP_IMAGES = 8  # every paper config routes groups of 8 images
DEFAULT_CAPACITY_CEIL_OR_ROUND = "ceil"
DEFAULT_CAPACITY_MULTIPLE_OF = 4
LAYERNORM_EPS = 1e-6  # flax.linen.LayerNorm default (PyTorch's default is 1e-5)
SOFT_MOE_NORM_EPS = 1e-6  # inside the rsqrt of the reference's l2 normalisation

# --- Parity -------------------------------------------------------------------------------------
DEFAULT_SEED = 0
DEFAULT_VALIDATE_BATCH_GROUPS = 1  # V-MoE: routing groups per validation batch
DEFAULT_VALIDATE_BATCH_IMAGES = 2  # Soft-MoE and models without routing groups


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria of a parity check.

    Attributes:
        rtol: Largest allowed ``max|actual - expected| / max|expected|`` per output (the error
            relative to the output's own scale, robust to elements near zero).
        routing_agreement: Smallest allowed share of (token, choice) pairs whose expert, kept/dropped
            decision and buffer slot all agree, per V-MoE layer.
    """

    rtol: float
    routing_agreement: float


FP32_TOLERANCES = Tolerances(rtol=1e-4, routing_agreement=1.0)
TOLERANCES = {"fp32": FP32_TOLERANCES}
