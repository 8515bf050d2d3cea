"""tools.demo: the main job as a library call (CI also runs `moe-export demo` itself)."""

from __future__ import annotations

import json
import logging

from PIL import Image

from exporter.commands.demo import routing_picture
from exporter.tools.demo import demo


def test_demo_exports_rewrites_and_validates_each_model(tmp_path, monkeypatch, caplog):
    import exporter.deploy.bundle as bundle_module

    def again(*args, **kwargs):
        raise AssertionError("the bundle traced or rewrote the model a second time")

    monkeypatch.setattr(bundle_module, "export_onnx", again)
    monkeypatch.setattr(bundle_module, "rewrite_onnx", again)
    with caplog.at_level(logging.INFO, logger="exporter"):
        (run,) = demo(tmp_path, runs=(("soft-moe-tiny", {}),), picture=routing_picture)
    starts = [r.moe_message for r in caplog.records if getattr(r, "moe_phase", None) == "start"]
    assert starts[0] == "soft-moe-tiny" and run.passed  # each model a logged phase, yielded when done
    assert run.rewrite.counts == {"SoftRoute": 2, "SoftDispatch": 2, "SoftCombine": 2}
    for name in ("soft-moe-tiny.onnx", "soft-moe-tiny.plugins.onnx"):
        assert (tmp_path / name).is_file()
        # the bundle holds the graphs above as they are: one trace and one rewrite per model
        assert (tmp_path / "soft-moe-tiny.bundle" / name.replace("soft-moe-tiny", "model")).read_bytes() == (
            tmp_path / name
        ).read_bytes()
    for name in ("soft-moe-tiny.parity.json", "soft-moe-tiny.plugins.parity.json"):
        assert json.loads((tmp_path / name).read_text())["passed"]
    assert run.bundle.passed and run.picture.path == tmp_path / "soft-moe-tiny.routing.png"
    assert run.picture.family == "soft_moe" and run.picture.layout.titles[0] == "blocks.2.mlp | input"
    with Image.open(run.picture.path) as image:
        assert image.size == (run.picture.layout.width, run.picture.layout.height)
