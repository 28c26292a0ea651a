"""The status server on 15020: readiness, metrics, the DNS debug view, quitquitquit.

A small HTTP/1.1 server on trio (one request per connection, answered and closed), as pilot-agent
serves it (reference/istio-agent.md §6): `/healthz/ready` 200 or 503, `/stats/prometheus` and
`/metrics` in Prometheus text, `/debug/*` and `POST /quitquitquit` from loopback peers only (403
otherwise, pilot-agent's answer). A 503 carries its reason in the body; pilot-agent only logs it.

It listens on every interface (kubelet probes it), so its connections are bounded (connlimits.py)
and the request head must arrive within HEADER_TIMEOUT: a remote flood costs the flooder, not the
agent's file table, the DNS proxy or the local probes. Figures and reasons: docs/agent.md.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pilotfish.common.limits import open_files_limit
from pilotfish.common.ratelog import RateLimitedLog

from .connlimits import HEADER_TIMEOUT as HEADER_TIMEOUT_REASON
from .connlimits import Admission, Refuse

log = logging.getLogger("pilotfish.status")

MAX_REQUEST = 16 * 1024  # the request head (h11's default limit is 16 KiB too)
HEADER_TIMEOUT = 2.0  # seconds from accept to the end of the request head
SEND_TIMEOUT = 5.0  # seconds to hand the response to the kernel
ACCEPT_RETRY = 0.1  # seconds before accepting again after EMFILE and the like (trio's figure)
# accept() failures that say "out of a resource, try again later", not "this listener is broken"
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
DNS_NOT_READY = "istio DNS capture is turned ON and DNS lookup table is not ready yet"
REASONS = {200: "OK", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


@dataclass
class StatusSources:
    """What the server reports, as callables so the server needs no knowledge of the agent.

    They are called from a worker thread, not the trio loop: the /debug/ndsz view of a large
    table takes seconds to build (100,000 services: ~4 s), and the loop also serves DNS over TCP.
    """

    readiness: Callable[[], str | None]  # None when ready, else why not
    registry: CollectorRegistry
    name_table: Callable[[], dict[str, object] | None]  # the /debug/ndsz view, None before a table
    quit: Callable[[], None]


def handle(method: str, path: str, local: bool, sources: StatusSources) -> Response:
    """One request to one response (pure except for calling `sources`)."""
    route = path.split("?", 1)[0]
    if route == "/healthz/ready":
        reason = sources.readiness()
        return Response(200) if reason is None else Response(503, reason.encode())
    if route in ("/stats/prometheus", "/metrics"):
        return Response(200, generate_latest(sources.registry), "text/plain; version=0.0.4; charset=utf-8")
    if (route == "/quitquitquit" or route.startswith("/debug/")) and not local:
        return Response(403, b"Only requests from localhost are allowed")
    if route == "/debug/ndsz":
        table = sources.name_table()
        if table is None:
            return Response(404, b"{}", "application/json")
        return Response(200, json.dumps(table, indent=2).encode(), "application/json")
    if route == "/quitquitquit":
        if method != "POST":
            return Response(405)
        sources.quit()
        return Response(200, b"OK")
    return Response(404, b"404 page not found")


def _encode(response: Response) -> bytes:
    head = (
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}\r\n"
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
    """Serves `sources` on a TCP port (all interfaces, as pilot-agent's 15020)."""

    def __init__(self, port: int, sources: StatusSources, host: str = "", admission: Admission | None = None,
                 header_timeout: float = HEADER_TIMEOUT) -> None:
        self.port = port
        self.host = host
        self.sources = sources
        self.bound_port = 0
        self.admission = admission or Admission()
        self.header_timeout = header_timeout
        self.accept_errors = 0
        self._ids = itertools.count()
        self._scopes: dict[int, trio.CancelScope] = {}
        self._warn_refused = RateLimitedLog(log)
        self._warn_accept = RateLimitedLog(log)
        sources.registry.register(_StatusMetrics(self))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host or None)
        self.bound_port = listeners[0].socket.getsockname()[1]
        log.info("status: listening on port %d", self.bound_port)
        task_status.started()
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as err:
                    if err.errno not in RESOURCE_ERRNOS:
                        raise
                    self.accept_errors += 1
                    self._warn_accept(logging.WARNING, "status: cannot accept connections: %s (open files limit %d)",
                                      err.strerror, open_files_limit())
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                self._admit(stream, nursery)

    def _admit(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:  # reset before we looked
            stream.socket.close()
            return
        local = is_local(peer)
        conn = next(self._ids)
        decision = self.admission.admit(conn, peer, local)
        if isinstance(decision, Refuse):
            stream.socket.close()
            limits = self.admission.limits
            self._warn_refused(logging.WARNING, "status: refused a connection from %s (%s; limits: %d per remote peer, "
                               "%d remote, %d more for loopback)", peer, decision.reason, limits.per_peer,
                               limits.remote, limits.local_reserve)
            return
        evicted = self._scopes.pop(decision.evict, None) if decision.evict is not None else None
        if evicted is not None:
            evicted.cancel()
        scope = self._scopes[conn] = trio.CancelScope()
        nursery.start_soon(self._connection, stream, conn, local, scope)

    async def _connection(self, stream: trio.SocketStream, conn: int, local: bool, scope: trio.CancelScope) -> None:
        try:
            with scope:
                async with stream:
                    line = await self._request_line(stream, conn)
                    if line is None:
                        return
                    response = await trio.to_thread.run_sync(handle, line[0], line[1], local, self.sources)
                    # Shielded: /quitquitquit cancels this task with the rest, and its OK must still go out.
                    with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT):
                        await stream.send_all(_encode(response))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._scopes.pop(conn, None)
            self.admission.closed(conn)

    async def _request_line(self, stream: trio.SocketStream, conn: int) -> list[str] | None:
        """The request line's words once the head arrived; None when it did not within the
        deadline (counted; the deadline is for the whole head, so trickling bytes does not extend
        it), or the peer closed first, or it is not HTTP."""
        request = b""
        with trio.move_on_after(self.header_timeout) as deadline:
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return None
                request += chunk
        if deadline.cancelled_caught:
            self.admission.closed(conn, HEADER_TIMEOUT_REASON)
            return None
        self.admission.started(conn)
        line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        return line if len(line) >= 2 else None


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
            "(the oldest idle one, to make room), header_timeout.", labels=["reason"])
        for reason, count in sorted(admission.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily("pilotfish_status_accept_errors",
                                  "accept() failures on the status port for want of a resource (EMFILE, ...).",
                                  value=self._server.accept_errors)
