#!/usr/bin/env python3
"""Start-up benchmark: how long `pilotfish --version` and `pilotfish --help` take, against the
bare interpreter of the same venv (`python -c pass`) measured in the same run: the part
pilotfish adds. Each figure is the median of RUNS fresh processes (wall time of the whole exec).

Why it matters: `--version` is what image checks and operators run, and before issue 8 it
imported every subcommand (trio, grpc, cryptography): 0.4-0.7 s. Target: under 0.15 s.
Run as `make bench` (`.venv/bin/python bench/startup_bench.py`).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchlib import git_commit, pilotfish_exe

RUNS = 11
TARGET_S = 0.15


def wall(argv: list[str]) -> tuple[float, float, float]:
    """(median, min, max) seconds of RUNS executions of argv."""
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times)


def main() -> int:
    exe = pilotfish_exe()
    print(f"pilotfish start-up benchmark  commit {git_commit()}  median of {RUNS} runs")
    base = wall([sys.executable, "-c", "pass"])
    print(f"  python -c pass        {base[0] * 1000:6.0f} ms ({base[1] * 1000:.0f}-{base[2] * 1000:.0f})  the interpreter alone")
    ok = True
    for args in (["--version"], ["--help"]):
        median, low, high = wall([exe, *args])
        met = median <= TARGET_S
        ok &= met
        print(f"  pilotfish {' '.join(args):11s} {median * 1000:6.0f} ms ({low * 1000:.0f}-{high * 1000:.0f})  "
              f"{median / base[0]:.1f}x the interpreter  [{'met' if met else 'MISSED'}: <= {TARGET_S * 1000:.0f} ms]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
