"""The NameTable type (Istio's NDS): decoding, the last good table, and its copy on disk.

The agent consumes NDS itself (it is never passed to Envoy). A table that does not decode is
NACKed and the one in use stays; a good one is installed through `apply` (the DNS proxy swaps its
lookup table) and saved, so a restart without a control plane serves it at once.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

from google.protobuf.any_pb2 import Any
from google.protobuf.message import DecodeError

from . import persist
from .proto.istio.networking.nds.v1.nds_pb2 import NameTable
from .stream import unpack_first

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

    def __init__(self, apply: Callable[[NameTable], object], cache_path: str = "") -> None:
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
        """Install the table saved by an earlier run, if there is one that decodes."""
        if not self.cache_path:
            return False
        data = persist.read(self.cache_path)
        if data is None:
            return False
        table = NameTable()
        try:
            table.ParseFromString(data)
        except DecodeError as err:
            log.warning("xds: ignoring the saved name table %s: %s", self.cache_path, err)
            return False
        self._install(table, "saved", data)
        log.info("xds: serving the saved name table from %s (%d hosts) until the control plane answers",
                 self.cache_path, len(table.table))
        return True

    def on_response(self, version: str, resources: list[Any]) -> None:
        """The NDS handler of the ADS stream: ResourceError (a NACK) if it does not decode."""
        table = unpack_first(resources, NameTable, TYPE_URL)
        assert isinstance(table, NameTable)
        # Saved before it serves: once an answer from this table has been seen, a restart (even
        # one that follows at once, before grpc's thread would have got round to it) serves it too.
        if self.cache_path:
            try:
                persist.write_atomic(self.cache_path, resources[0].value)
            except OSError as err:
                log.warning("xds: cannot save the name table to %s: %s", self.cache_path, err.strerror or err)
        self._install(table, version, resources[0].value)
        del table
        _release_freed_memory()

    def _install(self, table: NameTable, version: str, serialized: bytes) -> None:
        self.apply(table)
        self._serialized = serialized
        self.version = version

