"""Swin-MoE against Microsoft's own code, case by case: the fixtures of tests/fixtures/swin_moe (Swin's model
and tutel's routing on 8 images, written by its make_fixtures.py) and moe-export's model loaded from the
rank files and from the merged file, on the batch of 8 and image by image.

    python benchmarks/swin_moe_reference.py

Per case: tutel's capacity of the first MoE layer (batch of 8 / one image), the (token, choice) pairs it
dropped, the largest logits error relative to the logits' scale over both loads and both batchings, and
whether every routing decision (expert, kept, location, gate) is equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.models.capture import run_with_routing  # noqa: E402
from exporter.sources.checkpoints.swin_moe import load_swin_moe_checkpoint, read_checkpoint  # noqa: E402
from exporter.sources.swin_moe import from_yaml  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "swin_moe"
GATE_RTOL = 1e-6


def equal(routing, ref: dict, prefix: str) -> bool:
    expert, slot, weight = (t[0].numpy() for t in routing)
    kept = ref[f"{prefix}/kept"]
    return (
        np.array_equal(expert, ref[f"{prefix}/expert"])
        and np.array_equal(slot >= 0, kept)
        and np.array_equal(slot[kept], ref[f"{prefix}/location"][kept])
        and np.allclose(weight[kept], ref[f"{prefix}/gate"][kept], rtol=GATE_RTOL, atol=0)
        and not weight[~kept].any()
    )


def main() -> None:
    ref = dict(np.load(FIXTURES / "reference.npz"))
    cases = json.loads(str(ref["cases"]))
    print("| case | router | k | C | BPR | normalize | capacity (8 / 1 image) | dropped (8 / 1 image) | "
          "max rel err | routing equal |")  # fmt: skip
    print("|---|---|---:|---:|---|---|---:|---:|---:|---|")
    for case, (name, k, cf, normalize, bpr, alignment) in cases.items():
        worst, same = 0.0, True
        for source in (f"{name}.pth", f"{name}.merged.pth"):
            checkpoint = FIXTURES / source
            config, _ = from_yaml(FIXTURES / f"{name}.yaml", num_experts=read_checkpoint(checkpoint).num_experts)
            config = config.replace(
                k=k, capacity_factor=cf, batch_priority=bpr, normalize_gate=normalize, alignment=alignment
            )
            model = load_swin_moe_checkpoint(checkpoint, config=config)
            images = torch.from_numpy(ref["images"])[..., : config.image_size, : config.image_size].contiguous()
            runs = {"": [images], "single/": [images[i : i + 1] for i in range(len(images))]}
            for tag, batches in runs.items():
                results = [run_with_routing(model, b) for b in batches]
                logits = np.concatenate([r[0][0].numpy() for r in results])
                want = ref[f"{case}/logits" + ("_single" if tag else "")]
                worst = max(worst, float(np.abs(logits - want).max() / np.abs(want).max()))
                for layer in results[0][1]:
                    parts = [r[1][layer] for r in results]
                    merged = type(parts[0])(*(torch.cat([p[i] for p in parts], dim=1) for i in range(3)))
                    same &= equal(merged, ref, f"{case}/{layer}/{tag}".rstrip("/"))
        layers = sorted({key.split("/")[1] for key in ref if key.startswith(f"{case}/layers")})
        cap = f"{int(ref[f'{case}/{layers[0]}/capacity'])} / {int(ref[f'{case}/{layers[0]}/single/capacity'][0])}"
        dropped = [sum(int((~ref[f"{case}/{layer}/{t}kept"]).sum()) for layer in layers) for t in ("", "single/")]
        router = (
            "cosine" if name == "cosine" else "linear" + (" (1 expert split over 2 ranks)" if name == "sharded" else "")
        )
        print(
            f"| {case} | {router} | {k} | {cf:g} | {'yes' if bpr else 'no'} | {'yes' if normalize else 'no'}"
            f"{f', alignment {alignment}' if alignment > 1 else ''} | {cap} | {dropped[0]} / {dropped[1]} | "
            f"{worst:.1e} | {'100%' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
