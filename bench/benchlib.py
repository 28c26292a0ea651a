"""Helpers every benchmark uses: where pilotfish is, which commit and tool versions were measured,
medians that skip missing samples, the raw figures written out."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pilotfish_exe() -> str:
    """The `pilotfish` of this virtualenv (or the repository's .venv, or PATH)."""
    for cand in (Path(sys.executable).parent / "pilotfish", REPO / ".venv" / "bin" / "pilotfish"):
        if cand.exists():
            return str(cand)
    found = shutil.which("pilotfish")
    if not found:
        raise RuntimeError("pilotfish executable not found (run `make venv`)")
    return found


def git_commit(*paths: str) -> str | None:
    """HEAD, with "+dirty" when any of `paths` differs from it (the code being measured)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def tool_version(argv: list[str], pattern: str) -> str | None:
    """A tool's version, from the first group of `pattern` in its output."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    m = re.search(pattern, done.stdout + done.stderr)
    return m.group(1) if m else None


def med(xs: Iterable[float | None]) -> float | None:
    """Median of the samples that exist."""
    present = [x for x in xs if x is not None]
    return statistics.median(present) if present else None


def write_report(path: str | None, report: object) -> None:
    """The raw figures as JSON at `--json PATH` (nothing without it)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=1))
        print(f"raw figures written to {path}")
