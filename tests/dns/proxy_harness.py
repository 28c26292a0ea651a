"""Run pilotfish's DNS proxy in-process for black-box tests, and talk to it like a client.

Why in-process and in a thread: a fresh proxy per test case must start and stop in milliseconds
(the proxy keeps an upstream cache that would otherwise hide later upstream queries), and the
test code itself is plain blocking socket code. So the proxy gets its own trio loop in a daemon
thread; the harness keeps that loop's token and a CancelScope around ``serve()`` so it can stop
the proxy cleanly from the test thread and join the thread. An exception that escapes
``serve()`` is kept and re-raised by ``stop()``, so a crashing proxy fails the test.

The client helpers send raw wire bytes (the tests build them with dnslib) and return raw reply
bytes, so nothing of pilotfish is involved on the client side.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator

import trio

from pilotfish.dns.config import DnsConfig
from pilotfish.dns.server import DnsProxy
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

STOP_TIMEOUT = 5.0  # seconds to wait for the proxy thread after cancelling serve()


class ProxyRunner:
    """One DnsProxy serving in a background thread with its own trio loop.

    The proxy is constructed (and binds its sockets) in the calling thread, so a bind error
    surfaces right there; ``tables`` are pushed with ``set_table`` in order before serving starts
    (none: the proxy stays in its before-first-table state).
    """

    def __init__(self, config: DnsConfig, tables: Iterable[NameTable] = ()) -> None:
        self.config = config
        self.proxy = DnsProxy(config)
        try:
            for table in tables:
                self.proxy.set_table(table)
        except BaseException:
            self.proxy.close()
            raise
        self.exception: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dns-proxy-under-test", daemon=True)
        self.serve_returned = False  # serve() must only return when cancelled

    @property
    def udp_address(self) -> tuple[str, int]:
        return tuple(self.proxy.udp_addresses[0])  # type: ignore[return-value]

    @property
    def tcp_address(self) -> tuple[str, int]:
        return tuple(self.proxy.tcp_addresses[0])  # type: ignore[return-value]

    def address(self, transport: str) -> tuple[str, int]:
        return self.udp_address if transport == "udp" else self.tcp_address

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.exception is None

    def start(self, timeout: float = STOP_TIMEOUT) -> ProxyRunner:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("proxy thread did not start its trio loop")
        if self.exception is not None:
            raise RuntimeError("proxy failed while starting") from self.exception
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread by stop()
            self.exception = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            self._ready.set()
            await self.proxy.serve()
            self.serve_returned = True

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Cancel ``serve()``, join the thread, and re-raise whatever escaped from the proxy."""
        if self._thread.is_alive() and self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"proxy did not stop within {timeout} s of being cancelled")
        if self.exception is not None:
            raise RuntimeError("the proxy's serve() raised") from self.exception
        if self.serve_returned:
            raise RuntimeError("the proxy's serve() returned without being cancelled")

    def __enter__(self) -> ProxyRunner:
        return self.start()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self.stop()
        except Exception:
            if exc_type is None:  # don't mask the test's own failure
                raise


@contextlib.contextmanager
def running_proxy(config: DnsConfig, tables: Iterable[NameTable] = ()) -> Iterator[ProxyRunner]:
    """Context manager form: a started proxy, stopped (and checked) on exit."""
    with ProxyRunner(config, tables) as runner:
        yield runner


# --- clients -----------------------------------------------------------------------------------


def _family(addr: tuple[str, int]) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr[0] else socket.AF_INET


def udp_exchange(addr: tuple[str, int], wire: bytes, timeout: float) -> bytes | None:
    """Send one datagram, return the first reply datagram, or None if none came in time.

    A connected socket, so only the proxy's own address can answer.
    """
    with socket.socket(_family(addr), socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        sock.send(wire)
        sock.settimeout(timeout)
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    """Read exactly ``size`` bytes before ``deadline`` (time.monotonic); None on EOF/timeout."""
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(size - len(data))
        except (TimeoutError, ConnectionResetError):
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def tcp_read_message(sock: socket.socket, deadline: float) -> bytes | None:
    """One length-prefixed DNS message from a TCP stream, or None on EOF/timeout."""
    prefix = recv_exact(sock, 2, deadline)
    if prefix is None:
        return None
    return recv_exact(sock, struct.unpack("!H", prefix)[0], deadline)


def tcp_exchange(addr: tuple[str, int], wire: bytes, timeout: float) -> bytes | None:
    """One query over a fresh TCP connection (2-byte length prefix); None if no reply in time."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        return tcp_read_message(sock, deadline)


def exchange(transport: str, addr: tuple[str, int], wire: bytes, timeout: float) -> bytes | None:
    if transport == "udp":
        return udp_exchange(addr, wire, timeout)
    if transport == "tcp":
        return tcp_exchange(addr, wire, timeout)
    raise ValueError(f"unknown transport {transport!r}")
