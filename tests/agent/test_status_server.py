"""The status server's shell on loopback: the request-head deadline closes idle and trickling
connections (counted), accept() running out of files is logged once per interval without a
traceback, and loopback is recognised as pilot-agent does."""

from __future__ import annotations

import errno
from collections.abc import Callable
import logging
import socket
import threading

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from pilotfish.agent.status import StatusServer, StatusSources, is_local
from pilotfish.common.limits import open_files_limit

DEADLINE = 0.3


def sources() -> StatusSources:
    return StatusSources(lambda: None, CollectorRegistry(), lambda: None, lambda: None)


def run_with_server(client: Callable[[int], object], **kw: object) -> StatusServer:
    """Start a server on 127.0.0.1, run the blocking `client(port)` in a thread, stop."""
    server = StatusServer(0, sources(), host="127.0.0.1", header_timeout=DEADLINE, **kw)  # type: ignore[arg-type]

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                await trio.to_thread.run_sync(client, server.bound_port)
                nursery.cancel_scope.cancel()

    trio.run(main)
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


class _StarvedListener(trio.abc.Listener[trio.SocketStream]):
    """accept() fails with EMFILE `times` times, then waits forever."""

    def __init__(self, times: int) -> None:
        self.left = times

    async def accept(self) -> trio.SocketStream:
        if self.left:
            self.left -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        pass


def test_running_out_of_files_is_one_line_per_interval_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    server = StatusServer(0, sources())
    listener = _StarvedListener(times=500)  # 500 retries, 0.1 s apart in mock time, well under 10 s of real

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._accept_loop, listener, nursery)
            while listener.left:
                await trio.sleep(1)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, "pilotfish.status"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert server.accept_errors == 500
    lines = [r.getMessage() for r in caplog.records]
    want = f"status: cannot accept connections: Too many open files (open files limit {open_files_limit()})"
    assert lines == [want] and not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("peer,local", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("2001:db8::1", False),
])
def test_is_local(peer: str, local: bool) -> None:
    assert is_local(peer) is local
