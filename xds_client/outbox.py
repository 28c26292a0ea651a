"""The requests waiting to go up one of the xDS proxy's upstream streams, in the order they came.

Two kinds share the stream: Envoy's, forwarded, and the agent's own (its subscriptions, its
ACKs and NACKs of the types it handles, its health reports). Envoy's are bounded: `forward`
blocks while MAX_FORWARDED requests or MAX_FORWARDED_BYTES wait, so a control plane that stops
reading holds the proxy's reader of Envoy's stream, and gRPC's flow control then holds Envoy.
The agent's own never block, or the thread that handles the control plane's responses could
wait for a control plane that waits for it to read (Istio's agent makes its whole queue
unbounded for that reason); they stay bounded all the same: a request of the agent's replaces
the one of its type still waiting (a later ACK says all an earlier one did), so at most one per
type waits.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from .core import Request

MAX_FORWARDED = 16  # Envoy's requests come a few a push: one per type, then the ACKs
MAX_FORWARDED_BYTES = 4 << 20  # one request of the largest the proxy accepts may always wait


@dataclass
class _Waiting:
    request: Request
    own: bool
    size: int


class Outbox:
    """Closed once: then `forward` returns False and the iteration ends, whatever still waits."""

    def __init__(self, limit: int = MAX_FORWARDED, limit_bytes: int = MAX_FORWARDED_BYTES) -> None:
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._waiting: deque[_Waiting] = deque()
        self._forwarded = 0  # Envoy's requests waiting, and their bytes
        self._bytes = 0
        self._closed = False
        self._changed = threading.Condition()

    def forward(self, request: Request) -> bool:
        """Queue one of Envoy's requests, once there is room; False when the outbox closed first."""
        size = request.ByteSize()
        with self._changed:
            while not self._closed and self._forwarded and (
                    self._forwarded >= self._limit or self._bytes + size > self._limit_bytes):
                self._changed.wait()
            if self._closed:
                return False
            self._waiting.append(_Waiting(request, False, size))
            self._forwarded += 1
            self._bytes += size
            self._changed.notify_all()
            return True

    def own(self, request: Request) -> None:
        """Queue a request of the agent's, in the place of the one of its type still waiting."""
        with self._changed:
            for waiting in self._waiting:
                if waiting.own and waiting.request.type_url == request.type_url:
                    waiting.request = request
                    return
            self._waiting.append(_Waiting(request, True, 0))
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._waiting.clear()
            self._changed.notify_all()

    def waiting(self) -> int:
        """How many requests wait (for tests and metrics)."""
        with self._changed:
            return len(self._waiting)

    def __iter__(self) -> Iterator[Request]:
        """The requests in order, each as soon as it is queued, until the outbox closes (the
        upstream call's request iterator, read by grpc's thread)."""
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                item = self._waiting.popleft()
                if not item.own:
                    self._forwarded -= 1
                    self._bytes -= item.size
                self._changed.notify_all()
            yield item.request
