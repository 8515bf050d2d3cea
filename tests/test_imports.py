"""The packages import, and the CLI answers --help, on a machine without GPU libraries: tensorrt,
triton, CUDA bindings and matplotlib are blocked and must not be needed. ``import cli`` stays light
(no torch, no onnx) so that --help is instant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import importlib.abc, sys
BLOCKED = {"tensorrt", "tensorrt_libs", "triton", "pycuda", "cuda", "cupy", "matplotlib"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Blocker())
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, cwd=ROOT)


def test_cli_import_is_light():
    proc = _python(
        "import cli, exporter, plugins\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_every_module_imports_without_gpu_libraries():
    proc = _python(
        "import importlib, pkgutil, exporter, plugins\n"
        "names = []\n"
        "for pkg in (exporter, plugins):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name); names.append(m.name)\n"
        "for name in exporter.__all__: getattr(exporter, name)\n"
        "print(len(names))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 10


def test_every_command_help_works_without_gpu_libraries():
    proc = _python(
        "from cli import main\n"
        "for cmd in ([], ['models'], ['export'], ['validate'], ['rewrite'], ['demo'],\n"
        "            ['inspect', 'routing'], ['sweep', 'capacity'], ['build', 'bundle'], ['build', 'engine'],\n"
        "            ['bench'], ['import', 'vmoe']):\n"
        "    try:\n"
        "        main(cmd + ['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (cmd, e.code)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Usage: ") == 12


def test_tensorrt_missing_is_a_reason_not_a_crash():
    proc = _python(
        "from exporter.backends.tensorrt import tensorrt_available, tensorrt_version\n"
        "assert tensorrt_version() is None\n"
        "print(tensorrt_available())\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "TensorRT is not installed"
