"""Forwarding to the upstream nameservers: what both transports share (the cache in front,
serve-stale behind, the checks a reply must pass), and the TCP clients' forwarder (trio).

UDP clients' queries are forwarded on plain threads (dns/udpforward.py); TCP clients' queries,
rare (the retry after a truncated reply) and already on the trio loop, are forwarded here over
TCP, as Istio does (upstream exchanges use the client's transport).

Istio's exchange rules are kept (docs/istio-compat.md "DNS forwarding"): the client's ID goes
upstream unchanged, UDP replies with a foreign ID are ignored until the deadline, a TCP reply with
a foreign ID fails that server, any reply that parses wins whatever its rcode, serial mode tries
the servers in a random order. Changes: a UDP reply must also echo our question to be accepted (a
cheap guard against spoofed replies); parallel mode with no nameservers answers SERVFAIL at once
(Istio never replies); an upstream SERVFAIL falls back to a stale cache entry when there is one;
UDP sockets to the upstreams are kept and reused (dns/udpforward.py), where Istio makes one per
exchange.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import trio

from . import cache as cache_mod
from .answer import Forward, servfail
from .cache import Entry, UpstreamCache
from .metrics import DnsMetrics
from .relay import relay
from .wire import QR, RCODE_MASK, SERVFAIL, Message, WireError, parse_message

Server = tuple[str, int]
Exchange = tuple[bytes, Message]


class Upstreams(NamedTuple):
    """Where and how to forward: the nameservers, all at once or one at a time, and how long
    each exchange may take. Shared by the UDP and TCP forwarders."""

    servers: tuple[Server, ...]
    parallel: bool
    timeout: float


class Resolved(NamedTuple):
    """A reply for the client, and the fresh cache entry it came from or went to (or None)."""

    reply: bytes
    entry: Entry | None


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_reply(wire: bytes, query: Message, data: bytes) -> Exchange | None:
    """`data` parsed, if it is a reply to the UDP query `wire`; None for a foreign datagram (the
    exchange keeps waiting for the right one until its deadline). A reply with our ID that does
    not parse raises WireError: that upstream failed, as in Istio (docs/istio-compat.md
    "DNS forwarding")."""
    if len(data) < 12 or data[:2] != wire[:2] or not data[2] & (QR >> 8):
        return None
    reply = parse_message(data)
    return (data, reply) if _same_question(query, reply) else None


def _same_question(query: Message, reply: Message) -> bool:
    if not reply.qname:  # some servers drop the question from error replies
        return True
    return (
        reply.qname.lower() == query.qname.lower()
        and reply.qtype == query.qtype
        and reply.qclass == query.qclass
    )


def from_cache(cache: UpstreamCache | None, query: Message, now: float, tcp: bool) -> Resolved | None:
    """The reply from a fresh cache entry, or None (counted as a miss)."""
    key = cache_mod.cache_key(query) if cache is not None else None
    if cache is None or key is None:
        return None
    entry = cache.fresh(key, now)
    return None if entry is None else Resolved(cache_mod.render(query, entry, now, tcp), entry)


def conclude(
    cache: UpstreamCache | None, query: Message, result: Exchange | None, now: float, tcp: bool
) -> tuple[Resolved, bool]:
    """What the client gets once the upstreams answered (`result`) or did not (None): the
    reply relayed and cached, else a stale entry, else SERVFAIL. The flag says it was SERVFAIL
    for want of an answer (Istio's istio_agent_dns_upstream_failures_total)."""
    key = cache_mod.cache_key(query) if cache is not None else None
    if result is None or result[1].flags & RCODE_MASK == SERVFAIL:
        stale = cache.stale_entry(key, now) if cache is not None and key is not None else None
        if stale is not None:
            return Resolved(cache_mod.render(query, stale, now, tcp, stale=True), None), False
    if result is None:
        return Resolved(servfail(query), None), True
    raw, reply = result
    stored = cache.put(key, raw, reply, now) if cache is not None and key is not None else None
    return Resolved(relay(query, raw, reply, tcp), stored), False


async def _read_exactly(stream: trio.abc.Stream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def exchange_tcp(
    server: Server, wire: bytes, timeout: float, on_error: Callable[[OSError], None]
) -> Exchange | None:
    """One TCP exchange on a fresh connection; an ID mismatch fails the server, as in Istio.
    A socket that cannot be had (EMFILE...) is reported to `on_error` and fails the exchange."""
    try:
        sock = trio.socket.socket(family(server[0]), socket.SOCK_STREAM)
    except OSError as err:
        on_error(err)
        return None
    with trio.move_on_after(timeout):
        try:
            await sock.connect(server)
            async with trio.SocketStream(sock) as stream:
                return await exchange_on(stream, wire)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        finally:
            sock.close()
    sock.close()
    return None


async def exchange_on(stream: trio.abc.Stream, wire: bytes) -> Exchange | None:
    """The query `wire` and its reply on a connected stream (DNS over TCP framing); None when the
    stream ends early or the reply has another ID or does not parse. Raises the stream's errors."""
    await stream.send_all(len(wire).to_bytes(2, "big") + wire)
    prefix = await _read_exactly(stream, 2)
    data = await _read_exactly(stream, int.from_bytes(prefix, "big")) if prefix else None
    if data is None or len(data) < 12 or data[:2] != wire[:2]:
        return None
    try:
        return data, parse_message(data)
    except WireError:
        return None


TcpExchange = Callable[[Server, bytes, float, Callable[[OSError], None]], Awaitable[Exchange | None]]


class TcpForwarder:
    """Resolves TCP clients' forwarded queries through the cache and the upstreams (trio).

    `exchange` (one exchange with one server) and `clock` (monotonic seconds, for the cache and
    the duration metric) are parameters so that tests can run the forwarder without sockets and
    on trio's virtual clock (tests/dns/engine.py)."""

    def __init__(
        self,
        upstreams: Upstreams,
        cache: UpstreamCache | None,
        metrics: DnsMetrics,
        on_socket_error: Callable[[OSError], None],
        exchange: TcpExchange = exchange_tcp,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = upstreams
        self.cache = cache
        self.metrics = metrics
        self._on_error = on_socket_error
        self._exchange = exchange
        self._clock = clock

    async def resolve(self, fwd: Forward) -> Resolved:
        """The reply for the client (never raises for upstream trouble)."""
        query = fwd.query
        hit = from_cache(self.cache, query, self._clock(), True)
        if hit is not None:
            return hit
        result = None
        if self.upstreams.servers:
            self.metrics.upstream_requests += 1
            started = self._clock()
            if self.upstreams.parallel:
                result = await self._parallel(fwd.raw)
            else:
                result = await self._serial(fwd.raw)
            self.metrics.upstream_duration.observe(self._clock() - started)
        resolved, failed = conclude(self.cache, query, result, self._clock(), True)
        self.metrics.upstream_failures += failed
        return resolved

    async def _serial(self, wire: bytes) -> Exchange | None:
        order = list(self.upstreams.servers)
        random.shuffle(order)
        for server in order:
            result = await self._exchange(server, wire, self.upstreams.timeout, self._on_error)
            if result is not None:
                return result
        return None

    async def _parallel(self, wire: bytes) -> Exchange | None:
        winner: list[Exchange] = []

        async def one(server: Server) -> None:
            result = await self._exchange(server, wire, self.upstreams.timeout, self._on_error)
            if result is not None and not winner:
                winner.append(result)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for server in self.upstreams.servers:
                nursery.start_soon(one, server)
        return winner[0] if winner else None
