"""The samples' tests run the commands their README shows, extracted from its code blocks (not
retyped), in a copy of the sample folder: what a user pastes is what is tested, and the shipped
files (weights, pictures, sweep results) are never overwritten."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.helpers import run

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(?:bash|sh)\n(.*?)^```", re.M | re.S)


def readme_commands(sample: str) -> list[list[str]]:
    """Every ``moe-export ...`` command of the sample README's bash blocks, continuation lines
    joined and comments dropped, as argument lists without the program name."""
    text = (ROOT / "samples" / sample / "README.md").read_text()
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["moe-export"]:
                commands.append(words[1:])
    return commands


class SampleRun:
    """Runs CLI commands in a folder holding a copy of ``samples/<sample>`` at its usual path."""

    def __init__(self, sample: str, folder: Path):
        self.folder = folder
        shutil.copytree(ROOT / "samples" / sample, folder / "samples" / sample)
        self.commands = readme_commands(sample)

    def __call__(self, args: list[str]):
        result = run(*args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
        return result

    def path(self, name: str) -> Path:
        return self.folder / name

    @staticmethod
    def option(args: list[str], name: str) -> str:
        """The value of ``name`` (e.g. ``-o``) in a command."""
        return args[args.index(name) + 1]


@pytest.fixture
def sample_run(tmp_path, monkeypatch):
    def make(sample: str) -> SampleRun:
        run = SampleRun(sample, tmp_path)
        monkeypatch.chdir(tmp_path)
        return run

    return make
