"""The xDS proxy: Envoy's ADS on a unix socket, relayed to the control plane over the agent's
channel (channel.py), with the types the agent handles itself taken out on the way
(docs/xds-proxy.md; Istio's behaviour in docs/istio-compat.md "xDS proxy").

Each Envoy stream, state of the world or delta, gets one upstream stream of the same kind, opened
when Envoy's opens. Envoy's requests go up unchanged (its node with them: the proxy adds none),
and the control plane's responses come down unchanged, but for:

- the agent's types (its subscriptions: the NameTable, later ProxyConfig): after Envoy's first
  listener request the agent subscribes to them on the same upstream stream; their responses go
  to the core (core.py) and `settle` (transport.py) exactly as on the agent's own stream (swap,
  save, then ACK or NACK, up the same stream) and never to Envoy;
- types that are neither Envoy's (`type.googleapis.com/envoy.`) nor Istio's Workload, dropped;
- the workload's health (health.py), the agent's own request, sent after Envoy's first listener
  request on every upstream stream, and whenever it changes.

An upstream stream that ends ends Envoy's with its status (Envoy reconnects, which opens a new
upstream stream); Envoy's that ends cancels the upstream one. A new Envoy stream ends the one
before (Envoy keeps one; Istio keeps one pair at a time).

Threads, per Envoy stream: the gRPC server's thread runs the stream's generator, which reads the
upstream responses and yields Envoy's; a pump thread reads Envoy's requests into the outbox
(outbox.py), which grpc's own thread for the upstream call reads. Both directions hold at most a
few messages: a response is read from upstream only once the one before was sent to Envoy, and
Envoy's requests wait in a small outbox, so a slow peer on either side slows the other through
gRPC's flow control instead of filling the agent's memory.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import trio
from envoy.service.discovery.v3 import ads_pb2_grpc
from pilotfish.common.ratelog import RateLimitedLog

from .core import Accepted, DeltaCore, Request, SotwCore
from .channel import XdsChannel
from .health import Health
from .outbox import Outbox
from .outcome import CANCELLED, connection_made, termination
from .resources import ResourceCache
from .saved import SavedCopy
from .transport import ConnectionState, settle
from .uds import listen_unix

log = logging.getLogger("pilotfish.xds")

XDS_SOCKET = "./etc/istio/proxy/XDS"  # Istio's, where its bootstrap's xds-grpc cluster points
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ENVOY_TYPES = "type.googleapis.com/envoy."
WORKLOAD_TYPE = "type.googleapis.com/istio.workload.Workload"
MAX_STREAMS = 8  # Envoy streams at once: Envoy has one, a new one ends the one before
MAX_REQUEST_BYTES = 4 << 20  # Istio's downstream limit (ISTIO_GPRC_MAXRECVMSGSIZE)
STOP_GRACE = 1.0  # seconds the streams get to end when the proxy stops
STOP_WAIT = 5.0  # seconds `stop` waits for the stream threads to end

# Why the proxy ended a pair, when it did (else the upstream stream ended by itself).
ENVOY = "Envoy's stream ended"
SUPERSEDED = "a newer Envoy stream took over"
DONE = "the upstream stream ended"


def forwarded(type_url: str) -> bool:
    """Whether a response of this type goes to Envoy (Istio's agent drops the others)."""
    return type_url.startswith(ENVOY_TYPES) or type_url == WORKLOAD_TYPE


@dataclass
class ProxyCounters:
    """What the proxy reports about itself (metrics.py), beside the upstream's ConnectionState."""

    streams: int = 0  # Envoy streams open
    requests: int = 0  # sent upstream, Envoy's and the agent's
    responses: int = 0  # received from upstream, forwarded or not
    envoy_terminations: Counter[str] = field(default_factory=Counter)  # Envoy streams that Envoy ended


class _Pair:
    """One Envoy stream and its upstream stream."""

    def __init__(self, number: int, delta: bool, core: SotwCore | DeltaCore, context: grpc.ServicerContext) -> None:
        self.number = number
        self.delta = delta
        self.core = core
        self.context = context
        self.outbox = Outbox()
        self.subscribed = False  # the agent's requests went up (after Envoy's first listener request)
        self.ended: str | None = None  # why the proxy ended it
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()

    def attach(self, call: grpc.Future) -> None:
        with self._lock:
            self._call = call
            ended = self.ended
        if ended is not None:
            call.cancel()

    def end(self, why: str) -> bool:
        """Cancel the upstream stream; whether this ended it (the first reason stays)."""
        with self._lock:
            first = self.ended is None
            if first:
                self.ended = why
            call = self._call
        self.outbox.close()
        if call is not None:
            call.cancel()
        return first


class ProxyNotStarted(Exception):
    """The proxy's socket could not be made (the agent ends: Envoy would have no configuration)."""


class XdsProxy(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """The proxy, as a component of the agent (agent/components.py): `serve` listens on the socket
    until cancelled; or `start` and `stop` from a thread.

    `subscriptions` are the agent's types with their copies on disk, the same objects the
    agent's own stream takes (transport.XdsClient); `cache` is where their values serve."""

    name = "xds-proxy"

    def __init__(self, channel: XdsChannel, cache: ResourceCache, subscriptions: Sequence[SavedCopy],
                 socket_path: str = XDS_SOCKET) -> None:
        self.channel = channel
        self.cache = cache
        self.subscriptions = {s.rtype.type_url: s for s in subscriptions}
        self.socket_path = socket_path
        self.state = ConnectionState()  # the upstream, as the agent's own stream reports it (metrics.XdsMetrics)
        self.counters = ProxyCounters()
        self._numbers = itertools.count(1)
        self._current: _Pair | None = None
        self._health: Health | None = None
        self._lock = threading.Condition()
        self._server: grpc.Server | None = None
        self._upstream_log = RateLimitedLog(log)
        self._dropped_log = RateLimitedLog(log)

    # --- the shell: socket, server, lifetime

    def start(self) -> None:
        """Listen on the socket (made 0600, its directory when missing) and serve. OSError."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 2, thread_name_prefix="xds-proxy"),
                             maximum_concurrent_rpcs=MAX_STREAMS,
                             options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        listen_unix(server, self.socket_path)
        server.start()
        self._server = server
        log.info("xds proxy: serving Envoy on %s, upstream %s", self.socket_path, self.channel.settings.address)

    def stop(self, grace: float | None = STOP_GRACE) -> None:
        """Stop listening, end every stream (after `grace` seconds), and wait for their threads."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        deadline = time.monotonic() + STOP_WAIT
        with self._lock:
            while self.counters.streams and time.monotonic() < deadline:
                self._lock.wait(0.05)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.start()
        except OSError as err:
            raise ProxyNotStarted(f"cannot listen on {self.socket_path}: {err.strerror or err}") from None
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.stop)

    def ready(self) -> str | None:
        return None  # Envoy's readiness says whether its configuration came

    def report_health(self, health: Health) -> None:
        """The workload's health changed (health.HealthTracker): told upstream now when Envoy
        has asked for listeners on the current stream, and on every stream after."""
        with self._lock:
            self._health = health
            pair = self._current
            if pair is not None and pair.subscribed:
                pair.outbox.own(health.request(pair.delta))

    # --- the servicer: one pair per Envoy stream

    def StreamAggregatedResources(self, request_iterator: Iterator[Request],
                                  context: grpc.ServicerContext) -> Iterator[object]:
        return self._relay(request_iterator, context, delta=False)

    def DeltaAggregatedResources(self, request_iterator: Iterator[Request],
                                 context: grpc.ServicerContext) -> Iterator[object]:
        return self._relay(request_iterator, context, delta=True)

    def _relay(self, requests: Iterator[Request], context: grpc.ServicerContext, delta: bool) -> Iterator[object]:
        types = [s.rtype for s in self.subscriptions.values()]
        core = (DeltaCore if delta else SotwCore)(None, types, self.state.types)  # Envoy's node goes up
        pair = _Pair(next(self._numbers), delta, core, context)
        self._open(pair)
        try:
            if context.add_callback(lambda: self._envoy_ended(pair)):
                yield from self._stream(pair, requests)
        finally:
            pair.end(DONE)
            self._close(pair)

    def _open(self, pair: _Pair) -> None:
        with self._lock:
            before, self._current = self._current, pair
            self.state.types = pair.core.states  # live: metrics read the counters while the stream runs
            self.counters.streams += 1
        if before is not None:
            log.warning("xds proxy: Envoy opened stream %d while %d was open; closing %d",
                        pair.number, before.number, before.number)
            before.end(SUPERSEDED)
            before.context.cancel()  # its thread may be stuck sending to a client that does not read

    def _close(self, pair: _Pair) -> None:
        with self._lock:
            if self._current is pair:
                self._current = None
                self.state.connected = False
            self.counters.streams -= 1
            self._lock.notify_all()

    def _stream(self, pair: _Pair, requests: Iterator[Request]) -> Iterator[object]:
        try:
            stub = self.channel.stub()
        except OSError as err:  # e.g. the root certificate file is missing
            self._ended(pair, "UNAVAILABLE", f"{err.strerror or err}: {getattr(err, 'filename', '')}", made=False)
            pair.context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot connect to the control plane: {err}")
        method = stub.DeltaAggregatedResources if pair.delta else stub.StreamAggregatedResources
        call = method(self._counted(pair.outbox), metadata=self.channel.metadata())
        pair.attach(call)
        threading.Thread(target=self._pump, args=(pair, requests), name=f"xds-proxy-pump-{pair.number}",
                         daemon=True).start()
        answered = False
        try:
            for response in call:
                self.counters.responses += 1
                if not answered:
                    answered = True
                    self._connected(pair)
                if response.type_url in self.subscriptions:
                    self._handle(pair, response)
                elif forwarded(response.type_url):
                    yield response
                else:
                    self._dropped_log(logging.ERROR, "xds proxy: not forwarding a response of type %s to Envoy "
                                      "(neither Envoy's nor Workload)", response.type_url)
                del response  # not held while the stream is idle: a response is its wire size and more
        except grpc.RpcError as err:
            if pair.ended is not None:
                return  # Envoy's went away (or a newer stream took over): nothing to tell
            code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
            self._ended(pair, code.name, details, made=connection_made(code.name, answered))
            pair.context.abort(code, details)
        else:
            self._ended(pair, None, "stream closed by the server", made=True)

    def _counted(self, outbox: Outbox) -> Iterator[Request]:
        for request in outbox:
            self.counters.requests += 1
            yield request

    def _pump(self, pair: _Pair, requests: Iterator[Request]) -> None:
        """Envoy's requests into the outbox, until Envoy's stream ends; then the pair ends (Istio
        ends it when Envoy closes its side too)."""
        try:
            for request in requests:
                if not pair.outbox.forward(request):
                    return
                if not pair.subscribed and request.type_url == LISTENER_TYPE:
                    self._subscribe(pair)
        except grpc.RpcError:
            pass  # Envoy's stream ended
        finally:
            self._envoy_ended(pair)

    def _envoy_ended(self, pair: _Pair) -> None:
        """Envoy closed its side or went away (Istio counts both as a cancellation: gRPC's
        server does not tell the reasons apart): the pair ends. A no-op once the proxy ended it."""
        if pair.end(ENVOY):
            self.counters.envoy_terminations[CANCELLED] += 1

    def _subscribe(self, pair: _Pair) -> None:
        """The agent's requests, after Envoy's first listener request (its first request, with
        its node, is upstream before them): the agent's types, then the health last reported."""
        with self._lock:
            pair.subscribed = True
            for request in pair.core.initial_requests():
                pair.outbox.own(request)
            if self._health is not None:
                pair.outbox.own(self._health.request(pair.delta))

    def _handle(self, pair: _Pair, response: object) -> None:
        """A response of the agent's types: as on the agent's own stream; the ACK or NACK goes
        up this stream."""
        event = pair.core.on_response(response)  # type: ignore[arg-type]
        if event is None:
            return
        pair.outbox.own(settle(pair.core, event, self.cache, self.subscriptions[event.type_url]))
        if isinstance(event, Accepted):
            self.state.last_update = time.time()

    def _connected(self, pair: _Pair) -> None:
        with self._lock:
            if self._current is pair:
                self.state.connected = True
            self.state.connects += 1
        log.info("xds proxy: Envoy stream %d connected to %s (%s)", pair.number, self.channel.settings.address,
                 "delta" if pair.delta else "state of the world")

    def _ended(self, pair: _Pair, code: str | None, details: str, made: bool) -> None:
        """The upstream stream ended by itself (or never opened): counted as the agent's own
        stream counts it (outcome.py); Envoy's stream gets its status and reconnects."""
        pair.end(DONE)
        if made:
            self.state.terminations[termination(code, details)] += 1
        else:
            self.state.failures += 1
        error = f"{code}: {details}" if code else details
        self.state.last_error = error
        self._upstream_log(logging.WARNING, "xds proxy: the control plane ended Envoy stream %d (%s)", pair.number,
                           error)
