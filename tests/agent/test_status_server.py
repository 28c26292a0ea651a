"""The status server's shell on loopback: the request-head deadline closes idle and trickling
connections (counted), accept() running out of files is logged once per interval without a
traceback, and loopback is recognised as pilot-agent does."""

from __future__ import annotations

import errno
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from pilotfish.agent.connlimits import Admission, Limits
from pilotfish.agent.listeners import open_listeners
from pilotfish.agent.ratelimit import PeerRates, Rates
from pilotfish.agent.status import StatusServer, StatusSources, is_local
from pilotfish.common.limits import open_files_limit

from .status_targets import loopback, poll, run_status

DEADLINE = 0.3


def sources() -> StatusSources:
    return StatusSources(lambda: None, CollectorRegistry(), lambda: None, lambda: None)


def run_with_server(client: Callable[[int], object], **kw: object) -> StatusServer:
    """Start a server on 127.0.0.1, run the blocking `client(port)` in a thread, stop."""
    kw.setdefault("sources", sources())
    server = StatusServer(loopback(), header_timeout=DEADLINE, **kw)  # type: ignore[arg-type]
    run_status(server, client)
    return server


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_an_idle_connection_is_closed_at_the_header_deadline() -> None:
    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            assert closed_by_server(sock)

    server = run_with_server(client)
    assert server.admission.dropped == {"header_timeout": 1} and server.admission.open == 0
    text = generate_latest(server.sources.registry).decode()
    assert 'pilotfish_status_connections_dropped_total{reason="header_timeout"} 1.0' in text


def test_trickling_the_head_does_not_extend_the_deadline() -> None:
    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            stop = threading.Event()

            def trickle() -> None:
                for byte in b"GET /healthz/ready HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
                    if stop.wait(DEADLINE / 10):
                        return
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        return

            thread = threading.Thread(target=trickle)
            thread.start()
            try:
                assert closed_by_server(sock)
            finally:
                stop.set()
                thread.join()

    assert run_with_server(client).admission.dropped == {"header_timeout": 1}


def test_a_prompt_request_is_answered() -> None:
    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(10)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n")

    assert not run_with_server(client).admission.dropped


class _StarvedListener:
    """A listening socket whose accept() fails with EMFILE: the file table is full."""

    def __init__(self) -> None:
        self.calls = 0

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_running_out_of_files_is_one_line_per_interval_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """500 failed accepts, retried 0.1 s apart: 50 s of trio's (mock) clock, which the server's
    rate-limited log reads, so 5 lines of 10 s each."""
    server = StatusServer([], sources())
    listener = _StarvedListener()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(500):
                await server._accept_batch(listener, nursery)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, "pilotfish.status"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert server.accept_errors == 500 and listener.calls == 500
    lines = [r.getMessage() for r in caplog.records]
    want = f"status: cannot accept connections: Too many open files (open files limit {open_files_limit()})"
    assert len(lines) == 5 and lines[0] == want, lines  # one per 10 s of the server's (trio's) clock
    assert all(re.fullmatch(re.escape(want) + r" \((99|100) similar suppressed\)", line) for line in lines[1:]), lines
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("peer,local", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("2001:db8::1", False),
])
def test_is_local(peer: str, local: bool) -> None:
    assert is_local(peer) is local


def send(port: int, path: str, source: str = "127.0.0.1", method: str = "GET") -> socket.socket:
    """A connected socket from `source` that has sent its whole request."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def status(sock: socket.socket) -> int | None:
    """The status code of the reply on `sock` (read to the end, then closed); None if the server
    closed without an answer."""
    with sock:
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    m = re.match(rb"HTTP/1\.1 (\d+)", reply)
    return int(m.group(1)) if m else None


class StuckRenders:
    """A collector whose renders do not finish until `release` is set; counts them."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = threading.Event()
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self.entered += 1
        self.release.wait(30)
        return iter(())


def stuck_server(**kw: object) -> tuple[StuckRenders, dict[str, object]]:
    stuck = StuckRenders()
    registry = CollectorRegistry()
    registry.register(stuck)  # type: ignore[arg-type]
    return stuck, {"sources": StatusSources(lambda: None, registry, lambda: None, lambda: None), **kw}


def test_readiness_is_answered_while_every_render_is_stuck() -> None:
    """Readiness is answered on the loop: 45 local metric renders that never finish (more than
    trio's 40 default worker threads, which every request used to queue on) do not hold it up."""
    stuck, kw = stuck_server()

    def client(port: int) -> None:
        renders = [send(port, "/stats/prometheus") for _ in range(45)]
        try:
            poll(lambda: stuck.entered >= 1, "a render started")
            assert status(send(port, "/healthz/ready")) == 200
        finally:
            stuck.release.set()
        assert [status(sock) for sock in renders] == [200] * 45

    run_with_server(client, **kw)


