"""Real servers for the status server's outbound side: an application's HTTP server (probes and
metrics), a TCP listener, a gRPC health server, each on 127.0.0.1 with a port the kernel picks,
each recording the peers it saw; and the harness running a StatusServer under trio while a
blocking client talks to it from a thread."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import trio

from pilotfish.agent.listeners import open_listeners
from pilotfish.agent.status import StatusServer

Route = Callable[[BaseHTTPRequestHandler], None]


class App:
    """An HTTP server answering `routes` by path (query left out); records each request's peer
    address, path and headers, and how many requests it was serving at once at most."""

    def __init__(self, routes: dict[str, Route], tls: ssl.SSLContext | None = None) -> None:
        self.routes = routes
        self.peers: list[str] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.serving = self.most_at_once = 0
        self._lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with app._lock:
                    app.peers.append(self.client_address[0])
                    app.paths.append(self.path)
                    app.headers.append(dict(self.headers.items()))
                    app.serving += 1
                    app.most_at_once = max(app.most_at_once, app.serving)
                try:
                    app.routes.get(self.path.split("?", 1)[0], reply(404, b"no"))(self)
                finally:
                    with app._lock:
                        app.serving -= 1

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]

    def __enter__(self) -> App:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(status: int, body: bytes = b"", content_type: str = "text/plain", headers: dict[str, str] | None = None,
          hold: threading.Event | None = None) -> Route:
    """An answer, given once `hold` is set if there is one."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        if hold is not None:
            hold.wait(30)
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return answer


def framed(chunks: list[bytes], chunked: bool) -> Route:
    """A 200 whose body is sent in chunked encoding, or without a length (to the close)."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for chunk in chunks:
            handler.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            handler.wfile.write(b"0\r\nTrailer: x\r\n\r\n")
        handler.close_connection = True
    return answer


class TcpListener:
    """Accepts connections and records their peers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.sock.close()


@contextmanager
def grpc_health(statuses: dict[bytes, bytes]) -> Iterator[tuple[int, list[str]]]:
    """A gRPC server answering grpc.health.v1.Health/Check by name, as raw messages: the
    serialized HealthCheckResponse for each serialized request in `statuses`; (port, peers)."""
    peers: list[str] = []

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        peers.append(context.peer())
        if request not in statuses:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return statuses[request]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=lambda b: b,
                                                     response_serializer=lambda b: b)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, peers
    finally:
        server.stop(0)


def run_status(server: StatusServer, client: Callable[[int], object]) -> None:
    """Serve with `server` while the blocking `client(port)` runs in a thread; then stop."""
    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                await trio.to_thread.run_sync(client, server.bound_port)
                nursery.cancel_scope.cancel()

    trio.run(main)


def loopback() -> list[socket.socket]:
    """A listener on 127.0.0.1, on a port the kernel picks."""
    return open_listeners(0, "127.0.0.1")


def poll(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.01)


def get(port: int, path: str, method: str = "GET", source: str = "127.0.0.1",
        headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """One request to the status server: (status, body, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
