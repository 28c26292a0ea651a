"""The agent's own ADS stream to an istiod-compatible control plane, reconnecting forever.

grpcio's streaming API is blocking and thread-based, so each stream runs in a worker thread
(`trio.to_thread`) while the trio task owns its lifetime: cancelling the task cancels the call,
which ends the thread. What a response means is decided by the core (core.py) and the resource
types (resources.py); the channel, its credentials and headers are channel.py's (shared with the
xDS proxy); this module moves requests and responses, retries, and acts on the core's events in
one order for every type (`settle`, which the xDS proxy uses too): swap the value in, save it,
then ACK.

Unlike Istio's agent (which leaves retrying to Envoy), this client retries by itself
(backoff.py): exponential backoff from 0.5 s, doubled per failure up to 30 s, with full jitter,
reset after a stream that delivered a resource however it ended. Once Envoy runs, the agent
does not open this stream: its subscriptions ride Envoy's streams through the xDS proxy.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import trio
from envoy.config.core.v3.base_pb2 import Node
from pilotfish.common.memory import release_freed_memory

from .backoff import Backoff
from .channel import XdsChannel, XdsSettings
from .core import Accepted, DeltaCore, Rejected, Request, SotwCore, TypeState
from .outcome import connection_made, termination
from .resources import ResourceCache
from .saved import SavedCopy, serve_saved

log = logging.getLogger("pilotfish.xds")



@dataclass
class ConnectionState:
    """What the agent reports about the connection (status server, metrics, logs)."""

    connected: bool = False
    connects: int = 0
    failures: int = 0  # attempts whose connection was never made (outcome.py)
    terminations: Counter[str] = field(default_factory=Counter)  # streams ended after it was, by type
    last_error: str = ""
    last_update: float = 0.0  # time.time() of the last accepted resource
    types: dict[str, TypeState] = field(default_factory=dict)


def settle(core: SotwCore | DeltaCore, event: Accepted[object] | Rejected, cache: ResourceCache,
           saved: SavedCopy | None) -> Request:
    """Act on one event of the core and return the request to send: a rejection's NACK; for an
    accepted value, in this order, swap it in (it serves from now on), give the replaced one's
    memory back, save it, and only then the ACK. A value is never ACKed before it serves."""
    if isinstance(event, Rejected):
        log.warning("xds: rejected %s version %r: %s", event.type_url, event.version, event.reason)
        return event.request
    cache.swap(event.type_url, event.version, event.value)
    release_freed_memory()
    if saved is not None:
        saved.save(event.value)
    log.info("xds: accepted %s version %r", event.type_url, event.version)
    return core.ack(event)


class XdsClient:
    """Keeps one ADS stream open to the control plane, for as long as `run` runs."""

    def __init__(self, settings: XdsSettings, node: Node, cache: ResourceCache, subscriptions: list[SavedCopy],
                 channel: XdsChannel | None = None) -> None:
        self.settings = settings
        self.channel = channel or XdsChannel(settings)  # the agent's, shared with the xDS proxy
        self.node = node
        self.cache = cache
        self.subscriptions = {s.rtype.type_url: s for s in subscriptions}  # each type with its copy on disk
        self.state = ConnectionState()
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()

    def _serve_stream(self, answered: threading.Event) -> None:
        """One stream, start to end (runs in a worker thread); `answered` is set at its first
        response."""
        stub = self.channel.stub()
        outbox: queue.Queue[Request | None] = queue.Queue()
        types = [s.rtype for s in self.subscriptions.values()]
        core = (DeltaCore if self.settings.delta else SotwCore)(self.node, types, self.state.types)
        self.state.types = core.states  # live: metrics read the counters while the stream runs
        for request in core.initial_requests():
            outbox.put(request)

        def requests() -> Iterator[Request]:
            while (item := outbox.get()) is not None:
                yield item

        try:
            method = stub.DeltaAggregatedResources if self.settings.delta else stub.StreamAggregatedResources
            call = method(requests(), metadata=self.channel.metadata())
            with self._lock:
                self._call = call
            for response in call:
                answered.set()
                if not self.state.connected:
                    self.state.connected = True
                    self.state.connects += 1
                    log.info("xds: connected to %s", self.settings.address)
                event = core.on_response(response)
                del response  # not held while idle: a NameTable response is its wire size and more
                if event is not None:
                    outbox.put(settle(core, event, self.cache, self.subscriptions.get(event.type_url)))
                    if isinstance(event, Accepted):
                        self.state.last_update = time.time()
                    del event
        finally:
            outbox.put(None)
            self.state.connected = False
            with self._lock:
                self._call = None

    def _cancel(self) -> None:
        with self._lock:
            if self._call is not None:
                self._call.cancel()

    def _accepted(self) -> int:
        """Resources accepted so far, over all streams (the counts carry over a reconnect)."""
        return sum(t.accepted for t in self.state.types.values())

    def load_saved(self) -> int:
        """The copies saved by an earlier run, served at start (saved.py); how many serve."""
        return serve_saved(self.cache, self.subscriptions.values())

    async def run(self) -> None:
        """Stream forever; when a stream ends, wait (backoff with jitter) and reconnect."""
        backoff = Backoff(self.settings.backoff_base, self.settings.backoff_cap)
        while True:
            accepted_before = self._accepted()
            answered = threading.Event()
            code: str | None = None
            made = True  # the connection to the control plane was made (outcome.py)
            try:
                await trio.to_thread.run_sync(self._serve_stream, answered, abandon_on_cancel=True)
                error = "stream closed by the server"
            except grpc.RpcError as err:
                code, details = err.code().name, err.details()  # type: ignore[attr-defined]
                error = f"{code}: {details}"
                made = connection_made(code, answered.is_set())
            except OSError as err:  # e.g. the root certificate file is missing
                error = f"{err.strerror or err}: {getattr(err, 'filename', '')}"
                made = False
            finally:
                self._cancel()
            if made:
                self.state.terminations[termination(code, error)] += 1
            else:
                self.state.failures += 1
            self.state.last_error = error
            # However the stream ended: one that delivered proved the connection healthy.
            ceiling = backoff.after_stream(delivered=self._accepted() > accepted_before)
            delay = random.random() * ceiling
            log.warning("xds: connection to %s ended (%s); retrying in %.1fs (at most %.1fs)",
                        self.settings.address, error, delay, ceiling)
            await trio.sleep(delay)
