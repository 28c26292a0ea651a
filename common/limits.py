"""Process resource limits raised at start.

Containers commonly start with a soft limit of 1024 open files and a hard limit of 1048576 (or
at least 4096). Go programs, pilot-agent and Envoy among them, raise the soft limit to the hard
limit at start (Go's runtime does it since 1.19); a Python process keeps 1024 unless it asks,
and then a few hundred idle connections or in-flight forwards exhaust its file table. Every
long-running pilotfish command calls `raise_open_files_limit()` first.
"""

from __future__ import annotations

import resource


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return the soft limit now in force.

    Never fails: where the kernel refuses (it should not, lowering nothing and staying within
    the hard limit), the current soft limit is returned and the caller sizes its bounds by it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # RLIM_INFINITY is refused for NOFILE (it is capped by fs.nr_open); keep a finite value
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE in force: what bounds sized by file descriptors are derived from."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
