"""Trains the tiny V-MoE and Soft-MoE of the zoo on scikit-learn's bundled digits (no download).

Seeded, CPU, 2 threads, about two minutes for both. Writes next to this file:
``vmoe_digits.safetensors``, ``soft_moe_digits.safetensors`` (the zoo models' state dicts, loadable
with ``moe-export export --model vmoe-tiny --checkpoint ...``) and ``metrics.json``.

    python samples/02_digits/train.py            # both models
    python samples/02_digits/train.py --only vmoe-tiny --epochs 5 --out /tmp/digits

The router trains with the model. The V-MoE adds the paper's importance loss (squared coefficient of
variation of each expert's summed gates per routing group) so that no expert is left idle; it trains at
the zoo config's routing (capacity factor 1.05, vanilla, groups of 8 images), so dropped tokens during
training are part of what it learns. The Soft-MoE needs no auxiliary loss.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from exporter.fileio import atomic_path, write_json
from exporter.models.vmoe import VMoEMlp
from exporter.sources.digits import accuracy, load_split, predict
from exporter.sources.zoo import VMOE, build_model, get_config

HERE = Path(__file__).resolve().parent
FILES = {"vmoe-tiny": "vmoe_digits.safetensors", "soft-moe-tiny": "soft_moe_digits.safetensors"}
BATCH = 64  # a multiple of the V-MoE routing group (8 images)
IMPORTANCE_WEIGHT = 0.01  # V-MoE paper: 0.005 for each of its two auxiliary losses
MAX_SHIFT = 2 / 32  # random translation of up to 2 pixels (of 32), as a share of the image


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to MAX_SHIFT; the background (-1) fills in."""
    n = images.shape[0]
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2 * MAX_SHIFT  # grid units span 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = offset
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1


def importance_loss(gates: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and groups of CV(sum of gates per expert)^2 (V-MoE, Appendix A)."""
    losses = []
    for g in gates:  # [G, S, E]
        importance = g.sum(dim=1)
        losses.append((importance.std(dim=-1) / importance.mean(dim=-1)).square().mean())
    return torch.stack(losses).mean()


def train(name: str, epochs: int, seed: int, out: Path) -> dict:
    torch.manual_seed(seed)
    config = get_config(name)
    data = load_split(config.input_shape)
    model = build_model(config, seed=seed).train()
    gates: list[torch.Tensor] = []
    if config.family == VMOE:
        for layer in model.modules():
            if isinstance(layer, VMoEMlp):
                layer.router.register_forward_hook(lambda _m, _i, logits: gates.append(torch.softmax(logits, -1)))
    steps_per_epoch = len(data.train_images) // BATCH
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    warmup = steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(data.train_images), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * BATCH : (step + 1) * BATCH]
            x, y = shift(data.train_images[idx], generator), data.train_labels[idx]
            gates.clear()
            loss = F.cross_entropy(model(x), y)
            if gates:
                loss = loss + IMPORTANCE_WEIGHT * importance_loss(gates)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        print(f"{name} epoch {epoch + 1}/{epochs} loss {running / steps_per_epoch:.3f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    gates.clear()
    seen = steps_per_epoch * BATCH
    train_acc = accuracy(predict(model, data.train_images[:seen], BATCH), data.train_labels[:seen])
    test_acc = accuracy(predict(model, data.test_images, BATCH), data.test_labels)
    for hook_owner in model.modules():
        hook_owner._forward_hooks.clear()

    from safetensors.torch import save_file

    dest = out / FILES[name]
    with atomic_path(dest) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: test accuracy {test_acc:.2%}, train {train_acc:.2%}, {seconds:.0f}s, {dest}", flush=True)
    return {
        "model": name,
        "checkpoint": FILES[name],
        "epochs": epochs,
        "seed": seed,
        "params": params,
        "file_bytes": dest.stat().st_size,
        "train_seconds": round(seconds, 1),
        "train_images": len(data.train_images),
        "test_images": len(data.test_images),
        "train_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "eval_routing": {"capacity_factor": config.capacity_factor, "batch_priority": config.batch_priority}
        if config.family == VMOE
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FILES), help="Train one model only.")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE, help="Folder of the weights and metrics.json.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = [args.only] if args.only else list(FILES)
    results = [train(name, args.epochs, args.seed, args.out) for name in names]
    metrics_path = args.out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update({r["model"]: r for r in results})
    write_json(metrics_path, metrics)


if __name__ == "__main__":
    main()
