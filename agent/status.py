"""The status server on 15020: readiness, metrics, application probes, the DNS debug view, drain, quit.

A small HTTP/1.1 server on trio (one request per connection, answered and closed), as pilot-agent
serves it (docs/istio-compat.md "Status server"): `/healthz/ready` 200 or 503, `/stats/prometheus` and
`/metrics` merged from the agent, Envoy and the application (agent/metricsmerge.py),
`/app-health/...` and `/app-lifecycle/...` run against the application (agent/prober.py),
`/debug/*`, `POST /drain` and `POST /quitquitquit` from loopback peers only (403 otherwise,
pilot-agent's answer). A 503 carries its reason in the body; pilot-agent only logs it.

It listens on every interface (kubelet probes it), so its connections are bounded (connlimits.py),
the request head must arrive within HEADER_TIMEOUT, and each remote peer's requests are
rate-limited (ratelimit.py): a remote flood costs the flooder, not the agent's file table, the DNS
proxy or the local probes. Loopback peers connect through listening sockets of their own
(listeners.py). Readiness and the other cheap answers are given on the event loop, at once in the
accept loop's turn when the request came with the connection; what renders (the metrics,
/debug/*) runs in worker threads, few at a time, loopback peers with threads of their own, so a
readiness probe never queues behind a render and a local scrape never behind a remote one. The
application probes run as tasks, PROBES_AT_ONCE at most: a flood of probe requests never opens
more connections to the application than that. Figures and reasons: docs/agent.md.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http
import ipaddress
import itertools
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pilotfish.common.limits import open_files_limit
from pilotfish.common.ratelog import RateLimitedLog

from .connlimits import HEADER_TIMEOUT as HEADER_TIMEOUT_REASON
from .connlimits import Admission, Refuse, peer_key
from .httpclient import FIELD_VALUE, TOKEN
from .metricsmerge import MetricsMerge, merge, merged_format, render_agent
from .prober import AppProber
from .ratelimit import PeerRates

log = logging.getLogger("pilotfish.status")

MAX_REQUEST = 16 * 1024  # the request head (h11's default limit is 16 KiB too)
HEADER_TIMEOUT = 2.0  # seconds from accept to the end of the request head
SEND_TIMEOUT = 5.0  # seconds to hand the response to the kernel
ACCEPT_BATCH = 64  # connections accepted before other tasks get a turn
ACCEPT_RETRY = 0.1  # seconds before accepting again after EMFILE and the like (trio's figure)
LOCAL_RENDERS = 2  # renders at once for loopback peers (a /debug/ndsz of a large table takes seconds)
REMOTE_RENDERS = 1  # and for remote peers together: renders hold the GIL, one is a core's worth
# application probes running at once: kubelet runs at most three per container, each a few ms
PROBES_AT_ONCE = 8
MAX_HEADERS = 100  # in a request head (Go's net/http allows 1 MB of them; probes and scrapes send a few)
METRICS_ROUTES = ("/stats/prometheus", "/metrics")
PROBE_PREFIXES = ("/app-health/", "/app-lifecycle/")
LOOPBACK_ONLY = ("/quitquitquit", "/drain")  # and every /debug/ path
FORBIDDEN = b"Only requests from localhost are allowed"
_TARGET = re.compile(r"[\x21-\x7e\x80-\xff]+")
# accept() failures that say "out of a resource, try again later", not "this listener is broken"
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() failures that concern one connection, not the listener: accept(2) on Linux passes a
# pending network error of the new connection (ENETDOWN, EPROTO, ... "treat them like EAGAIN by
# retrying"), EPERM is a firewall's refusal, ECONNABORTED/ECONNRESET/ETIMEDOUT one gone already
# (the list trio's SocketListener.accept skips)
IGNORABLE_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                                     errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                                     errno.ENETUNREACH, errno.ECONNRESET, errno.ETIMEDOUT})
DNS_NOT_READY = "istio DNS capture is turned ON and DNS lookup table is not ready yet"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: the path and the query
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def route(self) -> str:
        """The path, %-escapes decoded (Go's URL.Path, which its mux routes on)."""
        return unquote(self.target.split("?", 1)[0])

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


def parse_request(head: bytes) -> Request | None:
    """The request in a head (what arrived of it, up to MAX_REQUEST); None when it is not HTTP
    or its target holds a control character. Header lines past MAX_HEADERS, and lines that are
    not a header a request can carry (a name of token characters, a value without control
    characters but tab), are left out: headers go on to the application (probes) and Envoy's
    query string with the metrics, where a lone CR or LF would start a header of its own."""
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    words = lines[0].split()
    if len(words) < 2 or not _TARGET.fullmatch(words[1]):
        return None
    headers = []
    for line in lines[1:MAX_HEADERS + 1]:
        name, sep, value = line.partition(":")
        value = value.strip(" \t")
        if sep and TOKEN.fullmatch(name) and FIELD_VALUE.fullmatch(value):
            headers.append((name, value))
    return Request(words[0], words[1], tuple(headers))


@dataclass
class StatusSources:
    """What the server reports, as callables and values so the server needs no knowledge of the agent.

    `readiness` is called on the trio loop and must be cheap (it is what probes ask, and must
    never wait behind anything); the other callables are called from a worker thread (`handle`
    in `_slow_answer`): the /debug/ndsz view of a large table takes seconds to build (100,000
    services: ~4 s), a drain waits for Envoy's admin, and the loop also serves DNS over TCP.
    `drain` None: nothing to drain (no Envoy), /drain answers OK. `probes` None: no application
    probes (every /app-health/ path answers 400). `metrics`: the targets merged into the agent's
    metrics (none by default).
    """

    readiness: Callable[[], str | None]  # None when ready, else why not; cheap
    registry: CollectorRegistry
    name_table: Callable[[], Mapping[str, object] | None]  # the /debug/ndsz table, None before a table
    quit: Callable[[], None]
    drain: Callable[[], None] | None = None
    probes: AppProber | None = None
    metrics: MetricsMerge = field(default_factory=MetricsMerge)


def handle(method: str, path: str, local: bool, sources: StatusSources) -> Response:
    """One request to one response, for every route but the metrics and the known application
    probes, which the server answers itself (pure except for calling `sources`)."""
    route = unquote(path.split("?", 1)[0])
    if route == "/healthz/ready":
        reason = sources.readiness()
        return Response(200) if reason is None else Response(503, reason.encode())
    if route.startswith(PROBE_PREFIXES):  # unknown (known ones are the server's)
        return Response(400, f"app prober config does not exists for {route}".encode())
    if (route in LOOPBACK_ONLY or route.startswith("/debug/")) and not local:
        return Response(403, FORBIDDEN)
    if route == "/debug/ndsz":
        table = sources.name_table()
        if table is None:
            return Response(404, b"{}", "application/json")
        return Response(200, json.dumps({"table": table}, indent=2).encode(), "application/json")
    if route in LOOPBACK_ONLY:
        if method != "POST":
            return Response(405, b"Method Not Allowed")
        if route == "/drain":
            log.info("status: handling /drain, starting drain")
            if sources.drain is not None:
                sources.drain()
        else:
            sources.quit()
        return Response(200, b"OK")
    return Response(404, b"404 page not found")


RouteKind = Literal["cheap", "render", "metrics", "probe"]


def route_kind(route: str, local: bool, sources: StatusSources) -> RouteKind:
    """How the server answers `route` for this peer: on the loop at once (`cheap`: readiness,
    403, 404, an unknown probe's 400), in a worker thread (`render`: /debug/*, and drain and
    quit, which may wait or cross back into trio), the metrics (scraped on the loop, rendered
    in a thread), or a known application probe (a task)."""
    if route in METRICS_ROUTES:
        return "metrics"
    if route.startswith(PROBE_PREFIXES) and sources.probes is not None and sources.probes.knows(route):
        return "probe"
    if local and (route in LOOPBACK_ONLY or route.startswith("/debug/")):
        return "render"
    return "cheap"


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _encode(response: Response) -> bytes:
    head = (
        f"HTTP/1.1 {response.status} {_reason(response.status)}\r\n"
        f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + response.body


def is_local(peer: str) -> bool:
    """A loopback peer, as pilot-agent decides (Go's IsLoopback, which unmaps ::ffff:127.x)."""
    address = ipaddress.ip_address(peer.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class StatusServer:
    """Serves `sources` on `listeners` (listeners.py: every interface, as pilot-agent's 15020,
    loopback with queues of its own), which it closes when it stops.

    `local` decides which peers are loopback (a parameter so that tests on loopback can play a
    remote peer)."""

    def __init__(self, listeners: list[socket.socket], sources: StatusSources, *, admission: Admission | None = None,
                 header_timeout: float = HEADER_TIMEOUT, rates: PeerRates | None = None,
                 local: Callable[[str], bool] = is_local) -> None:
        self.listeners = listeners
        self.sources = sources
        self.bound_port = listeners[0].getsockname()[1] if listeners else 0
        self.admission = admission if admission is not None else Admission()
        self.rates = rates if rates is not None else PeerRates()
        self.header_timeout = header_timeout
        self.accept_errors = 0
        self.rate_limited = 0  # requests answered 429

        def classify(peer: str) -> tuple[bool, str]:
            """(loopback?, the key its connections and requests count under)."""
            loopback = local(peer)
            return loopback, peer if loopback else peer_key(peer)

        self._classify = functools.lru_cache(maxsize=4096)(classify)  # parsed once per address, not per connection
        limits, per_peer = self.admission.limits, self.rates.rates
        self._limits_text = (f"limits: {limits.per_peer} per remote peer, {limits.remote} remote, {limits.local_reserve} "
                             f"more for loopback; {per_peer.rate:g} connections/s per remote peer, bursts of "
                             f"{per_peer.burst:g}, a render costs {per_peer.render_cost:g} more")
        self._renders = {True: trio.CapacityLimiter(LOCAL_RENDERS), False: trio.CapacityLimiter(REMOTE_RENDERS)}
        self._threads = trio.CapacityLimiter(LOCAL_RENDERS + REMOTE_RENDERS)  # never waited on: a render slot is held
        self._probes = trio.CapacityLimiter(PROBES_AT_ONCE)
        self._ids = itertools.count()
        self._scopes: dict[int, trio.CancelScope] = {}
        self._warn_refused = RateLimitedLog(log, clock=trio.current_time)
        self._warn_accept = RateLimitedLog(log, clock=trio.current_time)
        self._warn_rate = RateLimitedLog(log, clock=trio.current_time)
        sources.registry.register(_StatusMetrics(self))
        sources.registry.register(sources.metrics)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.info("status: listening on port %d (%s)", self.bound_port,
                 ", ".join(str(sock.getsockname()[0]) for sock in self.listeners))
        task_status.started()
        async with trio.open_nursery() as nursery:
            for listener in self.listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        with listener:
            while True:
                await trio.lowlevel.wait_readable(listener)
                await self._accept_batch(listener, nursery)

    async def _accept_batch(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """Accept what is queued, ACCEPT_BATCH at most, then let other tasks run. In a batch, not
        one connection per trip through trio's scheduler: most of a flood's connections are
        refused at once, and a trip each cost more than the refusal (a flood of ~7,500
        connections/s took ~25% more of the agent's CPU that way)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno in IGNORABLE_ACCEPT_ERRNOS:  # that connection is gone; the next may not be
                    continue
                if err.errno not in RESOURCE_ERRNOS:
                    raise
                self.accept_errors += 1
                self._warn_accept(logging.WARNING, "status: cannot accept connections: %s (open files limit %d)",
                                  err.strerror, open_files_limit())
                await trio.sleep(ACCEPT_RETRY)
                return
            self._admit(sock, address[0], nursery)
        await trio.lowlevel.checkpoint()

    def _admit(self, sock: socket.socket, peer: str, nursery: trio.Nursery) -> None:
        local, key = self._classify(peer)
        conn = next(self._ids)
        over_rate = not local and not self.rates.pay(key, 1, trio.current_time())
        decision = self.admission.admit(conn, peer, local, over_rate)
        if isinstance(decision, Refuse):
            sock.close()
            self._warn_refused(logging.WARNING, "status: refused a connection from %s (%s; %s)", peer, decision.reason,
                               self._limits_text)
            return
        evicted = self._scopes.pop(decision.evict, None) if decision.evict is not None else None
        if evicted is not None:
            evicted.cancel()
        at_once = self._answer_at_once(sock, conn, peer, key, local)
        if at_once is None:
            return
        scope = self._scopes[conn] = trio.CancelScope()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        nursery.start_soon(self._connection, stream, *at_once, conn, peer, key, local, scope)

    def _answer_at_once(self, sock: socket.socket, conn: int, peer: str, key: str,
                        local: bool) -> tuple[bytes, Request | None] | None:
        """Answer right here, in the accept loop's turn, when the request is already in and
        cheap (a probe's, usually: the client sent it with the handshake); None when done with
        the connection. Else, for a task of its own: the bytes received so far (the head is on
        its way), or the request of a render (or metrics, or application probe) that was paid for.

        A connection handed to a task needs several more trips through trio's scheduler (read
        the head, answer, close), each behind whatever else is running: under a flood of
        connections that is tens of ms for a local probe, against one trip here."""
        try:
            sock.setblocking(False)
            received = sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return b"", None
        except OSError:
            received = b""  # reset already
        if received and b"\r\n\r\n" not in received and len(received) < MAX_REQUEST:
            return received, None  # the rest of the head is on its way
        request = parse_request(received)
        if request is not None:  # else closed by the peer, or not HTTP: closed
            response = self._cheap_answer(conn, request, peer, key, local)
            if response is None:
                return received, request  # a render or a probe: a task waits for a slot
            with contextlib.suppress(OSError):  # a fresh socket's buffer takes a small answer whole
                sock.send(_encode(response))
        sock.close()
        self.admission.closed(conn)
        return None

    async def _connection(self, stream: trio.SocketStream, received: bytes, paid: Request | None, conn: int,
                          peer: str, key: str, local: bool, scope: trio.CancelScope) -> None:
        """One connection to its end: the rest of the request head (unless `paid` is the request
        of a render paid for already), the answer, the close."""
        try:
            with scope:
                async with stream:
                    request = paid or await self._request(stream, conn, received)
                    if request is None:
                        return
                    response = None if paid else self._cheap_answer(conn, request, peer, key, local)
                    if response is None:
                        response = await self._slow_answer(conn, request, local)
                    # Shielded: /quitquitquit cancels this task with the rest, and its OK must still go out.
                    with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT):
                        await stream.send_all(_encode(response))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._scopes.pop(conn, None)
            self.admission.closed(conn)

    def _cheap_answer(self, conn: int, request: Request, peer: str, key: str, local: bool) -> Response | None:
        """The answer made on the loop (readiness, 400/403/404/405; the remote peer paid for the
        connection when it was accepted), or a 429 for a render a remote peer cannot pay for;
        None for a render it can, and for an application probe (kubelet's, from a remote peer:
        a probe costs the application, not the agent, and waits for a slot of PROBES_AT_ONCE)."""
        kind = route_kind(request.route, local, self.sources)
        if kind == "probe":
            return None
        if kind != "cheap":
            if local or self.rates.pay(key, self.rates.rates.render_cost, trio.current_time()):
                return None
            self.rate_limited += 1
            self._warn_rate(logging.WARNING, "status: too many requests from %s (%s)", peer, self._limits_text)
            return Response(429, b"Too Many Requests")
        self.admission.started(conn)
        return handle(request.method, request.target, local, self.sources)

    async def _slow_answer(self, conn: int, request: Request, local: bool) -> Response:
        """The answer made once a slot is free: a render slot of the peer's kind (loopback or
        remote) for a render or the metrics, a probe slot for an application probe. The
        connection stays evictable (connlimits.py) until then: a request waiting for a slot
        holds a connection without any work done for it yet."""
        kind = route_kind(request.route, local, self.sources)
        if kind == "probe":
            assert self.sources.probes is not None
            async with self._probes:
                self.admission.started(conn)
                answer = await self.sources.probes.probe(request.route, request.headers, self.bound_port)
            return Response(answer.status, answer.body)
        async with self._renders[local]:
            self.admission.started(conn)
            if kind == "metrics":
                return await self._metrics(request)
            return await trio.to_thread.run_sync(handle, request.method, request.target, local, self.sources,
                                                 limiter=self._threads)

    async def _metrics(self, request: Request) -> Response:
        """The targets scraped (on the loop, at once), then the agent's registry rendered and
        everything merged in a worker thread."""
        scrape = await self.sources.metrics.scrape(request.headers, request.query)
        fmt = merged_format([content_type for content_type, _ in scrape.apps])

        def render() -> bytes:
            try:
                agent = render_agent(self.sources.registry, fmt)
            except Exception:  # a collector's bug must not take the Envoy and application metrics with it
                self.sources.metrics.failures["agent"] += 1
                self.sources.metrics.warn["agent"](logging.ERROR, "status: failed rendering the agent's metrics",
                                                   exc_info=True)
                agent = b""
            return merge(fmt, agent, scrape.envoy, [body for _, body in scrape.apps])

        return Response(200, await trio.to_thread.run_sync(render, limiter=self._threads), fmt)

    async def _request(self, stream: trio.SocketStream, conn: int, request: bytes) -> Request | None:
        """The request once the head arrived (`request`: what came with the
        connection); None when it did not within the deadline (counted; the deadline is for the
        whole head, so trickling bytes does not extend it), or the peer closed first, or it is
        not HTTP."""
        with trio.move_on_after(self.header_timeout) as deadline:
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return None
                request += chunk
        if deadline.cancelled_caught:
            self.admission.closed(conn, HEADER_TIMEOUT_REASON)
            return None
        return parse_request(request)


class _StatusMetrics:
    """The status server's connections, read at scrape time."""

    def __init__(self, server: StatusServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        admission = self._server.admission
        yield GaugeMetricFamily("pilotfish_status_connections", "Connections open to the status port.",
                                value=admission.open)
        dropped = CounterMetricFamily(
            "pilotfish_status_connections_dropped",
            "Status-port connections refused or closed early, by reason: peer_limit, total_limit, evicted "
            "(an idle one, to make room), header_timeout, rate_limit (the peer spent its requests).", labels=["reason"])
        for reason, count in sorted(admission.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily("pilotfish_status_requests_rate_limited",
                                  "Requests from remote peers answered 429: the peer spent its requests for now.",
                                  value=self._server.rate_limited)
        yield CounterMetricFamily("pilotfish_status_accept_errors",
                                  "accept() failures on the status port for want of a resource (EMFILE, ...).",
                                  value=self._server.accept_errors)
