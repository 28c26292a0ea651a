"""Forwarding to the upstream nameservers (trio): serial or parallel, per-server timeouts, the
upstream cache in front, serve-stale behind.

Istio's exchange rules are kept (reference §7): the client's ID goes upstream unchanged, UDP
replies with a foreign ID are ignored until the deadline, a TCP reply with a foreign ID fails
that server, any reply that parses wins whatever its rcode, serial mode tries the servers in a
random order. Changes: a UDP reply must also echo our question to be accepted (a cheap guard
against spoofed replies); parallel mode with no nameservers answers SERVFAIL at once (Istio
never replies); an upstream SERVFAIL falls back to a stale cache entry when there is one.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

from . import cache as cache_mod
from .answer import Forward, servfail
from .cache import UpstreamCache
from .metrics import DnsMetrics
from .relay import relay, upstream_query
from .wire import QR, RCODE_MASK, SERVFAIL, Message, WireError, parse_message

Server = tuple[str, int]
Exchange = tuple[bytes, Message]
ExchangeFn = Callable[[Server, bytes, Message, float], Awaitable["Exchange | None"]]


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


async def exchange_udp(server: Server, wire: bytes, query: Message, timeout: float) -> Exchange | None:
    """One UDP exchange on a fresh socket; None on timeout, ICMP error or an unparsable reply."""
    with trio.move_on_after(timeout):
        with trio.socket.socket(_family(server[0]), socket.SOCK_DGRAM) as sock:
            try:
                await sock.connect(server)
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
                        return data, reply
            except OSError:
                return None
    return None


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def exchange_tcp(server: Server, wire: bytes, query: Message, timeout: float) -> Exchange | None:
    """One TCP exchange on a fresh connection; an ID mismatch fails the server, as in Istio."""
    with trio.move_on_after(timeout):
        sock = trio.socket.socket(_family(server[0]), socket.SOCK_STREAM)
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


class Forwarder:
    """Resolves forwarded queries through the cache and the upstream nameservers."""

    def __init__(
        self,
        upstreams: Sequence[Server],
        parallel: bool,
        timeout: float,
        cache: UpstreamCache | None,
        metrics: DnsMetrics,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.parallel = parallel
        self.timeout = timeout
        self.cache = cache
        self.metrics = metrics

    async def resolve(self, fwd: Forward, tcp: bool) -> bytes:
        """The reply for the client (never raises for upstream trouble)."""
        query = fwd.query
        cache = self.cache
        key = cache_mod.cache_key(query) if cache is not None else None
        now = time.monotonic()
        if cache is not None and key is not None:
            entry = cache.fresh(key, now)
            if entry is not None:
                return cache_mod.render(query, entry, now, tcp)
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
                return cache_mod.render(query, stale, now, tcp, stale=True)
        if result is None:
            self.metrics.upstream_failures += 1
            return servfail(query)
        raw, reply = result
        if cache is not None and key is not None:
            cache.put(key, reply, now)
        return relay(query, raw, reply, tcp)

    @staticmethod
    def _exchange(tcp: bool) -> ExchangeFn:
        """Upstream exchanges use the client's transport, as Istio's do."""
        return exchange_tcp if tcp else exchange_udp

    async def _serial(self, wire: bytes, query: Message, tcp: bool) -> Exchange | None:
        order = list(self.upstreams)
        random.shuffle(order)
        exchange = self._exchange(tcp)
        for server in order:
            result = await exchange(server, wire, query, self.timeout)
            if result is not None:
                return result
        return None

    async def _parallel(self, wire: bytes, query: Message, tcp: bool) -> Exchange | None:
        exchange = self._exchange(tcp)
        winner: list[Exchange] = []

        async def one(server: Server) -> None:
            result = await exchange(server, wire, query, self.timeout)
            if result is not None and not winner:
                winner.append(result)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for server in self.upstreams:
                nursery.start_soon(one, server)
        return winner[0] if winner else None
