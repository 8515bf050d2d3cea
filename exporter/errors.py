"""The two kinds of failure a user sees without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad usage or bad input (unknown model, unreadable file, impossible config). Exit code 2."""

    exit_code = 2


class CheckFailed(Exception):
    """A check ran and did not pass (e.g. parity). Exit code 1."""

    exit_code = 1


def one_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters: how a failure we report
    (rather than raise) is shown in a table cell or a one-line error."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
