"""The two kinds of failure a user sees without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad usage or bad input (unknown model, unreadable file, impossible config). Exit code 2."""

    exit_code = 2


class CheckFailed(Exception):
    """A check ran and did not pass (e.g. parity). Exit code 1."""

    exit_code = 1
