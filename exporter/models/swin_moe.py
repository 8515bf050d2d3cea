"""Swin-MoE (microsoft/Swin-Transformer ``models/swin_transformer_moe.py`` with microsoft/tutel's MoE layer)
at inference, exportable: shifted-window attention with the continuous relative position bias (an MLP on
log-spaced coordinates), patch merging, and MoE MLPs routed with tutel's rules (``tutel_routing``).

Module and parameter names follow Swin's, so a checkpoint maps one to one, except inside an MoE MLP
(``<block>.mlp``), which is laid out as moe-export's layers are: ``router`` (tutel's gate), ``routing``,
``dispatch``, ``experts`` (tutel's batched FFN: ``fc1_w [E, M, D]``, ``fc2_w [E, M, D]``), ``combine``.
The derived buffers (relative coordinates and indices, the shifted windows' mask) are computed here and
not stored in the state dict, as Swin's ``load_pretrained`` recomputes them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from exporter import settings
from exporter.errors import UserError
from exporter.models.capture import record
from exporter.models.tutel_routing import TutelRouting, buffer_slots, tutel_capacity
from exporter.models.vmoe import Combine, Dispatch

COSINE_LOGIT_SCALE_MAX = float(torch.log(torch.tensor(1.0 / 0.01)))  # tutel's CosineTopKGate.clamp_max
ATTENTION_MASK = -100.0  # Swin's mask between tokens of different regions of a shifted window


class CosineRouter(nn.Module):
    """tutel's ``CosineTopKGate``: cosine similarity of a projection of the token and each expert's
    embedding, times a learned temperature ``exp(min(t, log 100))``."""

    def __init__(self, dim: int, num_experts: int, proj_dim: int, init_t: float = 0.5):
        super().__init__()
        self.projector = nn.Linear(dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.empty(proj_dim, num_experts))
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        logits = torch.matmul(l2_normalize(self.projector(x), dim=-1), l2_normalize(self.sim_matrix, dim=0))
        return logits * torch.clamp(self.temperature, max=COSINE_LOGIT_SCALE_MAX).exp()


def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize``: ``x / max(||x||, eps)``, written with ReduceSum and Sqrt (ONNX's ReduceL2 is not
    on the portable list)."""
    return x / torch.sqrt((x * x).sum(dim=dim, keepdim=True)).clamp(min=eps)


