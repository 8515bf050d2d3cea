"""The one place for defaults and tolerances.

CLI options and library keyword arguments default to these constants; nothing else restates them.
The plugin package (``plugins/``, shipped alone in bundles) keeps its own contract beside its code:
the ``moe`` namespace (``plugins/spec.py``), the PTX ISA each target is compiled for
(``plugins/aot.py``, part of the precompiled kernels' lookup key on the target) and the opset its
local functions are written in (``plugins/onnx_function.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class _Name(str, Enum):
    """An enum whose members are their strings and print as them (``enum.StrEnum``, which Python 3.10,
    JetPack 6's, lacks)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Precision(_Name):
    """A graph's precision (and so its strongly typed engine's): FP32; FP16/BF16 with the routing in FP32
    (exporter/export/precision.py); INT8/FP8 Q/DQ, calibrated; INT8/INT4 expert weights only
    (exporter/export/quantize.py). A member is its string ("fp32"): JSON, metadata and comparisons with
    the strings a user gives are unchanged."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"
    W8 = "w8"
    W4 = "w4"


class RoutingPrecision(_Name):
    """Where a reduced graph computes its routing: pinned to FP32 (the default), or reduced too (to
    measure what pinning buys)."""

    FP32 = "fp32"
    REDUCED = "reduced"


# --- ONNX export -------------------------------------------------------------------------------
# NOTE: opset 18 keeps the graph parseable by TensorRT 10.3 (JetPack 6), whose parser predates the
# opset-20 Gelu op; LayerNormalization (opset 17) is still used, which TensorRT maps to
# INormalizationLayer.
DEFAULT_OPSET = 18
MIN_OPSET = 18
MAX_OPSET = 23  # the newest opset torch.onnx and onnx.checker both take (onnx 1.18+)
EXPORT_EXAMPLE_GROUPS = 2  # routing groups (or images) in the tracing example: 1 would let torch.export fix the batch
EXPORT_EXAMPLE_SEED = 0  # seed of the tracing example's random images

# --- Routing (V-MoE reference: vmoe/moe.py) -----------------------------------------------------
DEFAULT_GROUP_IMAGES = 8  # every paper config routes groups of 8 images
DEFAULT_CAPACITY_CEIL_OR_ROUND = "ceil"
DEFAULT_CAPACITY_MULTIPLE_OF = 4
LAYERNORM_EPS = 1e-6  # flax.linen.LayerNorm default (PyTorch's default is 1e-5)
SOFT_MOE_NORM_EPS = 1e-6  # inside the rsqrt of the reference's l2 normalisation

# --- Input and size limits: refused up front, naming the tensor that would be too large -------------
MAX_IMAGE_PIXELS = 4096 * 4096  # per image, H*W of --input-shape and of an --image file
MAX_INPUT_BYTES = 4 * 2**30  # one batch of FP32 input images (export example, validate, bench, samples)
MAX_EXPERT_BUFFER_BYTES = 4 * 2**30  # V-MoE: FP32 expert activations [E, capacity, mlp_dim] of one routing group

# --- Parity -------------------------------------------------------------------------------------
DEFAULT_SEED = 0
DEFAULT_VALIDATE_BATCH_GROUPS = 1  # V-MoE: routing groups per validation batch
DEFAULT_VALIDATE_BATCH_IMAGES = 2  # Soft-MoE and models without routing groups
# The rewrite's check by value: float tensors within this of the reference's scale, per graph precision
# (about four units of the type's rounding: a k-term dot product rounded once to FP16/BF16).
# Quantized graphs keep FP32 routing and FP32 tensors between the Q/DQ pairs: a value that a plugin computes
# a rounding error apart can land one quantization step away (INT8: 1/127 of the tensor's scale; FP8: 1/16).
REWRITE_CHECK_RTOL = {
    Precision.FP32: 1e-4,
    Precision.FP16: 4e-3,
    Precision.BF16: 3e-2,
    Precision.INT8: 2e-2,
    Precision.FP8: 7e-2,
    Precision.W8: 1e-4,
    Precision.W4: 1e-4,
}
# Export's own check of the written graph (an FP16/BF16 graph: of its FP32 trace) against PyTorch, at the
# traced batch and a second one: ten times the FP32 parity tolerance (bfloat16 dispatch rounds inside the
# layers: 3.4e-4 measured), far below what a size fixed at the traced batch does (0.18 to 0.25 measured
# on hand-written layers).
EXPORT_CHECK_RTOL = 1e-3


# --- Seeing the routing (inspect routing, sweep capacity) -----------------------------------------
DIGITS_TEST_IMAGES = 448  # scikit-learn digits test split: 1797 - 448 = 1349 training images
DIGITS_SPLIT_SEED = 0
INSPECT_CAPACITY_FACTORS = (0.5, 1.0, 2.0)  # columns of the V-MoE picture, each vanilla and BPR
INSPECT_GROUP_IMAGES = 1  # the pictured image is routed alone: a group of one image
INSPECT_SLOTS = 4  # Soft-MoE: slots pictured per layer (those with the most concentrated dispatch)
SWEEP_CAPACITY_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
SWEEP_CHUNK_IMAGES = 64  # images per forward pass of the sweep (rounded down to whole routing groups)
FIGURE_DPI = 100


# --- Benchmark (moe-export bench) ---------------------------------------------------------------
BENCH_WARMUP = 2  # untimed runs per backend before the timed ones
BENCH_RUNS = 10  # timed runs per backend: median and p90 (nearest rank) over these
BENCH_BATCH_GROUPS = 1  # V-MoE: routing groups per benchmark batch
BENCH_BATCH_IMAGES = 8  # Soft-MoE and models without routing groups
BENCH_RTX_TARGET = 89  # the TensorRT for RTX engine bench builds where no RTX GPU is here (GeForce RTX 40)
BENCH_BUSY_NOTE = 0.1  # a row notes a busy machine when other processes took this share of the CPUs while it ran

# --- Demo (moe-export demo) ----------------------------------------------------------------------
DEMO_OUTPUT_DIR = "moe-export-demo"
# (zoo model, routing overrides): a V-MoE that drops tokens (BPR, C=0.5) and a Soft-MoE
DEMO_RUNS = (("vmoe-tiny", {"capacity_factor": 0.5, "batch_priority": True}), ("soft-moe-tiny", {}))


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


# Per precision. Reduced precision keeps the router and routing math in FP32; the tokens around it are
# not, so an expert choice can flip where two gates are within the error: a small shortfall is allowed.
TOLERANCES = {
    Precision.FP32: Tolerances(rtol=1e-4, routing_agreement=1.0),
    Precision.FP16: Tolerances(rtol=5e-2, routing_agreement=0.99),
    Precision.BF16: Tolerances(rtol=1e-1, routing_agreement=0.98),
    # Quantized graphs (exporter/export/quantize.py): the routing is FP32, but its inputs carry the
    # quantization noise of everything upstream, and near-tied gates flip (each flip explained by its gates,
    # or it fails). The shares are below the worst measured (README, "INT8, FP8 and weight-only"): INT8 on
    # the trained digits V-MoE (4 experts, 32 wide) agrees on 84-88% of decisions, the seeded vmoe-tiny at
    # C = 0.5 with priorities on 80%, the seeded S/32 on 92%.
    Precision.INT8: Tolerances(rtol=3.5e-1, routing_agreement=0.75),
    Precision.FP8: Tolerances(rtol=3.5e-1, routing_agreement=0.75),
    Precision.W8: Tolerances(rtol=5e-2, routing_agreement=0.99),
    Precision.W4: Tolerances(rtol=3e-1, routing_agreement=0.9),
}
FP32_TOLERANCES = TOLERANCES[Precision.FP32]


# --- Triton Inference Server (exporter/deploy/triton_repo.py) --------------------------------------------
TRITON_MAX_QUEUE_DELAY_US = 100  # dynamic batcher: longest wait for more requests to fill a batch
TRITON_PREFERRED_BATCHES = 2  # default preferred batch sizes: max_batch and its halvings, this many (32 -> 16, 32)


# --- TensorRT engines and deploy bundles -----------------------------------------------------------
MIN_TENSORRT = (10, 9)  # tensorrt.plugin with aot_impl: engines that run without Python
# of a graph (export --precision), and so of its strongly typed engine: FP32, FP16/BF16 with the routing in
# FP32, INT8/FP8 Q/DQ (calibrated), INT8/INT4 expert weights only (exporter/export/quantize.py)
PRECISIONS = tuple(p.value for p in Precision)  # the strings (click's choices)
REDUCED_PRECISIONS = (Precision.FP16, Precision.BF16)  # the whole graph in a float type
QUANTIZED_PRECISIONS = (Precision.INT8, Precision.FP8)  # Q/DQ on weights and activations, calibrated
WEIGHT_ONLY_PRECISIONS = (Precision.W8, Precision.W4)  # expert weights stored quantized, dequantized before use
QUANTIZED_OPSET = 21  # FP8 Q/DQ (opset 19) and INT4 blocks (opset 21): fp8 and w4 graphs are written at 21
W4_BLOCK = 64  # w4: one scale per block of this many weights along the contracted axis
# Calibration (--calibration FILE.npz|DIR): images per ONNX Runtime run, the image files a folder may hold,
# and the fewest tokens an expert should see to calibrate (fewer: a warning naming it)
CALIBRATION_CHUNK_IMAGES = 64
CALIBRATION_SUFFIXES = (".png", ".jpg", ".jpeg")
CALIBRATION_MIN_EXPERT_TOKENS = 64
# without --calibration: seeded N(0, 1) images, as validate's inputs, this many routing groups (or images)
CALIBRATION_DEFAULT_GROUPS = 4
CALIBRATION_DEFAULT_IMAGES = 32
# TensorRT for RTX's targets with FP8 (Ada sm_89 and later); the others refuse an FP8 graph
FP8_MIN_TARGET = 89
ROUTING_PRECISIONS = tuple(r.value for r in RoutingPrecision)  # the strings (click's choices)
DEFAULT_PRECISION = Precision.FP32
# Jetson Orin (sm_87), Hopper H100/H200 (sm_90) and Jetson Thor (sm_110, PTX ISA 9.0; where the
# installed Triton can compile it: >= 3.9, see plugins.aot.MIN_TRITON)
DEFAULT_PTX_TARGETS = (87, 90, 110)
BUNDLE_SAMPLE_BATCHES = 1  # routing groups (V-MoE) or DEFAULT_VALIDATE_BATCH_IMAGES images in the sample inputs


# --- Reference checkpoints (google-research/vmoe) -------------------------------------------------
# The inputs every moe-export model takes, as the reference's input pipelines end (value_range(-1, 1));
# recorded in graphs, bundles and imported model folders, and applied wherever an image file is read.
PREPROCESSING = "RGB images, NCHW float32 in [-1, 1]: pixel / 127.5 - 1 (the reference takes the same values NHWC)"
REFERENCE_NORMALIZATION = ((0.5,), (0.5,))  # the same as per-channel (mean, std) from [0, 1] pixels
REFERENCE_K = 2  # num_selected_experts in every released config
REFERENCE_CAPACITY_FACTOR = 1.05  # training (and in-domain eval) capacity of the paper configs


def default_batch(batch_multiple: int, purpose: str = "validate") -> int:
    """Images per run when none is given: whole routing groups for V-MoE (``batch_multiple`` > 1),
    else a fixed number of images; ``purpose`` is ``"validate"`` (also the rewrite's probe),
    ``"bench"`` or ``"bundle"`` (the sample inputs)."""
    groups, images = {
        "validate": (DEFAULT_VALIDATE_BATCH_GROUPS, DEFAULT_VALIDATE_BATCH_IMAGES),
        "bench": (BENCH_BATCH_GROUPS, BENCH_BATCH_IMAGES),
        "bundle": (BUNDLE_SAMPLE_BATCHES, DEFAULT_VALIDATE_BATCH_IMAGES),
    }[purpose]
    return batch_multiple * groups if batch_multiple > 1 else images


# --- Trust boundaries: what a graph, bundle, checkpoint or input file someone hands over may hold ------
# Each is read as data, checked against these bounds before anything is allocated (README: Trust).
MAX_NAME_CHARS = 4096  # a layer or model name, or a file path, recorded in a graph's metadata or a bundle manifest
MAX_CHANNELS = 64  # of the images a recorded model takes (3 for RGB)
MAX_MODEL_PARAMETERS = 16 * 10**9  # a recorded or imported config (the largest zoo model: 3.7e9)
MAX_MANIFEST_BYTES = 16 * 2**20  # a bundle's manifest.json (a few KiB when moe-export writes it)
MAX_CHECKPOINT_DEPTH = 32  # nesting of a vmoe index tree (about 6 in the released checkpoints)
MAX_CHECKPOINT_LEAVES = 100_000  # arrays in one checkpoint (about 200 in a B/16)
MAX_CHECKPOINT_SHARDS = 100_000  # data files of one checkpoint
MAX_CHECKPOINT_CHUNKS = 4096  # chunks one array is split into (one per device holding a part)
MAX_TENSOR_DIMS = 8  # dimensions of one checkpoint array
MAX_NPZ_MEMBERS = 256  # arrays in one .npz (inputs: one; a bundle's reference outputs: 1 + 3 per V-MoE layer)
# SOURCE_DATE_EPOCH (reproducible-builds.org) sets a bundle's "created" time, so that two builds of one
# model from two checkouts are byte-identical; otherwise it is the build's time, named in the manifest.
REPRODUCIBLE_TIME_ENV = "SOURCE_DATE_EPOCH"

# --- TensorRT for RTX (exporter/backends/tensorrt_rtx.py) ------------------------------------------------
# A build is refused up front when it would need more memory than the machine has available: about this
# many times the graph's bytes (weights) plus a base, from the peak RSS benchmarks/rtx_builds.py measures.
RTX_BUILD_MEMORY_FACTOR = 3
RTX_BUILD_MEMORY_BASE = 1 << 30

# --- Swin-MoE (microsoft/Swin-Transformer with microsoft/tutel) --------------------------------------
# Swin's eval transform: resize, ToTensor, Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWIN_MOE_PREPROCESSING = (
    "RGB images, NCHW float32, ImageNet-normalised: (pixel / 255 - mean) / std with mean (0.485, 0.456, 0.406), "
    "std (0.229, 0.224, 0.225) (Swin-Transformer's eval transform)"
)
