"""The console every command writes to, the progress handler it installs on the library's loggers,
and ``emit``: the one way a command writes its report (human-readable, JSON, or both).

Only click and rich are imported here (rich inside the functions), so ``--help`` stays instant.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import re
import sys

import click

from exporter.errors import UserError
from exporter.progress import MESSAGE, PHASE, ROOT, SECONDS
from exporter.progress import phase as library_phase

# --- the library names its arguments; the CLI shows its options --------------------------------------

_ARGUMENT = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def _options(ctx: click.Context | None) -> dict[str, click.Option]:
    """Every option the CLI has, by parameter name and by long flag (``capacity_factors`` for
    ``--capacity-factors``): the running command's first, then every other command's."""
    return {} if ctx is None else _option_table(ctx.command, ctx.find_root().command)


@functools.lru_cache(maxsize=16)
def _option_table(command: click.Command, root: click.Command) -> dict[str, click.Option]:
    """``_options`` of one command under one CLI, walked once (notes and JSON reports ask per string)."""
    found: dict[str, click.Option] = {}
    ctx = click.Context(root)

    def add(command: click.Command) -> None:
        for param in command.params:
            if isinstance(param, click.Option):
                for key in (param.name, *(o.lstrip("-").replace("-", "_") for o in param.opts if o.startswith("--"))):
                    found.setdefault(key, param)
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                if (sub := command.get_command(ctx, name)) is not None:
                    add(sub)

    add(command)
    add(root)
    return found


def as_options(text: str, ctx: click.Context | None = None) -> str:
    """A library message in the CLI's words: an argument it names in backticks (`name`, `name=value`)
    becomes the option that sets it (``--name``, ``--name value``; a flag ``--name``, or ``--no-name``
    for ``=False``). What no option sets stays as written."""
    if "`" not in text:
        return text
    options = _options(ctx or click.get_current_context(silent=True))

    def option(match: re.Match) -> str:
        name, value = match.groups()
        param = options.get(name)
        if param is None:
            return match.group(0)
        flag = max(param.opts, key=len)
        if param.is_flag:
            if value in (None, "True"):
                return flag
            if value == "False" and param.secondary_opts:
                return max(param.secondary_opts, key=len)
            return match.group(0)
        return flag if value is None else f"{flag} {value}"

    return _ARGUMENT.sub(option, text)


def _in_cli_words(data):
    """``as_options`` over every string of a JSON report."""
    if isinstance(data, str):
        return as_options(data)
    if isinstance(data, dict):
        return {k: _in_cli_words(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_in_cli_words(v) for v in data]
    return data


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


STDOUT_CLOSED = "the report could not be written: stdout is closed (give it a file or pipe, or use --json FILE)"


def _broken_pipe():
    raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def console(stderr: bool = False):
    if not stderr and sys.stdout is None:  # Python's stdout when the command started with it closed
        raise UserError(STDOUT_CLOSED)
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    out.on_broken_pipe = _broken_pipe  # rich would exit 1 in silence; the CLI reports it (exit 2)
    if not out.is_terminal:  # pipes and files: long lines rather than wrapped table cells
        out.width = 200
    return out


class ProgressHandler(logging.Handler):
    """Draws the library's progress (``exporter.progress``) on stderr: a phase as a spinner on a
    terminal (a start line elsewhere) and a ``✓ message (1.2s)`` line when it ends; nested phases
    update the spinner's text; any other record is a dim line (a warning yellow)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.out = console(stderr=True)
        self.open: list[str] = []  # the phases running, outermost first
        self.status = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = getattr(record, PHASE, None)
            if kind == "start":
                self._start(getattr(record, MESSAGE))
            elif kind in ("end", "abort"):
                self._finish(getattr(record, MESSAGE), getattr(record, SECONDS, None))
            elif record.levelno >= logging.WARNING:
                self.out.print(f"[yellow]warning:[/yellow] {escape(as_options(record.getMessage()))}", soft_wrap=True)
            else:
                self.out.print(f"[dim]  {escape(as_options(record.getMessage()))}[/dim]")
        except Exception:  # a closed stderr must not turn progress into a failure
            self.handleError(record)

    def _start(self, message: str) -> None:
        self.open.append(message)
        if not self.out.is_terminal:
            self.out.print(f"... {escape(message)}")
        elif self.status is None:
            self.status = self.out.status(escape(message) + " ...")
            self.status.start()
        else:
            self.status.update(escape(message) + " ...")

    def _finish(self, message: str, seconds: float | None) -> None:
        if message in self.open:
            del self.open[len(self.open) - 1 - self.open[::-1].index(message)]
        if self.status is not None:
            if self.open:
                self.status.update(escape(self.open[-1]) + " ...")
            else:
                self.status.stop()
                self.status = None
        if seconds is not None:
            self.out.print(f"[green]✓[/green] {escape(message)} [dim]({seconds:.1f}s)[/dim]")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        super().close()


@contextlib.contextmanager
def progress_shown():
    """Installs a ``ProgressHandler`` on the library's root logger for the block (a command's run),
    and removes it after: the library itself never prints."""
    logger, handler = logging.getLogger(ROOT), ProgressHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def phase(message: str):
    """A phase of a command's own (loading, importing): shown as the library's phases are."""
    return library_phase(logging.getLogger(f"{ROOT}.commands"), message)


def write_json_out(dest: str, data) -> None:
    if dest == "-":
        if sys.stdout is None:
            raise UserError(STDOUT_CLOSED)
        click.echo(json.dumps(data, indent=2))
    else:
        from exporter.fileio import write_json

        write_json(dest, data)


def emit(result, printer, json_out: str | None, data=None) -> None:
    """Every command's report: the human-readable one (unless JSON goes to stdout), then the JSON
    report if asked for: ``data``, or ``result.to_dict()``."""
    if json_out != "-":
        printer(result)
    if json_out:
        write_json_out(json_out, _in_cli_words(result.to_dict() if data is None else data))
