"""The one ONNX Runtime session factory: quiet, one provider, and a refusal as one line with
ONNX Runtime's reason (not its status prefix and C++ location)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from exporter.backends.onnxruntime import run, run_onnxruntime, session
from exporter.errors import CheckFailed, UserError


def _relu(ir_version: int = 10) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=ir_version)


def test_a_session_runs_files_and_bytes(tmp_path):
    onnx.save(_relu(), tmp_path / "r.onnx")
    x = np.array([-1, 0, 2], np.float32)
    assert run_onnxruntime(tmp_path / "r.onnx", {"x": x})["y"].tolist() == [0, 0, 2]
    sess = session(_relu().SerializeToString(), threads=1)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert run(sess, {"x": x})["y"].tolist() == [0, 0, 2]


def test_a_refusal_is_one_line_with_the_reason(tmp_path):
    onnx.save(_relu(ir_version=99), tmp_path / "new.onnx")
    with pytest.raises(UserError, match=r"cannot load .*new.onnx: Unsupported model IR version: 99") as e:
        session(tmp_path / "new.onnx")
    assert "onnxruntime_src" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="fails on the graph at batch 4"):  # another author's graph: exit 2
        run(session(_relu().SerializeToString()), {"x": np.zeros(4, np.float32)})
    ours = _relu()
    ours.producer_name = "moe-export"  # a graph moe-export wrote that fails on a batch it takes: the check fails
    with pytest.raises(CheckFailed, match="fails on the graph at batch 4"):
        run(session(ours.SerializeToString()), {"x": np.zeros(4, np.float32)})
