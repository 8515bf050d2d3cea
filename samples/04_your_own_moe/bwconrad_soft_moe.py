"""bwconrad's ``soft-moe`` (0.0.1): ``SoftMoELayerWrapper``, its own softmax (amax, exp, sum, divide) over
the tokens and over both slot axes of ``[b, m, n, p]`` logits, ``F.normalize`` on tokens and ``phi``.

Its package ``__init__`` imports timm, whose import of torchvision fails beside a CPU-only torch: the
layer's own file (which imports only torch) is loaded by path instead."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from _parts import DIM, EXPERTS, HIDDEN, vit
from torch import nn


def _layer_class():
    spec = importlib.util.find_spec("soft_moe")  # finds the package without running its __init__
    path = Path(spec.submodule_search_locations[0]) / "soft_moe.py"
    module_spec = importlib.util.spec_from_file_location("soft_moe_layer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SoftMoELayerWrapper


def build():
    wrapper = _layer_class()
    torch.manual_seed(0)

    def expert():
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))

    return vit(lambda i: wrapper(DIM, EXPERTS, 2, expert))
