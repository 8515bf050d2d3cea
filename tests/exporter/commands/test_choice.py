"""ModelChoice -> ModelSource: the model options every command shares, resolved in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.commands.choice import ModelChoice, resolve
from exporter.errors import UserError
from exporter.sources.loading import ModelSource, from_zoo

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_a_zoo_model_with_routing_overrides():
    source = resolve(ModelChoice(model="vmoe-tiny", capacity_factor=0.5, batch_priority=True, seed=3))
    assert source == from_zoo("vmoe-tiny", capacity_factor=0.5, batch_priority=True, seed=3)
    assert ModelChoice(k=1).overrides == {"k": 1} and not ModelChoice().given and ModelChoice(seed=0).given


def test_a_recorded_model_is_the_start_and_options_change_it():
    recorded = from_zoo("vmoe-tiny", capacity_factor=0.5, seed=2)
    assert resolve(ModelChoice(), recorded) == recorded
    changed = resolve(ModelChoice(capacity_factor=2.0), recorded)
    assert changed.config.capacity_factor == 2.0 and changed.seed == 2
    assert resolve(ModelChoice(model="soft-moe-tiny"), recorded).name == "soft-moe-tiny"


def test_a_recorded_user_module_takes_no_routing_overrides():
    recorded = ModelSource("module", f"{FIXTURES / 'user_modules.py'}:tiny_vmoe_user_model", (3, 16, 16))
    assert resolve(ModelChoice(seed=5), recorded).seed == 5
    with pytest.raises(UserError, match="only apply to zoo models"):
        resolve(ModelChoice(k=1), recorded)


@pytest.mark.parametrize(
    "choice, message",
    [
        (ModelChoice(model="vmoe-tiny", module="m.py:f"), "either --model or --module"),
        (ModelChoice(module="m.py:f", input_shape="2,3,8,8", k=1), "only apply to --model"),
        (ModelChoice(), "give --model NAME"),
        (ModelChoice(checkpoint="missing.safetensors"), "does not exist"),
        (ModelChoice(checkpoint=__file__.replace(".py", ".pt")), "does not exist"),
        (ModelChoice(model="vmoe-tinyy"), "unknown model"),
    ],
)
def test_bad_choices_are_one_clear_error(choice, message):
    with pytest.raises(UserError, match=message):
        resolve(choice)


def test_a_weights_file_alone_asks_for_the_model(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="holds weights only"):
        resolve(ModelChoice(checkpoint=str(weights)))
