"""Building a lookup table beside the threads that serve the current one, and freeing the one it
replaces, without stopping them.

Python runs one thread at a time (the GIL). A thread that computes without pause keeps the GIL
for a whole switch interval (5 ms) before a waiting thread gets it, and takes it back as soon as
that thread makes a system call, which a query does at least twice (recvfrom, sendto). So a build
running flat out cut the UDP thread down to about a hundred queries a second: reloading 100,000
services delayed the median query by 1.1 s and overflowed the socket buffer
(bench/reload_bench.py, issue 7 item 19). Here the build pauses: after every WORK_SLICE of work it
sleeps REST, the GIL is free, and the serving threads answer everything that arrived meanwhile.
Serving keeps about REST / (WORK_SLICE + REST) of its capacity during a build (a third: tens of
thousands of queries a second, far above what a pod asks), no query waits much longer than a
slice, and the build takes that much longer.

No single step may hold the GIL long either; the pieces that did are gone: the table file is
parsed entry by entry (dns/tablefile.py), a table is spread over many small dicts and is never
seen by the garbage collector (dns/table.py), and a replaced table is emptied one shard at a
time by its last holder here (freed at once, a million services held the GIL for 0.2 s).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .table import LookupTable, NameInfo, TableBuilder
from .tablewire import name_table_entries

WORK_SLICE = 0.002  # seconds of building between pauses
REST = 0.001  # seconds the GIL is left to the serving threads at each pause
CHECK_EVERY = 64  # entries between looks at the clock (an entry costs a few microseconds)
READERS_GONE = 1.0  # seconds to wait for the last reader of a replaced table before letting it go


class Pacer:
    """Call it often; it sleeps REST once WORK_SLICE has passed since the last pause."""

    def __init__(
        self,
        work: float = WORK_SLICE,
        rest: float = REST,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._work, self._rest, self._clock, self._sleep = work, rest, clock, sleep
        self._since = clock()

    def __call__(self) -> None:
        if self._clock() - self._since >= self._work:
            self._sleep(self._rest)
            self._since = self._clock()


def table_items(table: Any) -> Iterable[tuple[str, NameInfo]]:
    """(host, NameInfo) pairs of a serialized NameTable (read entry by entry), a NameTable
    message, its `table` map, any mapping of NameInfo-likes, or an iterable of such pairs (a
    table file being read)."""
    if isinstance(table, (bytes, bytearray)):
        return name_table_entries(bytes(table))
    entries = getattr(table, "table", table)
    items = getattr(entries, "items", None)
    return items() if callable(items) else entries  # type: ignore[no-any-return]


def build_beside(
    entries: Iterable[tuple[str, NameInfo]],
    namespace: str,
    domain: str,
    search: Sequence[str],
    pause: Callable[[], None] | None = None,
) -> LookupTable:
    """LookupTable.build, pausing as it goes (a TableError from an entry leaves nothing built)."""
    pause = pause or Pacer()
    builder = TableBuilder(namespace, domain)
    add = builder.add
    for n, (host, info) in enumerate(entries):
        add(host, info)
        if not n % CHECK_EVERY:
            pause()
    return builder.finish(search)


def free_replaced(state: Any, pause: Callable[[], None] | None = None) -> bool:
    """Empty `state.table` piecemeal once nothing else holds it; True if it was.

    `state` is the ServingState just replaced, passed by a caller that holds it in one variable.
    Readers hold the state they loaded in a local variable while they use its table, so its
    reference count says when the last one is done (CPython counts every strong reference; a new
    reader cannot find the state any more). If someone else keeps the table (a test, a debug
    view) or a reader does not let go within READERS_GONE, the table is left to be freed whole.
    """
    table = state.table
    if table is None:
        return False
    # References: the caller's variable, this parameter, getrefcount's argument.
    if not _wait_until(lambda: sys.getrefcount(state) <= 3):
        return False
    state.table = None
    # References: this local, getrefcount's argument.
    if sys.getrefcount(table) > 2:
        return False
    pause = pause or Pacer()
    for _ in table.release():
        pause()
    return True


def _wait_until(done: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + READERS_GONE
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
