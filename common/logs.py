"""Logging for every pilotfish command: one line per event, UTC time with milliseconds, level,
message (Istio's layout), or one JSON object per line for machines (`--log-format json`).
Kept free of heavy imports: `pilotfish init` starts with it."""

from __future__ import annotations

import json
import logging
import sys
import time


def _stamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _stamp(record)


class _JsonFormatter(logging.Formatter):
    """Istio's JSON log fields: time, level, scope (the logger below `pilotfish.`), msg."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _stamp(record),
            "level": record.levelname.lower(),
            "scope": record.name.removeprefix("pilotfish.") or "default",
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_Formatter("%(asctime)s\t%(levelname)s\t%(message)s"))
    root = logging.getLogger("pilotfish")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def istio_level(spec: str) -> str | None:
    """Istio's `--log_output_level=default:debug,dns:info` (or a bare level) as the Python level
    name of the default scope; None when it names none."""
    for part in spec.split(","):
        scope, _, level = part.rpartition(":")
        if scope in ("", "default") and level:
            level = {"warn": "warning", "none": "critical", "fatal": "critical"}.get(level, level)
            return level if level in ("debug", "info", "warning", "error", "critical") else None
    return None
