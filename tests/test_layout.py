"""The structure the README's layout section describes, checked: no module imports another
module's private name, nothing imports the CLI module, each plugin folder has the files the
registry loads, and the test tree mirrors the source tree. (The import layers themselves are
import-linter's contracts in pyproject.toml, run by .ci/run.)"""

from __future__ import annotations

import ast
from pathlib import Path

import plugins

ROOT = Path(__file__).resolve().parents[1]
OURS = ("exporter", "plugins", "cli")
SOURCES = [ROOT / "cli.py", *sorted((ROOT / "exporter").rglob("*.py")), *sorted((ROOT / "plugins").rglob("*.py"))]
ELSEWHERE = [*sorted((ROOT / "benchmarks").rglob("*.py")), *sorted((ROOT / "samples").rglob("*.py"))]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in SOURCES + ELSEWHERE + sorted((ROOT / "tests").rglob("*.py")):
        for line, module, names in _imports(path):
            if module.split(".")[0] not in OURS:
                continue
            bad = [n for n in names if _private(n)] + [p for p in module.split(".") if _private(p)]
            if bad:
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} {bad}")
    assert not found, "\n".join(found)


def test_the_library_never_imports_the_cli():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in SOURCES[1:]
        for line, module, _ in _imports(path)
        if module == "cli" or module.startswith("cli.")
    ]
    assert not found, found


def test_every_registered_plugin_folder_has_its_parts():
    for entry in plugins.PLUGINS:
        folder = ROOT / "plugins" / entry
        for part in ("spec", "reference", "function", "kernels", "shapes", "trt"):
            assert (folder / f"{part}.py").is_file(), (entry, part)
    folders = {p.parent.name for p in (ROOT / "plugins").glob("*/spec.py")}
    assert folders == set(plugins.PLUGINS), "a plugin folder is missing from plugins.PLUGINS (or the reverse)"


def test_tests_mirror_the_source_tree():
    """Every test folder under tests/exporter and tests/plugins names a source package."""
    for tests in ((ROOT / "tests" / "exporter"), (ROOT / "tests" / "plugins")):
        for folder in (p for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__"):
            source = ROOT / folder.relative_to(ROOT / "tests")
            assert (source / "__init__.py").is_file(), f"{folder.relative_to(ROOT)} mirrors no package"


def test_command_bodies_are_short():
    """A command parses its options and makes one library call: at most 25 lines past its docstring."""
    long = []
    for path in sorted((ROOT / "exporter" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            if not any("command" in ast.unparse(d) or "group" in ast.unparse(d) for d in node.decorator_list):
                continue
            body = node.body[1:] if ast.get_docstring(node) else node.body
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if lines > 25:
                long.append(f"{path.name}:{node.name}: {lines} lines")
    assert not long, long


# Documents a bundle carries (its README, the Triton repository's how-to): their command lines are for a
# shell on the target, not messages of the library.
DOCUMENTS = {"exporter/deploy/readme.py", "exporter/deploy/triton_repo.py"}


def _cli_flags() -> set[str]:
    import click

    from cli import main

    flags, ctx = set(), click.Context(main)

    def walk(command: click.Command) -> None:
        for param in command.params:
            flags.update(o for o in (*param.opts, *getattr(param, "secondary_opts", ())) if o.startswith("--"))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name))

    walk(main)
    return flags - {"--help", "--version"}


def _messages(path: Path):
    """Every string literal of a module but its docstrings (f-strings by their literal parts)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_library_speaks_of_arguments_and_only_commands_of_flags():
    """A library error or note names the function's arguments (`output_dir`, `precision=int8`); the CLI
    shows them as its options (exporter.commands.console.as_options). No module outside
    exporter/commands imports it or names one of the CLI's flags in a message."""
    import re

    flags = _cli_flags()
    assert {"--routing-outputs", "--verify-key", "--no-bf16-dispatch", "--onnx"} <= flags  # the walk found them
    library = [p for p in sorted((ROOT / "exporter").rglob("*.py")) if "commands" not in p.relative_to(ROOT).parts]
    named, imported = [], []
    for path in library:
        where = str(path.relative_to(ROOT))
        imported += [f"{where}:{line}" for line, module, _ in _imports(path) if module.startswith("exporter.commands")]
        if where in DOCUMENTS:
            continue
        for line, text in _messages(path):
            named += [f"{where}:{line}: {m}" for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text) if m in flags]
    assert not imported, imported
    assert not named, "\n".join(named)
