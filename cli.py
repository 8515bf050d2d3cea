"""moe-export: Vision MoE models from PyTorch to portable ONNX (and TensorRT), with routing-aware parity.

This file only defines the click group. Each command lives in ``exporter/commands/`` and is loaded
when it is run (or listed), so ``--help`` is instant; a command whose module fails to import is
still listed, and says why in its help and when run, while the rest of the CLI works (as
Polygraphy's tool registry does).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
import traceback

import click

from exporter.errors import (
    DEBUG_ENV,
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL,
    EXIT_USAGE,
    CheckFailed,
    UserError,
    environment_failure,
    one_line,
    wrapped_user_error,
)

#: Command name -> "module:attribute" of its click command, in the order ``--help`` lists them.
COMMANDS = {
    "models": "exporter.commands.models:models",
    "import": "exporter.commands.import_vmoe:import_group",
    "export": "exporter.commands.export:export",
    "rewrite": "exporter.commands.rewrite:rewrite",
    "validate": "exporter.commands.validate:validate",
    "demo": "exporter.commands.demo:demo",
    "inspect": "exporter.commands.inspect:inspect_group",
    "sweep": "exporter.commands.sweep:sweep_group",
    "bench": "exporter.commands.bench:bench",
    "build": "exporter.commands.build:build_group",
    "keygen": "exporter.commands.keygen:keygen",
}


def _unavailable(name: str, error: Exception) -> click.Command:
    reason = f"unavailable: {type(error).__name__}: {error}"

    def run(**_):
        raise UserError(f"`moe-export {name}` is {reason}")

    return click.Command(name, callback=run, help=f"({reason})", short_help=f"({reason})"[:70])


class _Cli(click.Group):
    """Loads commands from ``COMMANDS`` on demand, and turns library errors into one line on stderr
    and the documented exit codes."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:  # a missing dependency: this command says so, the others still work
            return _unavailable(name, e)

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            from exporter.commands.console import progress_shown

            with progress_shown():  # the library logs its progress; the CLI draws it on stderr
                result = super().invoke(ctx)
            if sys.stdout is not None:
                sys.stdout.flush()  # a report that cannot be written fails here, not silently at exit
            return result
        except click.UsageError as e:  # one line, as every other input error, with where to look
            where = e.ctx.command_path if e.ctx else ctx.command_path
            click.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
            ctx.exit(EXIT_USAGE)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:
            if debug:
                traceback.print_exc()
            if isinstance(e, OSError) and e.errno == errno.EPIPE:
                _drop_stdout()
                click.echo("error: the report could not be written: stdout's reader closed the pipe", err=True)
                ctx.exit(EXIT_USAGE)
            from exporter.commands.console import as_options  # the library names arguments; the CLI, options

            if (user_error := wrapped_user_error(e)) is not None:
                click.echo(f"error: {as_options(str(user_error), ctx)}", err=True)
                ctx.exit(EXIT_USAGE)
            if isinstance(e, CheckFailed):
                click.echo(f"FAILED: {as_options(str(e), ctx)}", err=True)
                ctx.exit(EXIT_CHECK_FAILED)
            if (reason := environment_failure(e)) is not None:
                click.echo(f"error: {reason}", err=True)
                ctx.exit(EXIT_USAGE)
            click.echo(
                f"internal error (a bug in moe-export; please report it): {one_line(e)}"
                + ("" if debug else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"),
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


def _drop_stdout() -> None:
    """Points stdout at /dev/null after a broken pipe, so that Python's flush at exit stays quiet."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no file behind it (a test runner's buffer)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="moe-export")
@click.option("--debug", is_flag=True, help=f"Print the traceback of a failure (also {DEBUG_ENV}=1).")
def main(debug):
    """Export Vision Mixture-of-Experts models (V-MoE, Soft-MoE) to portable ONNX and check parity,
    routing decisions included.

    \b
    Example:
      moe-export models
      moe-export export --model vmoe-s32-last2-e8 --routing-outputs -o vmoe.onnx
      moe-export validate vmoe.onnx
    """


if __name__ == "__main__":
    sys.exit(main())
