"""Forwarding to the upstream nameservers (trio): serial or parallel, per-server timeouts, the
upstream cache in front, serve-stale behind.

Istio's exchange rules are kept (reference §7): the client's ID goes upstream unchanged, UDP
replies with a foreign ID are ignored until the deadline, a TCP reply with a foreign ID fails
that server, any reply that parses wins whatever its rcode, serial mode tries the servers in a
random order. Changes: a UDP reply must also echo our question to be accepted (a cheap guard
against spoofed replies); parallel mode with no nameservers answers SERVFAIL at once (Istio
never replies); an upstream SERVFAIL falls back to a stale cache entry when there is one.

UDP sockets to the upstreams are kept and reused (UpstreamSockets): a socket(), connect() and
close() per query cost three system calls and, with a silent upstream, one file descriptor per
query in flight. A kept socket serves one exchange at a time; a reply to an earlier exchange
that arrives late is ignored like any foreign reply (ID and question must match). A socket
whose exchange timed out is closed, not kept, so a late reply never waits in a kept one.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import trio

from . import cache as cache_mod
from .answer import Forward, servfail
from .cache import Entry, UpstreamCache
from .metrics import DnsMetrics
from .relay import relay, upstream_query
from .wire import QR, RCODE_MASK, SERVFAIL, Message, WireError, parse_message

Server = tuple[str, int]
Exchange = tuple[bytes, Message]
ExchangeFn = Callable[[Server, bytes, Message, float, "UpstreamSockets"], Awaitable["Exchange | None"]]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _same_question(query: Message, reply: Message) -> bool:
    if not reply.qname:  # some servers drop the question from error replies
        return True
    return (
        reply.qname.lower() == query.qname.lower()
        and reply.qtype == query.qtype
        and reply.qclass == query.qclass
    )


KEPT_SOCKETS = 64  # idle UDP sockets kept per upstream: what a burst of cache misses reuses


class UpstreamSockets:
    """Sockets to the upstreams (trio thread only): connected UDP ones kept between exchanges,
    and where a socket cannot be had (EMFILE, ENOBUFS...), the failure reported to `on_error`
    and the exchange failed, never an exception out of the forwarder."""

    def __init__(self, on_error: Callable[[OSError], None], keep: int = KEPT_SOCKETS) -> None:
        self._keep = keep
        self._on_error = on_error
        self._idle: dict[Server, list[trio.socket.SocketType]] = {}

    def new(self, server: Server, kind: socket.SocketKind) -> trio.socket.SocketType | None:
        try:
            return trio.socket.socket(_family(server[0]), kind)
        except OSError as err:
            self._on_error(err)
            return None

    async def take(self, server: Server) -> trio.socket.SocketType | None:
        """An idle UDP socket connected to `server`, or a new one; None when none can be made."""
        idle = self._idle.get(server)
        if idle:
            return idle.pop()
        sock = self.new(server, socket.SOCK_DGRAM)
        if sock is None:
            return None
        try:
            await sock.connect(server)
        except OSError as err:
            sock.close()
            self._on_error(err)
            return None
        except BaseException:
            sock.close()
            raise
        return sock

    def give_back(self, server: Server, sock: trio.socket.SocketType) -> None:
        idle = self._idle.setdefault(server, [])
        if len(idle) < self._keep:
            idle.append(sock)
        else:
            sock.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for sock in idle:
                sock.close()
        self._idle.clear()


async def exchange_udp(
    server: Server, wire: bytes, query: Message, timeout: float, sockets: UpstreamSockets
) -> Exchange | None:
    """One UDP exchange on a kept socket; None on timeout, ICMP error, an unparsable reply, or
    when no socket can be had."""
    sock = await sockets.take(server)
    if sock is None:
        return None
    done = False
    try:
        with trio.move_on_after(timeout):
            try:
                await sock.send(wire)
                while True:
                    data = await sock.recv(65535)
                    if len(data) < 12 or data[:2] != wire[:2] or not data[2] & (QR >> 8):
                        continue  # not a reply to this query: keep waiting
                    try:
                        reply = parse_message(data)
                    except WireError:
                        return None
                    if _same_question(query, reply):
                        done = True
                        return data, reply
            except OSError:  # ICMP unreachable and the like: this exchange fails, not the proxy
                return None
        return None
    finally:
        if done:
            sockets.give_back(server, sock)
        else:
            sock.close()


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def exchange_tcp(
    server: Server, wire: bytes, query: Message, timeout: float, sockets: UpstreamSockets
) -> Exchange | None:
    """One TCP exchange on a fresh connection; an ID mismatch fails the server, as in Istio."""
    sock = sockets.new(server, socket.SOCK_STREAM)
    if sock is None:
        return None
    with trio.move_on_after(timeout):
        try:
            await sock.connect(server)
            async with trio.SocketStream(sock) as stream:
                await stream.send_all(len(wire).to_bytes(2, "big") + wire)
                prefix = await _read_exactly(stream, 2)
                data = await _read_exactly(stream, int.from_bytes(prefix, "big")) if prefix else None
                if data is None or len(data) < 12 or data[:2] != wire[:2]:
                    return None
                try:
                    return data, parse_message(data)
                except WireError:
                    return None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        finally:
            sock.close()
    return None


class Resolved(NamedTuple):
    """A reply for the client, and the fresh cache entry it came from or went to (or None)."""

    reply: bytes
    entry: Entry | None


class Forwarder:
    """Resolves forwarded queries through the cache and the upstream nameservers."""

    def __init__(
        self,
        upstreams: Sequence[Server],
        parallel: bool,
        timeout: float,
        cache: UpstreamCache | None,
        metrics: DnsMetrics,
        on_socket_error: Callable[[OSError], None],
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.parallel = parallel
        self.timeout = timeout
        self.cache = cache
        self.metrics = metrics
        self.sockets = UpstreamSockets(on_socket_error)

    async def resolve(self, fwd: Forward, tcp: bool) -> Resolved:
        """The reply for the client (never raises for upstream trouble)."""
        query = fwd.query
        cache = self.cache
        key = cache_mod.cache_key(query) if cache is not None else None
        now = time.monotonic()
        if cache is not None and key is not None:
            entry = cache.fresh(key, now)
            if entry is not None:
                return Resolved(cache_mod.render(query, entry, now, tcp), entry)
        result = None
        if self.upstreams:
            wire = upstream_query(query, fwd.raw, tcp)
            self.metrics.upstream_requests += 1
            started = time.monotonic()
            if self.parallel:
                result = await self._parallel(wire, query, tcp)
            else:
                result = await self._serial(wire, query, tcp)
            self.metrics.upstream_duration.observe(time.monotonic() - started)
        now = time.monotonic()
        if result is None or result[1].flags & RCODE_MASK == SERVFAIL:
            stale = cache.stale_entry(key, now) if cache is not None and key is not None else None
            if stale is not None:
                return Resolved(cache_mod.render(query, stale, now, tcp, stale=True), None)
        if result is None:
            self.metrics.upstream_failures += 1
            return Resolved(servfail(query), None)
        raw, reply = result
        stored = cache.put(key, raw, reply, now) if cache is not None and key is not None else None
        return Resolved(relay(query, raw, reply, tcp), stored)

    @staticmethod
    def _exchange(tcp: bool) -> ExchangeFn:
        """Upstream exchanges use the client's transport, as Istio's do."""
        return exchange_tcp if tcp else exchange_udp

    async def _serial(self, wire: bytes, query: Message, tcp: bool) -> Exchange | None:
        order = list(self.upstreams)
        random.shuffle(order)
        exchange = self._exchange(tcp)
        for server in order:
            result = await exchange(server, wire, query, self.timeout, self.sockets)
            if result is not None:
                return result
        return None

    async def _parallel(self, wire: bytes, query: Message, tcp: bool) -> Exchange | None:
        exchange = self._exchange(tcp)
        winner: list[Exchange] = []

        async def one(server: Server) -> None:
            result = await exchange(server, wire, query, self.timeout, self.sockets)
            if result is not None and not winner:
                winner.append(result)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for server in self.upstreams:
                nursery.start_soon(one, server)
        return winner[0] if winner else None
