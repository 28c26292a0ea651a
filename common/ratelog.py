"""One log line per interval for a recurring problem, with how many were left out.

A flood (connections over a limit, queries that fail the same way, EMFILE on every accept) must
not become a line, let alone a traceback, per occurrence: the log would cost more than the
problem, and hide everything else. Counting every occurrence is the metrics' job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

LOG_EVERY = 10.0  # seconds between two lines about the same problem


class RateLimitedLog:
    """Logs through `logger` at most once per `interval`; the next line says how many it skipped."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._skipped = 0

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        """Log unless a line went out less than an interval ago. `exc_info` is for bugs caught
        to keep a server up: one traceback per interval is what a developer needs."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._skipped += 1
            return
        if self._skipped:
            msg += " (%d similar suppressed)"
            args = (*args, self._skipped)
        self._last, self._skipped = now, 0
        self._logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
