"""Logging for every pilotfish command: one line per event, UTC time with milliseconds, level,
message (Istio's layout). Kept free of heavy imports: `pilotfish init` starts with it."""

from __future__ import annotations

import logging
import sys
import time


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s\t%(levelname)s\t%(message)s"))
    root = logging.getLogger("pilotfish")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
