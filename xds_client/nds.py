"""The NameTable type (Istio's NDS): what the agent's DNS proxy serves.

The agent consumes NDS itself (it is never passed to Envoy). The table is built by a function
the agent gives (the DNS proxy's builder, which reads the serialized table entry by entry and
validates every entry), so this package needs nothing of the DNS proxy; what it keeps is the
serialized table (for /debug/ndsz and the copy on disk) beside what was built from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.any_pb2 import Any

from .proto.istio.networking.nds.v1.nds_pb2 import NameTable
from .resources import ResourceError, first_of_type

TYPE_URL = "type.googleapis.com/istio.networking.nds.v1.NameTable"

T = TypeVar("T")


@dataclass(frozen=True)
class BuiltTable(Generic[T]):
    """A name table as served: its wire form and what the builder made of it."""

    serialized: bytes
    built: T

    def message(self) -> NameTable:
        """The table decoded again (for debugging views; not on a hot path)."""
        return NameTable.FromString(self.serialized)


class NameTableType(Generic[T]):
    """NDS as a resource type; `build` raises on a table that cannot be served."""

    type_url = TYPE_URL
    name = "name table"

    def __init__(self, build: Callable[[bytes], T]) -> None:
        self.build = build

    def decode(self, resources: Sequence[Any]) -> BuiltTable[T]:
        return self.from_bytes(first_of_type(resources, TYPE_URL))

    def from_bytes(self, serialized: bytes) -> BuiltTable[T]:
        """The table from its wire form (pushed or saved)."""
        try:
            return BuiltTable(serialized, self.build(serialized))
        except Exception as err:  # any failure to decode or build: the NACK says which and why
            raise ResourceError(f"cannot decode or build the NameTable: {type(err).__name__}: {err}") from None

    def to_bytes(self, value: BuiltTable[T]) -> bytes:
        return value.serialized