def test_a_local_render_does_not_wait_for_remote_ones() -> None:
    """Remote renders take turns on a limiter of their own (one at a time); a loopback scrape
    gets a thread while they are stuck. 127.0.0.2 plays the remote peer."""
    stuck, kw = stuck_server(local=lambda peer: peer == "127.0.0.1")
    servers: list[StatusServer] = []

    def client(port: int) -> None:
        remote_limiter = servers[0]._renders[False]
        remote = [send(port, "/stats/prometheus", source="127.0.0.2") for _ in range(6)]
        try:
            poll(lambda: remote_limiter.statistics().tasks_waiting == 5, "five remote renders waiting for the one")
            assert stuck.entered == 1
            local = send(port, "/stats/prometheus")
            poll(lambda: stuck.entered == 2, "the local render started while the remote ones are stuck")
        finally:
            stuck.release.set()
        assert status(local) == 200
        assert [status(sock) for sock in remote] == [200] * 6

    server = StatusServer(loopback(), header_timeout=DEADLINE, **kw)  # type: ignore[arg-type]
    servers.append(server)
    run_status(server, client)


def test_a_remote_peer_is_rate_limited_and_loopback_is_not() -> None:
    """A remote peer's bucket of 4 tokens (refilled too slowly to matter here): a connection
    costs 1, a render 2 more. A render it cannot pay for is answered 429, and once its bucket is
    empty its connections are closed at accept, unread; loopback peers are not limited."""
    rates = PeerRates(Rates(rate=0.001, burst=4, render_cost=2))
    got: list[int | None] = []

    def client(port: int) -> None:
        # tokens: 4 -> 3 (ready) -> 2 (ready) -> 1 (connection; 429: the render needs 2) -> 0 (ready) -> closed
        for path in ("/healthz/ready", "/healthz/ready", "/stats/prometheus", "/healthz/ready", "/healthz/ready"):
            got.append(status(send(port, path, source="127.0.0.2")))
        got.extend(status(send(port, "/stats/prometheus")) for _ in range(5))

    server = StatusServer(loopback(), sources(), header_timeout=DEADLINE, rates=rates,
                          local=lambda peer: peer == "127.0.0.1")
    run_status(server, client)
    assert got == [200, 200, 429, 200, None] + [200] * 5
    assert server.rate_limited == 1 and server.admission.dropped == {"rate_limit": 1}
    text = generate_latest(server.sources.registry).decode()
    assert "pilotfish_status_requests_rate_limited_total 1.0" in text
    assert 'pilotfish_status_connections_dropped_total{reason="rate_limit"} 1.0' in text


def test_loopback_connections_have_accept_queues_of_their_own() -> None:
    """Every interface and, on the same port, 127.0.0.1 and ::1: a loopback connection lands in
    the loopback listener's queue, which no remote flood fills."""
    listeners = open_listeners(0, "")
    try:
        by_address = {sock.getsockname()[0]: sock for sock in listeners}
        assert set(by_address) <= {"0.0.0.0", "::", "127.0.0.1", "::1"} and {"0.0.0.0", "127.0.0.1"} <= set(by_address)
        port = listeners[0].getsockname()[1]
        assert {sock.getsockname()[1] for sock in listeners} == {port}
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            poll(lambda: queued(by_address["127.0.0.1"]), "the connection queued on the loopback listener")
            assert not queued(by_address["0.0.0.0"])
    finally:
        for sock in listeners:
            sock.close()


def queued(listener: socket.socket) -> bool:
    """Whether a connection waits in `listener`'s accept queue (taken and closed if so)."""
    try:
        sock, _ = listener.accept()
    except BlockingIOError:
        return False
    sock.close()
    return True


def test_a_render_waiting_for_a_thread_makes_room_for_an_honest_peer() -> None:
    """Every remote slot is held by one peer's metric requests, one rendering (stuck) and the
    others waiting for the remote render thread: a newcomer from another peer (kubelet's probe)
    is let in by closing one that waits, of the peer holding the most; the one being rendered is
    never cut. 127.0.0.1 is loopback, every other 127/8 address plays a remote peer."""
    stuck, kw = stuck_server(local=lambda peer: peer == "127.0.0.1", admission=Admission(Limits(per_peer=8, remote=4)))
    servers: list[StatusServer] = []

    def client(port: int) -> None:
        flood = [send(port, "/stats/prometheus", source="127.0.0.2") for _ in range(4)]
        try:
            poll(lambda: servers[0]._renders[False].statistics().tasks_waiting == 3, "three renders waiting for the one")
            assert status(send(port, "/healthz/ready", source="127.0.0.3")) == 200
        finally:
            stuck.release.set()
        assert sorted(status(sock) or 0 for sock in flood) == [0, 200, 200, 200]  # one closed for the newcomer

    server = StatusServer(loopback(), header_timeout=DEADLINE, **kw)  # type: ignore[arg-type]
    servers.append(server)
    run_status(server, client)
    assert server.admission.dropped == {"evicted": 1}
