"""tools.demo: the main job as a library call (CI also runs `moe-export demo` itself)."""

from __future__ import annotations

import json

from exporter.tools.demo import demo


def test_demo_exports_rewrites_and_validates_each_model(tmp_path):
    seen = []
    runs = demo(tmp_path, runs=(("soft-moe-tiny", {}),), started=lambda n, o: seen.append(n), done=seen.append)
    (run,) = runs
    assert seen == ["soft-moe-tiny", run] and run.passed
    assert run.rewrite.counts == {"SoftRoute": 2, "SoftDispatch": 2, "SoftCombine": 2}
    for name in ("soft-moe-tiny.onnx", "soft-moe-tiny.plugins.onnx"):
        assert (tmp_path / name).is_file()
    for name in ("soft-moe-tiny.parity.json", "soft-moe-tiny.plugins.parity.json"):
        assert json.loads((tmp_path / name).read_text())["passed"]
