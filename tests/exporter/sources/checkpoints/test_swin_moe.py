"""Swin-MoE checkpoints against Microsoft's own code (tests/fixtures/swin_moe/make_fixtures.py): the files
Swin's rank-sharded saver and tutel.checkpoint.gather wrote, the logits of Swin's model and the routing
tutel computed, token by token; the released configs' real state-dict shapes; the bad inputs."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.errors import UserError
from exporter.models.capture import run_with_routing
from exporter.models.swin_moe import swin_moe_layers
from exporter.sources.checkpoints.swin_moe import (
    checkpoint_files,
    config_for_checkpoint,
    load_swin_moe_checkpoint,
    read_checkpoint,
    split_ranks,
    state_dict_for,
    to_swin_state,
    write_checkpoint,
)
from exporter.sources.swin_moe import SWIN_MOE_ZOO, build_swin_moe, from_yaml
from exporter.sources.zoo import param_count

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "swin_moe"
RELEASED = FIXTURES / "released"
RTOL = 1e-4  # logits, relative to their scale
GATE_RTOL = 1e-5  # the combine gate of every kept choice (float32 softmax, optionally normalised): a few
# float32 steps, the logits' own summation-order noise (seen: 1.3e-6 with another BLAS thread split)
REFERENCE = dict(np.load(FIXTURES / "reference.npz"))
CASES = json.loads(str(REFERENCE["cases"]))  # case -> (model, k, capacity factor, normalize, BPR, alignment)
SOURCES = {"rank files": "{m}.pth", "merged file": "{m}.merged.pth"}


def model_for(case: str, source: str):
    name, k, cf, normalize, bpr, alignment = CASES[case]
    checkpoint = FIXTURES / SOURCES[source].format(m=name)
    experts = read_checkpoint(checkpoint).num_experts
    config, _ = from_yaml(FIXTURES / f"{name}.yaml", num_experts=experts)
    config = config.replace(k=k, capacity_factor=cf, normalize_gate=normalize, batch_priority=bpr, alignment=alignment)
    return load_swin_moe_checkpoint(checkpoint, config=config)


def run(model, images: torch.Tensor) -> tuple[np.ndarray, dict]:
    out, routing = run_with_routing(model, images)
    return out[0].numpy(), {name: r for name, r in routing.items()}


def assert_routing_equal(routing, prefix: str) -> None:
    """Every choice: the same expert, the same kept/dropped decision, the same location when kept, the
    same combine gate when kept, and weight 0 when dropped."""
    expert, slot, weight = (t[0].numpy() for t in routing)
    kept = REFERENCE[f"{prefix}/kept"]
    assert np.array_equal(expert, REFERENCE[f"{prefix}/expert"]), prefix
    assert np.array_equal(slot >= 0, kept), prefix
    assert np.array_equal(slot[kept], REFERENCE[f"{prefix}/location"][kept]), prefix
    np.testing.assert_allclose(weight[kept], REFERENCE[f"{prefix}/gate"][kept], rtol=GATE_RTOL, atol=0)
    assert not weight[~kept].any()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", CASES)
def test_logits_and_every_routing_decision_equal_microsofts(case, source):
    model = model_for(case, source)
    images = torch.from_numpy(REFERENCE["images"])[..., : model.image_size, : model.image_size].contiguous()
    logits, routing = run(model, images)  # the batch of 8 is one routing group
    expected = REFERENCE[f"{case}/logits"]
    assert np.abs(logits - expected).max() / np.abs(expected).max() <= RTOL
    for name, r in routing.items():
        assert_routing_equal(r, f"{case}/{name}")
    singles = [run(model, images[i : i + 1]) for i in range(len(images))]  # image by image: capacity per image
    logits = np.concatenate([s[0] for s in singles])
    expected = REFERENCE[f"{case}/logits_single"]
    assert np.abs(logits - expected).max() / np.abs(expected).max() <= RTOL
    for name, m in swin_moe_layers(model):
        merged = type(singles[0][1][name])(*(torch.cat([s[1][name][i] for s in singles], dim=1) for i in range(3)))
        assert_routing_equal(merged, f"{case}/{name}/single")
        if m.capacity_factor > 0:  # tutel's capacity of the batch and of one image
            tokens = routing[name].expert.shape[1]
            assert m.capacity(tokens) == int(REFERENCE[f"{case}/{name}/capacity"])
            singles_capacity = REFERENCE[f"{case}/{name}/single/capacity"]
            assert (singles_capacity == m.capacity(tokens // len(images))).all()


def test_the_fixtures_drop_tokens_and_batch_1_differs_from_batch_8():
    """What makes the comparison above meaningful: tokens are dropped, at 1.25 as well as at 0.5 (BPR),
    and an image routed alone gets other capacities and decisions than in the batch."""
    for case in ("linear_k1_cf1.25", "linear_k2_cf0.5", "cosine_k1_cf1.25"):
        kept = REFERENCE[f"{case}/layers.0.blocks.1.mlp/kept"]
        assert 0 < (~kept).sum() < kept.size
        single = REFERENCE[f"{case}/layers.0.blocks.1.mlp/single/kept"]
        assert not np.array_equal(kept, single)
    assert int(REFERENCE["linear_k1_cf1.25/layers.0.blocks.1.mlp/capacity"]) == 1 * int(1.25 * (8 * 64 // 4))
    assert (REFERENCE["linear_k1_cf1.25/layers.0.blocks.1.mlp/single/capacity"] == int(1.25 * 64 // 4)).all()


def test_rank_files_and_merged_file_give_the_same_weights():
    for name in ("linear", "cosine", "sharded"):
        ranks, merged = read_checkpoint(FIXTURES / f"{name}.pth"), read_checkpoint(FIXTURES / f"{name}.merged.pth")
        assert ranks.ranks == 2 and merged.ranks == 0 and ranks.num_experts == merged.num_experts
        config = config_for_checkpoint(ranks, FIXTURES / f"{name}.yaml")
        a, b = state_dict_for(ranks, config), state_dict_for(merged, config)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    bias = "layers.0.blocks.1.mlp._moe_layer.experts.batched_fc2_bias"  # bias-free: rank 0's zeros, or all
    assert read_checkpoint(FIXTURES / "linear.pth").state[bias].shape == (2, 8)
    assert read_checkpoint(FIXTURES / "linear.merged.pth").state[bias].shape == (4, 8)


def test_our_writer_writes_what_swins_saver_and_tutels_gather_wrote(tmp_path):
    """Synthetic checkpoints are in the real layout: rewritten from the loaded weights, the rank files,
    the master and the merged file equal Microsoft's, key for key and bit for bit (experts 2 a rank;
    one expert split over both ranks, its fc2 bias too; the zero fc2 bias of a bias-free model)."""
    for name in ("linear", "cosine", "sharded"):
        read = read_checkpoint(FIXTURES / f"{name}.pth")
        config = config_for_checkpoint(read, FIXTURES / f"{name}.yaml")
        state = state_dict_for(read, config)
        files = write_checkpoint(tmp_path / f"{name}.pth", state, config, ranks=2)
        files += write_checkpoint(tmp_path / f"{name}.merged.pth", state, config)
        for ours in files:
            theirs = torch.load(FIXTURES / ours.name, weights_only=True)["model"]
            written = torch.load(ours, weights_only=True)["model"]
            assert written.keys() == theirs.keys(), ours.name
            assert all(torch.equal(written[k], theirs[k]) for k in theirs), ours.name


def released_shapes() -> dict:
    with gzip.open(FIXTURES / "released.json.gz", "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("name", [n for n, c in SWIN_MOE_ZOO.items() if "released" in c.tags])
def test_released_configs_have_swins_real_shapes(name):
    """Each released zoo entry maps one to one onto the state dict Swin's own code builds from the
    released YAML (names and shapes, buffers included), its rank files have the shapes tutel gives on
    the 32 GPUs it trained on, and the YAML reads back as the zoo entry."""
    config = SWIN_MOE_ZOO[name]
    released = released_shapes()[config.tags[1]]
    assert released["num_experts"] == config.num_experts
    model = build_swin_moe(config, device="meta")
    swin = to_swin_state(model.state_dict(), config)
    assert {k: list(v.shape) for k, v in swin.items()} == released["state_dict"]
    per_rank, master = split_ranks(swin, config, 32)
    for stage, shapes in released["rank_experts"].items():
        block = next(b for b in config.moe_blocks[int(stage)] if b >= 0)
        prefix = f"layers.{stage}.blocks.{block}.mlp._moe_layer.experts."
        held = {k.removeprefix(prefix): list(v.shape) for k, v in per_rank[5].items() if k.startswith(prefix)}
        if "batched_fc2_bias" not in held:  # bias-free: the frozen zero bias stays in the master
            held["batched_fc2_bias"] = list(master[prefix + "batched_fc2_bias"].shape)
        assert held == shapes
    bias_free = 0 if config.mlp_fc2_bias else sum(v[1] for k, v in released["state_dict"].items() if "fc2_bias" in k)
    # tutel counts the frozen zero fc2 bias as a parameter; the model here has none
    assert param_count(config) == released["parameters"] - bias_free * config.num_experts
    read, _ = from_yaml(RELEASED / f"{config.tags[1]}.yaml", num_experts=config.num_experts)
    assert read.replace(name=config.name, summary=config.summary) == config


def test_a_synthetic_released_checkpoint_loads_from_32_rank_files(tmp_path):
    """The released 8-expert layout (each expert split over 4 of 32 GPUs), written small: the released
    S/8 config with its stage widths divided by 8 (same depths, windows, MoE blocks, 32 ranks)."""
    config = SWIN_MOE_ZOO["swin-moe-s-e8"].replace(embed_dim=12, num_heads=(1, 1, 1, 1), image_size=96)
    state = build_swin_moe(config, seed=3).state_dict()
    files = write_checkpoint(tmp_path / "s8.pth", state, config, ranks=32)
    assert len(files) == 33 and checkpoint_files(tmp_path / "s8.pth") == files
    read = read_checkpoint(tmp_path / "s8.pth")
    assert read.rank_experts == (1, int(12 * 4 * 4) // 4, 48)  # stage 3: width 48, hidden 192 in 4 slices
    loaded = state_dict_for(read, config)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


# --- bad input: one line (a UserError), naming the file or key -------------------------------------


def copy(tmp_path: Path, name: str = "linear") -> Path:
    for f in FIXTURES.glob(f"{name}.pth.*"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(FIXTURES / f"{name}.yaml", tmp_path / f"{name}.yaml")
    return tmp_path / f"{name}.pth"


def test_a_missing_rank_file_is_named(tmp_path):
    prefix = copy(tmp_path)
    Path(f"{prefix}.rank0").unlink()
    with pytest.raises(UserError, match=r"rank file .*linear\.pth\.rank0 is missing"):
        read_checkpoint(prefix)
    prefix = copy(tmp_path)
    Path(f"{prefix}.rank1").unlink()  # the last one: two experts of four
    with pytest.raises(UserError, match=r"rank file .*linear\.pth\.rank1 is missing: 1 rank file\(s\) hold 2 of the 4"):
        read_checkpoint(prefix)
    shutil.copy(FIXTURES / "linear.pth.rank1", Path(f"{prefix}.rank1"))
    shutil.copy(Path(f"{prefix}.rank1"), Path(f"{prefix}.rank2"))  # a third rank: the experts do not add up
    with pytest.raises(UserError, match="3 rank files cannot split 4 experts"):
        read_checkpoint(prefix)
    prefix = copy(tmp_path, "sharded")
    Path(f"{prefix}.rank1").unlink()  # half of the one expert: only the YAML tells
    with pytest.raises(UserError, match=r"sharded\.pth\.rank1 is missing: NUM_LOCAL_EXPERTS: -2 puts 1 experts on 2"):
        load_swin_moe_checkpoint(prefix, config=tmp_path / "sharded.yaml")


def test_ranks_that_disagree_are_named(tmp_path):
    prefix = copy(tmp_path)
    sharded = torch.load(FIXTURES / "sharded.pth.rank1", weights_only=True)
    torch.save(sharded, Path(f"{prefix}.rank1"))  # another run's rank file
    with pytest.raises(
        UserError, match="rank files disagree: layers.*is in one of linear.pth.rank0 and linear.pth.rank1"
    ):
        read_checkpoint(prefix)
    prefix = copy(tmp_path)
    rank1 = torch.load(Path(f"{prefix}.rank1"), weights_only=True)
    key = "layers.0.blocks.1.mlp._moe_layer.experts.batched_fc1_w"
    rank1["model"][key] = rank1["model"][key][:, :8]
    torch.save(rank1, Path(f"{prefix}.rank1"))
    with pytest.raises(UserError, match=rf"rank files disagree: {key} is \[2, 8, 8\] in linear.pth.rank1"):
        read_checkpoint(prefix)


def test_a_config_that_does_not_match_names_the_key(tmp_path):
    prefix = copy(tmp_path)
    yaml = tmp_path / "linear.yaml"
    yaml.write_text(yaml.read_text().replace("EMBED_DIM: 8", "EMBED_DIM: 16"))
    with pytest.raises(UserError, match=r"does not match the config .*: patch_embed.proj.weight is \[8, 3, 4, 4\]"):
        load_swin_moe_checkpoint(prefix, config=yaml)
    yaml.write_text((FIXTURES / "linear.yaml").read_text().replace("NUM_CLASSES: 10", "NUM_CLASSES: 1000"))
    with pytest.raises(
        UserError, match=r"does not match the config .*: head.weight is \[10, 16\], the config's \[1000, 16\]"
    ):
        load_swin_moe_checkpoint(prefix, config=yaml)
    yaml.write_text((FIXTURES / "linear.yaml").read_text().replace("TYPE: swin_moe", "TYPE: swin"))
    with pytest.raises(UserError, match="is not a Swin-MoE config: MODEL.TYPE is 'swin'"):
        load_swin_moe_checkpoint(prefix, config=yaml)


def test_a_nonzero_fc2_bias_in_a_bias_free_model_is_refused(tmp_path):
    prefix = copy(tmp_path)
    master = torch.load(Path(f"{prefix}.master"), weights_only=True)
    key = "layers.1.blocks.0.mlp._moe_layer.experts.batched_fc2_bias"
    assert not master["model"][key].any()  # Swin's saver left rank 0's frozen zeros in the master
    master["model"][key] += 1
    torch.save(master, Path(f"{prefix}.master"))
    with pytest.raises(UserError, match=f"{key} is not zero, but the config has MLP_FC2_BIAS: False"):
        load_swin_moe_checkpoint(prefix, config=tmp_path / "linear.yaml")


def test_not_a_swin_moe_checkpoint(tmp_path):
    dense = {k: v for k, v in torch.load(FIXTURES / "linear.merged.pth", weights_only=True)["model"].items()}
    dense = {k: v for k, v in dense.items() if "_moe_layer" not in k}
    torch.save({"model": dense}, tmp_path / "dense.pth")
    with pytest.raises(UserError, match="is not a Swin-MoE checkpoint: no tutel MoE layer .* a dense model"):
        read_checkpoint(tmp_path / "dense.pth")
    torch.save({"blocks.0.weight": torch.zeros(2)}, tmp_path / "vit.pth")
    with pytest.raises(UserError, match="is not a Swin-MoE checkpoint: .* another model"):
        read_checkpoint(tmp_path / "vit.pth")


def test_a_pickled_object_that_is_not_a_state_dict(tmp_path):
    config = argparse.Namespace(MODEL="swin_moe")  # Swin's other saver pickles its yacs config beside the weights
    torch.save({"model": {}, "config": config}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="pickles more than tensors .*weights_only"):
        read_checkpoint(tmp_path / "pickled.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "int.pth")
    with pytest.raises(UserError, match="is not a state dict: a is a int, not a tensor"):
        read_checkpoint(tmp_path / "int.pth")
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "none.pth")
