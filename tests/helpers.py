"""What several test files share: running the CLI in this process and checking its one-line errors
(``from tests.helpers import run``; conftest has pytest rewrite the asserts here as in a test module)."""

from __future__ import annotations

from click.testing import CliRunner, Result

from cli import main


def run(*args, env: dict[str, str] | None = None, catch_exceptions: bool = True) -> Result:
    """``moe-export ARGS`` through click's test runner, each argument as its ``str`` (paths, numbers);
    ``env`` overrides environment variables for the call; the result holds the exit code and output."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=catch_exceptions)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """The CLI refused with exit code 2 and one ``error:`` line (no traceback) holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
