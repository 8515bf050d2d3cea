"""The kinds of failure a user sees, each with its exit code and one line on stderr.

0 ok; 1 a check ran and failed (``CheckFailed``); 2 usage, input or environment (``UserError``, and
the environment failures ``environment_failure`` recognises: a full disk, a permission, memory); 3 an
internal error, a bug in moe-export (anything else).
"""

from __future__ import annotations

import errno
import os

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
DEBUG_ENV = "MOE_EXPORT_DEBUG"  # set to 1 for the traceback of an internal error (as --debug does)


class UserError(Exception):
    """Bad usage or bad input (unknown model, unreadable file, impossible config). Exit code 2."""

    exit_code = EXIT_USAGE


class CheckFailed(Exception):
    """A check ran and did not pass (e.g. parity). Exit code 1."""

    exit_code = EXIT_CHECK_FAILED


def one_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters: how a failure we report
    (rather than raise) is shown in a table cell or a one-line error."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# errno values that describe the machine (disk, permissions, limits), not a bug
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOMEM,
    errno.EMFILE,
    errno.ENFILE,
    errno.EIO,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.ETXTBSY,
}
_OUT_OF_MEMORY = ("not enough memory", "can't allocate memory", "failed to allocate memory", "out of memory")


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def wrapped_user_error(e: BaseException) -> UserError | None:
    """A UserError some library wrapped on its way out (torch.export tracing a layer that refuses its
    configuration raises its own error type, caused by ours)."""
    return next((c for c in _chain(e) if isinstance(c, UserError)), None)


def environment_failure_in(text: str) -> str | None:
    """The environment failure a subprocess's message names (``os.strerror``'s wording, e.g. "No space
    left on device"), lower-cased; None if it names none."""
    return next((os.strerror(n).lower() for n in sorted(_ENVIRONMENT_ERRNOS) if os.strerror(n) in text), None)


def environment_failure(e: BaseException) -> str | None:
    """One line for a failure of the machine rather than of moe-export (a full disk, a read-only or
    forbidden path, memory), found anywhere in the exception's cause chain; None otherwise."""
    for c in _chain(e):
        if isinstance(c, OSError) and c.errno in _ENVIRONMENT_ERRNOS:
            where = f" ({c.filename})" if c.filename else ""
            return f"{os.strerror(c.errno).lower()}{where}"
        if isinstance(c, MemoryError) or (
            isinstance(c, RuntimeError) and any(m in str(c).lower() for m in _OUT_OF_MEMORY)
        ):
            return f"out of memory: {one_line(c)}"
    return None
