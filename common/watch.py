"""Watching a file named by a setting, by polling: the one watcher of `pilotfish dns` (its table
file) and `pilotfish controlplane` (its mesh file).

Polling, not inotify: it needs no file descriptor per watch, sees a Kubernetes ConfigMap update
(a symlink swapped to a new directory) like any rename, and costs one stat() per interval. The
watcher never opens the file: what is at the path may be anything (docs/architecture.md, "Where
to look": the file is read, bounded, by whoever reloads it).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple, NoReturn

import trio

FILE_CHANGE = "file change"  # the reason given to the callback when the file changed


class Signature(NamedTuple):
    """What changes when a file is rewritten, replaced or touched.

    mtime_ns alone misses a rewrite of the same size within one tick of the kernel's coarse
    clock, and a tool that puts the old mtime back (`cp -p`, `rsync -t`); the inode changes when
    a new file is renamed over the old one; ctime_ns cannot be set by anyone and moves on every
    write, rename and chmod.
    """

    mtime_ns: int
    size: int
    inode: int
    ctime_ns: int


def file_signature(path: str) -> Signature | None:
    """The signature of what `path` names now (following symlinks), None while nothing is there
    or it cannot be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Signature(st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


async def watch_file(
    path: str,
    seen: Signature | None,
    interval: float,
    on_change: Callable[[str], Awaitable[None]],
    reload_signals: AsyncIterator[int] | None = None,
) -> NoReturn:
    """Forever (until cancelled): `await on_change(why)` when the signature of `path` is no longer
    `seen` (why is "file change"; a file that disappears or comes back is a change too), or at
    once when a signal arrives on `reload_signals` (why is its name, "SIGHUP").

    `seen` is the signature taken before the caller's first load, so that a change made while it
    loaded is seen. The file as it is when `on_change` is called counts as seen afterwards; the
    next look is `interval` seconds after `on_change` returns, so reloads never overlap.
    """
    while True:
        why = FILE_CHANGE
        with trio.move_on_after(interval) as idle:
            if reload_signals is None:
                await trio.sleep_forever()
            else:
                why = signal.Signals(await reload_signals.__anext__()).name
        current = file_signature(path)
        if idle.cancelled_caught and current == seen:
            continue
        seen = current
        await on_change(why)