class TutelExperts(nn.Module):
    """tutel's ``FusedExpertsNetwork`` at inference: ``E`` MLPs ``fc1 -> gelu (erf) -> fc2`` as two batched
    matmuls over ``[E, R, D]``; ``fc2_b`` is absent when fc2 has no bias (``MLP_FC2_BIAS: False``)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, fc2_bias: bool = True):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.fc1_w = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc1_b = nn.Parameter(torch.empty(num_experts, hidden))
        self.fc2_w = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc2_b = nn.Parameter(torch.empty(num_experts, dim)) if fc2_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.matmul(x, self.fc1_w.permute(0, 2, 1)) + self.fc1_b.unsqueeze(1))
        y = torch.matmul(h, self.fc2_w)
        return y if self.fc2_b is None else y + self.fc2_b.unsqueeze(1)


class SwinMoEMlp(nn.Module):
    """An MoE MLP of Swin-MoE: tutel's gate (linear, no bias, or cosine) in float32, tutel's routing over
    every token of the call (``[B, L, D]``: the whole batch is one routing group, so the capacity follows
    the batch size), gather dispatch, batched experts, gather combine.

    Args:
        dim: Token width D.
        hidden: Expert hidden width (``int(D * MLP_RATIO)``).
        num_experts: Global experts E.
        k: ``TOP_VALUE``.
        capacity_factor: ``CAPACITY_FACTOR`` (> 0 static, 0 dynamic, < 0 dynamic and bounded).
        batch_priority: ``USE_BPR``.
        normalize_gate: ``NORMALIZE_GATE``.
        cosine_router: ``COSINE_ROUTER`` (with ``cosine_router_dim`` and ``cosine_router_init_t``).
        fc2_bias: ``MLP_FC2_BIAS``.
        alignment: tutel's capacity alignment (1 on one device).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        *,
        k: int = 1,
        capacity_factor: float = 1.25,
        batch_priority: bool = True,
        normalize_gate: bool = False,
        cosine_router: bool = False,
        cosine_router_dim: int = 256,
        cosine_router_init_t: float = 0.5,
        fc2_bias: bool = True,
        alignment: int = 1,
    ):
        super().__init__()
        if num_experts < 1 or not 1 <= k <= num_experts:
            raise UserError(f"k must be between 1 and the number of experts ({num_experts}), got {k}")
        if not math.isfinite(capacity_factor):
            raise UserError(f"capacity factor must be finite, got {capacity_factor}")
        self.num_experts, self.cosine_router = num_experts, cosine_router
        if cosine_router:
            self.router = CosineRouter(dim, num_experts, cosine_router_dim, cosine_router_init_t)
        else:
            self.router = nn.Linear(dim, num_experts, bias=False)
        self.routing = TutelRouting(k, capacity_factor, batch_priority, normalize_gate, alignment)
        self.dispatch = Dispatch()
        self.experts = TutelExperts(num_experts, dim, hidden, fc2_bias)
        self.combine = Combine()

    @property
    def k(self) -> int:
        return self.routing.k

    @property
    def capacity_factor(self) -> float:
        return self.routing.capacity_factor

    @property
    def batch_priority(self) -> bool:
        return self.routing.batch_priority

    def capacity(self, num_tokens: int) -> int:
        """tutel's capacity for ``num_tokens`` tokens routed together (``cf > 0``), or its upper bound."""
        r = self.routing
        if r.capacity_factor > 0:
            return tutel_capacity(num_tokens, self.num_experts, r.k, r.capacity_factor, r.alignment)
        return buffer_slots(num_tokens, self.num_experts, r.k, r.capacity_factor, r.alignment)

    def _check_buffer(self, num_tokens: int, slots: int) -> None:
        """Refuses a batch whose expert hidden activations ``[E, slots, hidden]`` (FP32) would exceed
        ``settings.MAX_EXPERT_BUFFER_BYTES``, naming the tensor and its size."""
        size = self.num_experts * slots * self.experts.hidden * 4
        if size > settings.MAX_EXPERT_BUFFER_BYTES:
            raise UserError(
                f"capacity factor {self.capacity_factor:g} gives {slots:,} slots per expert for {num_tokens:,} tokens: "
                f"the expert activations [{self.num_experts}, {slots}, {self.experts.hidden}] would take "
                f"{size / 2**30:,.1f} GiB (limit {settings.MAX_EXPERT_BUFFER_BYTES / 2**30:g} GiB)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, tokens, dim = x.shape
        flat = x.reshape(1, images * tokens, dim)
        gates = torch.softmax(self.router(flat).float(), dim=-1)  # tutel's fp32_gate: the router is float32
        routing, slots = self.routing(gates)
        if isinstance(slots, int):  # eager: bounded up front (an exported graph takes any batch)
            self._check_buffer(images * tokens, slots)
        record(self, routing)
        expert_in = self.dispatch(flat.float(), routing, self.num_experts, slots)
        expert_out = self.experts(expert_in)
        return self.combine(expert_out, routing, slots).reshape(images, tokens, dim).to(x.dtype)

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, router={'cosine' if self.cosine_router else 'linear'}"


class Mlp(nn.Module):
    """Swin's dense MLP: fc1, GELU (erf), fc2 (optionally without bias)."""

    def __init__(self, dim: int, hidden: int, fc2_bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim, bias=fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def relative_coords_table(window: int, pretrained_window: int) -> torch.Tensor:
    """``[1, 2w-1, 2w-1, 2]`` log-spaced relative coordinates, as Swin's ``WindowAttention``."""
    coords = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid([coords, coords], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    table = table / ((pretrained_window if pretrained_window > 0 else window) - 1)
    table = table * 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """``[w*w, w*w]`` index into the ``(2w-1)^2`` relative positions, as Swin's."""
    coords = torch.stack(torch.meshgrid([torch.arange(window), torch.arange(window)], indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += window - 1
    relative[:, :, 1] += window - 1
    relative[:, :, 0] *= 2 * window - 1
    return relative.sum(-1)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * windows, w * w, C]``."""
    batch, height, width, chans = x.shape
    x = x.view(batch, height // window, window, width // window, window, chans)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, chans)


def window_reverse(windows: torch.Tensor, window: int, batch, height: int, width: int) -> torch.Tensor:
    """``[B * windows, w * w, C]`` -> ``[B, H, W, C]``."""
    x = windows.view(batch, height // window, width // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """``[windows, w*w, w*w]``: 0 within a region of the cyclically shifted image, -100 across regions."""
    regions = torch.zeros((1, resolution, resolution, 1))
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        regions[:, h, w, :] = n
    windows = window_partition(regions, window).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, ATTENTION_MASK).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, plus the relative position bias an MLP (``cpb_mlp``)
    computes from the log-spaced relative coordinates."""

    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool, qk_scale, pretrained_window: int):
        super().__init__()
        self.window, self.heads, self.pretrained_window = window, heads, pretrained_window
        self.scale = qk_scale or (dim // heads) ** -0.5
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, heads, bias=False))
        self.register_buffer("relative_coords_table", relative_coords_table(window, pretrained_window), False)
        self.register_buffer("relative_position_index", relative_position_index(window), False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.heads)
        bias = table.index_select(0, self.relative_position_index.view(-1)).view(tokens, tokens, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            per_image = mask.shape[0]
            attn = attn.view(-1, per_image, self.heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, tokens, tokens)
        attn = torch.softmax(attn, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(windows, tokens, dim))


class SwinBlock(nn.Module):
    """A Swin block: (shifted) window attention and an MLP or MoE MLP, pre-LayerNorm, residuals. A stage
    no larger than the window is one window, unshifted (Swin's rule)."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp: nn.Module, **attn):
        super().__init__()
        if resolution <= window:
            shift, window = 0, resolution
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, **attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp
        mask = shifted_window_mask(resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        side = self.resolution
        shortcut = x
        x = self.norm1(x).view(batch, side, side, dim)
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, self.window), self.attn_mask)
        x = window_reverse(x, self.window, batch, side, side)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.reshape(batch, tokens, dim)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (``x0, x1, x2, x3`` as Swin orders them), LayerNorm, then a
    bias-free linear map to twice the width."""

    def __init__(self, resolution: int, dim: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        x = x.view(batch, self.resolution, self.resolution, dim)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(batch, -1, 4 * dim)))


class SwinStage(nn.Module):
    def __init__(self, blocks: list[SwinBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int, norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x if self.norm is None else self.norm(x)


class SwinTransformerMoE(nn.Module):
    """Swin-MoE: images ``[B, C, H, W]`` (ImageNet-normalised) -> logits ``[B, classes]``.

    ``moe_blocks[i]`` lists the blocks of stage ``i`` whose MLP is a ``SwinMoEMlp`` (``-1``: none); the
    routing keyword arguments (``k``, ``capacity_factor``, ...) go to every MoE MLP.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        ape: bool = False,
        patch_norm: bool = True,
        mlp_fc2_bias: bool = True,
        pretrained_window_sizes: tuple[int, ...] | None = None,
        moe_blocks: tuple[tuple[int, ...], ...] = ((-1,), (-1,), (-1,), (-1,)),
        num_experts: int = 1,
        **moe,
    ):
        super().__init__()
        self.image_size, self.in_chans = image_size, in_chans
        resolution = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolution**2, embed_dim)) if ape else None
        pretrained = pretrained_window_sizes or (0,) * len(depths)
        stages = []
        for i, depth in enumerate(depths):
            dim, side = embed_dim * 2**i, resolution // 2**i
            hidden = int(dim * mlp_ratio)
            blocks = []
            for j in range(depth):
                if j in moe_blocks[i]:
                    mlp = SwinMoEMlp(dim, hidden, num_experts, fc2_bias=mlp_fc2_bias, **moe)
                else:
                    mlp = Mlp(dim, hidden, mlp_fc2_bias)
                shift = 0 if j % 2 == 0 else window_size // 2
                attn = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, pretrained_window=pretrained[i])
                blocks.append(SwinBlock(dim, side, num_heads[i], window_size, shift, mlp, **attn))
            downsample = PatchMerging(side, dim) if i < len(depths) - 1 else None
            stages.append(SwinStage(blocks, downsample))
        self.layers = nn.ModuleList(stages)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        """Seeded random weights, non-degenerate everywhere (LayerNorms and biases too), so that parity
        checks see every path; each expert its own. A cosine router keeps its initial temperature."""
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                if isinstance(module, nn.LayerNorm):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.02 * noise)
                elif name == "temperature":
                    continue
                elif name in ("bias", "fc1_b", "fc2_b"):
                    p.copy_(0.02 * noise)
                elif name == "sim_matrix":
                    p.copy_(noise)
                elif name in ("fc1_w", "fc2_w"):  # [E, hidden, D]: fc1 reads D, fc2 reads hidden
                    p.copy_(noise / math.sqrt(p.shape[-1] if name == "fc1_w" else p.shape[-2]))
                else:
                    p.copy_(noise / math.sqrt(p[0].numel() if p.ndim > 1 else 1))

    def derive_buffers_(self, device: str | torch.device = "cpu") -> SwinTransformerMoE:
        """(Re)computes the buffers derived from the architecture (relative coordinates and indices, the
        shifted windows' masks) on ``device``: after building on the meta device and loading weights."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.relative_coords_table = relative_coords_table(m.window, m.pretrained_window).to(device)
                m.relative_position_index = relative_position_index(m.window).to(device)
            elif isinstance(m, SwinBlock) and m.shift > 0:
                m.attn_mask = shifted_window_mask(m.resolution, m.window, m.shift).to(device)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        for stage in self.layers:
            x = stage(x)
        return self.head(self.norm(x).mean(dim=1))


def swin_moe_layers(module: nn.Module) -> list[tuple[str, SwinMoEMlp]]:
    """``(qualified name, layer)`` of every Swin-MoE MoE MLP of a model, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, SwinMoEMlp)]


@contextlib.contextmanager
def routing_settings(
    module: nn.Module, *, capacity_factor: float | None = None, batch_priority: bool | None = None
) -> Iterator[None]:
    """Temporarily sets the routing of every Swin-MoE layer (``None`` keeps a layer's own value)."""
    layers = [m.routing for _, m in swin_moe_layers(module)]
    saved = [(r.capacity_factor, r.batch_priority) for r in layers]
    try:
        for r in layers:
            if capacity_factor is not None:
                if not math.isfinite(capacity_factor):
                    raise UserError(f"capacity factor must be finite, got {capacity_factor}")
                r.capacity_factor = capacity_factor
            if batch_priority is not None:
                r.batch_priority = batch_priority
        yield
    finally:
        for r, (c, bpr) in zip(layers, saved):
            r.capacity_factor, r.batch_priority = c, bpr


def unlimited_capacity_factor(module: nn.Module) -> float:
    """A capacity factor at which no layer can drop: ``k * int(cf * ceil(N / E)) >= N`` for ``cf = E``
    (an expert takes at most one choice per token)."""
    layers = swin_moe_layers(module)
    if not layers:
        raise UserError("the model has no Swin-MoE layers")
    return float(max(m.num_experts for _, m in layers))
