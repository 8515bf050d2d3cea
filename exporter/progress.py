"""Progress through ``logging``, as Polygraphy's logger and onnx_ir's passes report theirs.

The library never draws anything: a long piece of work is a ``phase`` (two INFO records on the module's
logger, one when it starts and one with the seconds it took), and a detail inside it (a checkpoint shard
read, a TensorRT build phase) is an ordinary INFO record. With no handler configured, Python drops INFO
records, so a library user sees nothing unless they ask (``logging.basicConfig(level=logging.INFO)``
prints one line per record). The CLI installs a handler that turns phases into a spinner and a
``✓ … (1.2s)`` line (``exporter.commands.console``).

Every record carries ``extra`` fields the handler reads: ``moe_phase`` ("start", "end" or "abort"),
``moe_message`` (the phase's text, without the log line's decoration) and, at the end, ``moe_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The package's root logger: every module logs below it (``logging.getLogger(__name__)``).
ROOT = "exporter"

PHASE = "moe_phase"
MESSAGE = "moe_message"
SECONDS = "moe_seconds"


@contextmanager
def phase(logger: logging.Logger, message: str) -> Iterator[None]:
    """Logs ``message`` when the block starts and again with its seconds when it ends; a block left by
    an exception logs an "abort" at DEBUG (the handler stops its spinner, nothing is claimed done)."""
    logger.info("%s ...", message, extra={PHASE: "start", MESSAGE: message})
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.debug("%s: stopped", message, extra={PHASE: "abort", MESSAGE: message})
        raise
    seconds = time.perf_counter() - start
    logger.info("%s (%.1fs)", message, seconds, extra={PHASE: "end", MESSAGE: message, SECONDS: seconds})


class OncePerPhase:
    """Logs a line per phase of a progress stream that repeats its phases with counters
    ("Building (3/10)", "Building (4/10)"): each phase once, when it starts."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.seen = logger, set()

    def __call__(self, text: str) -> None:
        name = text.rsplit(" (", 1)[0]
        if name not in self.seen:
            self.seen.add(name)
            self.logger.info("%s", text)
