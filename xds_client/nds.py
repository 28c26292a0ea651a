"""The NameTable type (Istio's NDS): decoding, the last good table, and its copy on disk.

The agent consumes NDS itself (it is never passed to Envoy). A pushed table goes: decode, build
and swap in through `apply` (the DNS proxy builds its lookup table, which validates every entry,
and swaps it in only when that worked), save, ACK. Anything that fails on the way raises, which
the stream turns into a NACK: the table in use keeps serving and nothing is saved, so a table
that cannot be served can never reach the disk and crash every later start. The saved table
lets a restart without a control plane serve at once; one that does not load is moved aside.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

from google.protobuf.any_pb2 import Any

from pilotfish.common import atomic as persist
from .proto.istio.networking.nds.v1.nds_pb2 import NameTable
from .stream import ResourceError, first_value

log = logging.getLogger("pilotfish.xds")

TYPE_URL = "type.googleapis.com/istio.networking.nds.v1.NameTable"

# glibc's malloc_trim (absent from musl): see _release_freed_memory.
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def _release_freed_memory() -> None:
    """Hand the pages freed by a table swap back to the system.

    The replaced lookup table and the decoded message are several times the table's wire size
    (~8 MB at 10,000 services); glibc keeps such freed heap for reuse, so without this the
    agent's RSS stays 4-6 MB higher at 10,000 services (bench/agent_bench.py).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


class NameTableHolder:
    """Receives NameTables (on grpc's thread), installs and saves them.

    Only the serialized form of the last table is kept (for /debug/ndsz and the disk copy): the
    parsed message costs several times its size in memory and the lookup table already holds
    what serving needs.
    """

    def __init__(self, apply: Callable[[bytes], object], cache_path: str = "") -> None:
        self.apply = apply
        self.cache_path = cache_path
        self._serialized: bytes | None = None
        self.version = ""

    @property
    def table(self) -> NameTable | None:
        """The last table installed, decoded again (for debugging views; not on a hot path)."""
        if self._serialized is None:
            return None
        return NameTable.FromString(self._serialized)

    def load_cached(self) -> bool:
        """At start: remove the temp files of interrupted saves, then install the table saved by
        an earlier run, if there is one that loads.

        One that does not (bytes that do not decode, an entry the lookup table refuses) would
        fail the same way at every start: it is renamed to `<path>.bad` (kept for a look, one
        at most) with one warning, and the agent starts without it.
        """
        if not self.cache_path:
            return False
        removed = persist.remove_stale_temps(self.cache_path)
        if removed:
            log.info("xds: removed %d temp file(s) of interrupted saves next to %s", removed, self.cache_path)
        data = persist.read(self.cache_path)
        if data is None:
            return False
        try:
            self._install(data, "saved")
        except Exception as err:  # whatever is wrong with the file, it must not stop the start
            self._move_aside(err)
            return False
        log.info("xds: serving the saved name table from %s (%d bytes) until the control plane answers",
                 self.cache_path, len(data))
        return True

    def _move_aside(self, err: Exception) -> None:
        bad = self.cache_path + ".bad"
        try:
            os.replace(self.cache_path, bad)
            where = f"moved to {bad}"
        except OSError as move_err:
            where = f"cannot move it to {bad} ({move_err.strerror or move_err})"
        log.warning("xds: the saved name table %s does not load (%s: %s): %s; starting without it",
                    self.cache_path, type(err).__name__, err, where)

    def on_response(self, version: str, resources: list[Any]) -> None:
        """The NDS handler of the ADS stream; whatever it raises becomes the NACK's message.

        Installed (built and swapped in) before it is saved: a table that does not build raises
        here with the old table still serving and the saved file untouched. A table that serves
        but cannot be saved is still ACKed (the disk copy is a convenience for restarts)."""
        data = first_value(resources, TYPE_URL)
        try:
            self._install(data, version)
        except Exception as err:  # any failure to decode or build: the NACK says which and why
            raise ResourceError(f"cannot decode or build the NameTable: {type(err).__name__}: {err}") from None
        if self.cache_path:
            try:
                persist.write_atomic(self.cache_path, data)
            except OSError as err:
                log.warning("xds: cannot save the name table to %s: %s", self.cache_path, err.strerror or err)
        _release_freed_memory()

    def _install(self, serialized: bytes, version: str) -> None:
        """`apply` reads the serialized table itself (entry by entry, without protobuf's one
        long decode) and swaps it in, or raises with the table in use unchanged."""
        self.apply(serialized)
        self._serialized = serialized
        self.version = version

