"""The copy on disk of a resource the agent serves: saved after every swap, served at start.

An agent restarted while the control plane is away serves what it had. The copy is written whole or not at all (common/atomic.py) and only after the
value was built and swapped in, so a resource that cannot serve never reaches the disk. One
that does not load at start (bytes that do not decode, an entry the type refuses) would fail
the same way at every start: it is renamed to `<path>.bad` (one kept, for a look) with one
warning, and the agent starts without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TypeVar

from pilotfish.common import atomic

from .resources import ResourceCache, ResourceType

log = logging.getLogger("pilotfish.xds")

V = TypeVar("V")


class SavedCopy:
    """Where one type's value is kept; an empty path keeps nothing."""

    def __init__(self, rtype: ResourceType[V], path: str) -> None:
        self.rtype: ResourceType[object] = rtype  # type: ignore[assignment]
        self.path = path

    def load(self) -> object | None:
        """At start: remove the temp files of interrupted saves, then the saved value, or None
        when there is none or it does not load (then it is moved aside)."""
        if not self.path:
            return None
        removed = atomic.remove_stale_temps(self.path)
        if removed:
            log.info("xds: removed %d temp file(s) of interrupted saves next to %s", removed, self.path)
        data = atomic.read(self.path)
        if data is None:
            return None
        try:
            value = self.rtype.from_bytes(data)
        except Exception as err:  # whatever is wrong with the file, it must not stop the start
            self._move_aside(err)
            return None
        log.info("xds: serving the saved %s from %s (%d bytes) until the control plane answers",
                 self.rtype.name, self.path, len(data))
        return value

    def _move_aside(self, err: Exception) -> None:
        bad = self.path + ".bad"
        try:
            os.replace(self.path, bad)
            where = f"moved to {bad}"
        except OSError as move_err:
            where = f"cannot move it to {bad} ({move_err.strerror or move_err})"
        log.warning("xds: the saved %s %s does not load (%s: %s): %s; starting without it",
                    self.rtype.name, self.path, type(err).__name__, err, where)

    def save(self, value: object) -> None:
        """After the swap. A value that serves but cannot be saved is still ACKed: the copy is
        for restarts, and the control plane is there."""
        if not self.path:
            return
        try:
            atomic.write_atomic(self.path, self.rtype.to_bytes(value))
        except OSError as err:
            log.warning("xds: cannot save the %s to %s: %s", self.rtype.name, self.path, err.strerror or err)


def serve_saved(cache: ResourceCache, subscriptions: Iterable[SavedCopy]) -> int:
    """At start, before the control plane answers: serve the copies saved by an earlier run
    (those that load; the others are moved aside). Returns how many serve."""
    loaded = 0
    for subscription in subscriptions:
        value = subscription.load()
        if value is not None:
            cache.swap(subscription.rtype.type_url, "saved", value)
            loaded += 1
    return loaded
