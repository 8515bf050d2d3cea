"""How close the imported models are to vmoe's own forward pass, per fixture case: the logits error
relative to the logits' scale, routing decisions, and what the bfloat16 dispatch option changes.

    python benchmarks/reference_parity.py

The fixtures (tests/fixtures/vmoe) hold checkpoints written by vmoe's own writer and the logits and
routing of vmoe's own Flax forward pass (tests/fixtures/vmoe/make_fixtures.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.models.capture import capture_routing, layer_names  # noqa: E402
from exporter.sources.checkpoints import load_vmoe_checkpoint  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "vmoe"


def kept(routing) -> np.ndarray:
    expert, slot = routing.expert.numpy(), routing.slot.numpy()
    order = np.argsort(np.where(slot >= 0, expert, 1 << 40), axis=-1, kind="stable")
    expert, slot = np.take_along_axis(expert, order, -1), np.take_along_axis(slot, order, -1)
    return np.stack([np.where(slot >= 0, expert, -1), slot], axis=-1)


def run(model, x):
    with torch.no_grad(), capture_routing() as records:
        logits = model(x).numpy()
    names = [n.replace("blocks.", "encoderblock_").replace(".mlp", "") for n in layer_names(model, records)]
    return logits, {n: kept(r) for n, (_, r) in zip(names, records)}


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    ref = dict(np.load(FIXTURES / "reference.npz"))
    x = torch.from_numpy(ref["images"]).permute(0, 3, 1, 2).contiguous()
    print(
        "| case | dropped pairs | float32 vs reference (f32 dispatch) | bf16 option vs reference (bf16) | "
        "float32 vs reference (bf16) | routing equal (f32 / bf16) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for cf, bpr in ((4.0, False), (1.0, False), (0.5, False), (0.5, True)):
        cells, agree = [], []
        base = f"vmoe_cf{cf}_{'bpr' if bpr else 'vanilla'}"
        for bf16, target in ((False, "f32"), (True, "bf16"), (False, "bf16")):
            model = load_vmoe_checkpoint(
                FIXTURES / "vmoe_small", capacity_factor=cf, batch_priority=bpr, group_images=2, bf16_dispatch=bf16
            )
            logits, routes = run(model, x)
            cells.append(f"{rel(logits, ref[f'{base}_{target}/logits']):.1e}")
            if (bf16, target) != (False, "bf16"):
                n = sum(int((routes[k] == ref[f"{base}_{target}/{k}"]).all(axis=(-1, -2)).sum()) for k in routes)
                total = sum(routes[k].shape[0] * routes[k].shape[1] for k in routes)
                agree.append(f"{n / total:.2%}")
        dropped = sum(int((ref[f"{base}_f32/{k}"][..., 0] < 0).sum()) for k in ("encoderblock_1", "encoderblock_3"))
        name = f"V-MoE C={cf:g} {'BPR' if bpr else 'vanilla'}"
        print(f"| {name} | {dropped} | " + " | ".join(cells) + f" | {' / '.join(agree)} |")
    soft = [
        rel(run(load_vmoe_checkpoint(FIXTURES / "soft_small", bf16_dispatch=b), x)[0], ref[f"soft_{t}/logits"])
        for b, t in ((False, "f32"), (True, "bf16"), (False, "bf16"))
    ]
    print(f"| Soft-MoE | - | {soft[0]:.1e} | {soft[1]:.1e} | {soft[2]:.1e} | - |")


if __name__ == "__main__":
    main()
