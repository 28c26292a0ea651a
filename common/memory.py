"""Giving freed heap back to the system after a large value is replaced.

A replaced lookup table and the decoded message it came from are several times the table's wire
size (~8 MB at 10,000 services); glibc keeps such freed heap for reuse, so without a trim the
agent's RSS stays 4-6 MB higher at 10,000 services (bench/agent_bench.py).
"""

from __future__ import annotations

import ctypes

# glibc's malloc_trim (absent from musl, where this does nothing)
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_freed_memory() -> None:
    """Hand the pages freed by a swap back to the system."""
    if _malloc_trim is not None:
        _malloc_trim(0)
