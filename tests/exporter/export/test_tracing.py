"""torch.export of a model whoever wrote it (``exporter.export.tracing``): the strategies, a batch the code
fixes said with where, traces that defer guards checked at another batch (routing decisions compared
exactly), failures in one line with the model's line, and random ops in eval settled or refused."""

from __future__ import annotations

import inspect

import pytest
import torch

from exporter.errors import UserError
from exporter.export.tracing import ExportLog, guard_location, same_outputs, settle_random_ops, trace

BATCH = torch.export.Dim("batch", min=1)


def _line(module: type, text: str) -> int:
    """The line number of ``text`` in ``module``'s forward."""
    lines, start = inspect.getsourcelines(module.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


class Routed(torch.nn.Module):
    """A top-1 router whose capacity is ``int(1.25 * tokens / 4)`` of the batch: floats of a size."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 4)

    def forward(self, x):
        tokens = x.reshape(-1, 8)
        probs = self.gate(tokens).softmax(-1)
        capacity = int(1.25 * tokens.shape[0] / 4)
        expert = probs.argmax(-1)
        position = torch.nn.functional.one_hot(expert, 4).cumsum(0).gather(1, expert[:, None])[:, 0] - 1
        kept = position < capacity
        return tokens * probs.max(-1).values[:, None] * kept[:, None], kept, expert.to(torch.int32)


class FixesTheBatch(torch.nn.Module):
    def forward(self, x):
        return x.reshape(2, 4).sum(-1)  # two images, always


class DataDependent(torch.nn.Module):
    def forward(self, x):
        choice = x.argmax(-1)
        return torch.nn.functional.one_hot(choice, int(choice.max()) + 1).float()  # as wide as the largest


def test_a_dynamic_batch_where_the_code_allows_it(tmp_path):
    model, images = Routed().eval(), torch.randn(2, 3, 8)
    log = ExportLog()
    traced = trace(model, images, BATCH, log=log, other=torch.randn(5, 3, 8))
    log.close()
    assert traced.dynamic and not traced.notes
    other = torch.randn(7, 3, 8)
    got, want = traced.program.module()(other), model(other)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # every decision, at another batch
    assert torch.allclose(got[0], want[0])
    assert not log.path.exists()  # nothing failed: no log left behind


def test_a_batch_the_code_fixes_is_said_with_where():
    log = ExportLog()
    traced = trace(FixesTheBatch(), torch.randn(2, 4), BATCH, log=log, other=torch.randn(3, 4))
    log.close()
    assert not traced.dynamic
    [note] = traced.notes
    line = _line(FixesTheBatch, "reshape(2, 4)")
    assert note.startswith(f"the batch is fixed at 2 at test_tracing.py:{line} in forward: ")
    assert log.path.exists()  # a strategy failed: its log is kept and named
    log.path.unlink()


def test_a_data_dependent_size_fails_in_one_line_with_the_models_line():
    log = ExportLog()
    with pytest.raises(UserError) as failed:
        trace(DataDependent(), torch.randn(2, 4), BATCH, log=log, other=torch.randn(3, 4))
    log.close()
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("export failed: a size computed from tensor values (a data-dependent shape) at ")
    assert f"test_tracing.py:{_line(DataDependent, 'one_hot')} in forward" in message
    assert f"(full log: {log.path})" in message
    log.path.unlink()


def test_a_trace_is_compared_with_the_model_exactly_on_decisions():
    """Routing decisions (booleans, integers) must be equal, floats close; a trace whose decisions differ
    at another batch is not the model's."""
    model = Routed().eval()
    program = torch.export.export(model, (torch.randn(2, 3, 8),), dynamic_shapes=({0: BATCH},), strict=True)
    assert same_outputs(program, model, torch.randn(6, 3, 8))
    fixed = torch.export.export(model, (torch.randn(2, 3, 8),), strict=False)  # the capacity of 6 tokens
    assert not same_outputs(fixed, model, torch.randn(6, 3, 8))


def test_guard_location_is_the_models_frame_not_torchs():
    torch_file = torch.__file__.replace("__init__.py", "fx/experimental/symbolic_shapes.py")
    log = "\n".join(
        [
            f"[guard added] Eq(s0, 2) ({torch_file}:5000 in _evaluate_expr)",
            "[guard added] s0 >= 2 (model.py:10 in forward)",
            "[guard added] Eq(s0, 2) (/home/me/layers.py:37 in route)",
            "[guard added] Eq(s0, 2) (/home/me/other.py:3 in forward)",
        ]
    )
    assert guard_location(log) == "layers.py:37 in route"
    dynamo = "eval Eq(4*s6, 8) [guard added] return x.reshape(2, 4)  # models/vit.py:43 in forward "
    dynamo += "(_prims_common/__init__.py:1104 in infer_size), for more info run with ..."
    assert guard_location(dynamo) == "vit.py:43 in forward"
    assert guard_location("no guards here") == ""


class Noisy(torch.nn.Module):
    def __init__(self, inert: bool):
        super().__init__()
        self.inert = inert

    def forward(self, x):
        noise = torch.zeros_like(x).uniform_()
        return x + 0 * noise if self.inert else x * noise


def test_an_inert_draw_becomes_its_mean_and_a_live_one_is_refused():
    images = torch.randn(2, 4)
    for inert in (True, False):
        model = Noisy(inert).eval()
        log = ExportLog()
        traced = trace(model, images, BATCH, log=log, other=torch.randn(3, 4))
        log.close()
        if inert:
            settle_random_ops(traced, model, images)
            [note] = traced.notes
            assert "draws uniform_ in eval" in note and "replaced by its mean 0.5" in note
            assert torch.equal(traced.program.module()(images), model(images))
        else:
            with pytest.raises(UserError, match="draws uniform_ in eval .* and the output depends on it"):
                settle_random_ops(traced, model, images)
