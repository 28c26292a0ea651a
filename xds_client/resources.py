"""Resource types and the resource cache: what the ADS stream delivers, and who is told.

A `ResourceType` is pure: it turns the resources of one type (as the server sent them) into
the value the agent serves, or raises to reject them; and it turns that value into bytes and
back for the copy kept on disk. It never swaps, saves or logs: the shell (transport.py) does
that, in one order for every type (docs/architecture.md "A pushed resource until it serves").

The `ResourceCache` holds the value being served per type and tells its watchers when one is
swapped in. The DNS proxy watches the NameTable today; SDS, the xDS proxy and ProxyConfig
plug in the same way, each with its own type.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

from google.protobuf.any_pb2 import Any

log = logging.getLogger("pilotfish.xds")

V = TypeVar("V")
V_co = TypeVar("V_co", covariant=True)


class ResourceError(ValueError):
    """Resources that cannot be used; the message goes back to the server in the NACK."""


class CacheKey(Protocol[V_co]):
    """What a value is kept under in the ResourceCache, typed by the value: an xDS type, or a
    value the agent makes itself (the workload certificate)."""

    @property
    def type_url(self) -> str: ...


class ResourceType(CacheKey[V], Protocol[V]):
    """How one xDS type becomes a value the agent serves."""

    @property
    def name(self) -> str:
        """What logs call it ("name table")."""
        ...

    def decode(self, resources: Sequence[Any]) -> V:
        """Decode, validate and build the value from every resource of the type (never empty);
        raise (anything) to reject them."""
        ...

    def to_bytes(self, value: V) -> bytes:
        """The value as kept on disk."""
        ...

    def from_bytes(self, data: bytes) -> V:
        """The value from its copy on disk; raise when it does not load."""
        ...


def rejection(err: BaseException) -> str:
    """The NACK's message for what a type raised: a ResourceError's own words, else the
    exception's type and message (a resource must never end the stream or the agent)."""
    return str(err) if isinstance(err, ResourceError) else f"{type(err).__name__}: {err}"


def first_of_type(resources: Sequence[Any], type_url: str) -> bytes:
    """The serialized first resource (Istio's rule for the agent-owned types:
    docs/istio-compat.md); ResourceError if it is of another type."""
    first = resources[0]
    if first.type_url != type_url:
        raise ResourceError(f"resource has type {first.type_url!r}, want {type_url!r}")
    return bytes(first.value)


@dataclass(frozen=True)
class Served(Generic[V]):
    """A value being served, with where it came from."""

    version: str  # the server's version, or "saved" for the copy loaded from disk
    value: V


Watcher = Callable[[V], None]


class ResourceCache:
    """The value being served per type, typed by its ResourceType; swapped whole, never edited.

    Watchers are called on the swapping thread, in the order they were added, after the value
    is in place. A watcher that raises is logged and does not stop the others: the value is
    already swapped in, and telling the server otherwise would be a lie.
    """

    def __init__(self) -> None:
        self._served: dict[str, Served[object]] = {}
        self._watchers: dict[str, list[Callable[[object], None]]] = {}
        self._lock = threading.Lock()

    def get(self, key: CacheKey[V]) -> Served[V] | None:
        return cast("Served[V] | None", self._served.get(key.type_url))

    def watch(self, key: CacheKey[V], watcher: Watcher[V]) -> None:
        self._watchers.setdefault(key.type_url, []).append(cast("Callable[[object], None]", watcher))

    def swap(self, type_url: str, version: str, value: object) -> None:
        """Serve `value` from now on and tell the watchers."""
        with self._lock:  # one swap at a time: watchers see values in the order they arrive
            self._served[type_url] = Served(version, value)
            for watcher in self._watchers.get(type_url, ()):
                try:
                    watcher(value)
                except Exception:
                    log.exception("xds: a watcher of %s failed on version %r", type_url, version)
