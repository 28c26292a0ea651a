"""The status server on 15020: readiness, metrics, the DNS debug view, quitquitquit.

A small HTTP/1.1 server on trio (one request per connection, answered and closed), as pilot-agent
serves it (reference/istio-agent.md §6): `/healthz/ready` 200 or 503, `/stats/prometheus` and
`/metrics` in Prometheus text, `/debug/ndsz` and `POST /quitquitquit` from localhost only (403
otherwise). A 503 carries its reason in the body; pilot-agent only logs it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger("pilotfish.status")

MAX_REQUEST = 16 * 1024
READ_TIMEOUT = 5.0
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
    if route in ("/debug/ndsz", "/quitquitquit") and not local:
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


class StatusServer:
    """Serves `sources` on a TCP port (all interfaces, as pilot-agent's 15020)."""

    def __init__(self, port: int, sources: StatusSources, host: str = "") -> None:
        self.port = port
        self.host = host
        self.sources = sources
        self.bound_port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host or None)
        self.bound_port = listeners[0].socket.getsockname()[1]
        log.info("status: listening on port %d", self.bound_port)
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                request = b""
                with trio.move_on_after(READ_TIMEOUT):
                    while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        request += chunk
                line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
                if len(line) < 2:
                    return
                peer = stream.socket.getpeername()[0]
                local = ipaddress.ip_address(peer.split("%")[0]).is_loopback
                response = await trio.to_thread.run_sync(handle, line[0], line[1], local, self.sources)
                # Shielded: /quitquitquit cancels this task with the rest, and its OK must still go out.
                with trio.CancelScope(shield=True), trio.move_on_after(READ_TIMEOUT):
                    await stream.send_all(_encode(response))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
