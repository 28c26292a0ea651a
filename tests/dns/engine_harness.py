"""The DNS proxy's pure core run in-process, for tests that are about answers, not transport.

Why: a proxy with sockets, threads and a trio loop per case made the 213 vector cases and the
fuzzer spend their time starting and stopping proxies and waiting out forward timeouts. Here a
query goes where it goes in the proxy (dns/server.py): the reply memo, on a miss the answer
engine (`respond`), whose local answers are memoised, then for a forward the real forwarders, `UdpForwarder` (dns/udpforward.py)
for UDP clients and `TcpForwarder` (dns/forward.py) for TCP clients, with two stand-ins injected:

* the upstream nameservers are the dnslib mock's `answer` (tests/dns/mock_upstream.py) behind a
  socketpair per upstream socket (UDP) or an in-memory stream per exchange (TCP), so every query
  the forwarders send is recorded as the mock would record it, and its replies are checked by
  the forwarders' own code (ID, QR, question; TCP framing);
* time is a `FakeClock` (UDP) or trio's `MockClock` (TCP): a silent upstream costs no wall time,
  and a timeout is observed on the clock the forwarder itself reads.

What this leaves to the socket tests: reading and writing datagrams and streams, the memo's hot
path, TCP connection handling (tests/dns/test_proxy.py, test_hostile.py, test_fuzz.py, and a few
vectors through a real socket in test_vectors.py).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, NamedTuple

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from mock_upstream import ReceivedQuery, answer, describe_query
from pilotfish.dns.answer import Forward, Reply, respond
from pilotfish.dns.cache import UpstreamCache
from pilotfish.dns.config import DnsConfig
from pilotfish.dns.forward import Exchange, Server, TcpForwarder, Upstreams, exchange_on
from pilotfish.dns.memo import Memo, lookup_reply, stored_key
from pilotfish.dns.metrics import DnsMetrics
from pilotfish.dns.rebuild import build_beside, table_items
from pilotfish.dns.table import LookupTable
from pilotfish.dns.udpforward import UdpForwarder

CLIENT = ("192.0.2.1", 53000)  # where the replies of the UDP forwarder go (recorded, not sent)
MAX_STEPS = 1000  # iterations of the forwarder's loop for one query, at most


class FakeClock:
    """Monotonic seconds that move only when the test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Client:
    """Stands for the UDP client socket: keeps what the forwarder sends and when (on the clock)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[tuple[bytes, float]] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        assert addr == CLIENT, addr
        self.sent.append((data, self.clock()))
        return len(data)


class Upstream:
    """The mock nameserver (`behaviour` as in mock_upstream.py) at every address but `closed`,
    where nothing listens: UDP sends are refused (as after an ICMP port unreachable) and TCP
    connections fail at once."""

    def __init__(self, behaviour: str, closed: frozenset[Server] = frozenset()) -> None:
        self.behaviour = behaviour
        self.closed = closed
        self.queries: list[ReceivedQuery] = []
        self._ends: list[socket.socket] = []  # the upstream's side of each UDP socket
        self._replies: dict[tuple[str, bytes], tuple[int, bytes | None]] = {}

    def answer(self, raw: bytes) -> bytes | None:
        """The mock's reply, remembered by the query after its ID: the ID is all the mock's reply
        takes from the rest of the packet (its own, or one more for `bad_id`), and packing a
        64-record reply with dnslib costs a millisecond."""
        if len(raw) < 2:
            return answer(raw, self.behaviour)
        key = (self.behaviour, raw[2:])  # a test may change the behaviour
        known = self._replies.get(key)
        if known is None:
            reply = answer(raw, self.behaviour)
            shift = 0 if reply is None else int.from_bytes(reply[:2], "big") - int.from_bytes(raw[:2], "big")
            known = self._replies[key] = (shift, None if reply is None else reply[2:])
        shift, body = known
        if body is None:
            return None
        return ((int.from_bytes(raw[:2], "big") + shift) % 65536).to_bytes(2, "big") + body

    def connect_udp(self, server: Server) -> socket.socket:
        """For UdpForwarder: a connected datagram socket whose peer is this upstream."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        theirs.setblocking(False)
        if server in self.closed:
            theirs.close()
        else:
            self._ends.append(theirs)
        return ours

    def answer_udp(self) -> bool:
        """Read every datagram sent so far and answer it; True when a reply was sent."""
        replied = False
        for end in self._ends:
            while True:
                try:
                    raw = end.recv(65535)
                except BlockingIOError:
                    break
                except OSError:  # the forwarder closed its side
                    break
                self.queries.append(describe_query(raw, "udp"))
                reply = self.answer(raw)
                if reply is not None:
                    with contextlib.suppress(OSError):
                        end.send(reply)
                        replied = True
        return replied

    def close(self) -> None:
        for end in self._ends:
            end.close()
        self._ends.clear()

    async def exchange_tcp(
        self, server: Server, wire: bytes, timeout: float, on_error: Any
    ) -> Exchange | None:
        """For TcpForwarder, in place of dns/forward.py `exchange_tcp`: the same framing and
        checks (`exchange_on`), on an in-memory stream to this upstream."""
        if server in self.closed:
            return None
        ours, theirs = trio.testing.memory_stream_pair()
        result = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_tcp, theirs)
            with trio.move_on_after(timeout):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    result = await exchange_on(ours, wire)
            nursery.cancel_scope.cancel()
        return result

    async def _serve_tcp(self, stream: trio.abc.Stream) -> None:
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        raw = data[2 : 2 + int.from_bytes(data[:2], "big")]
        self.queries.append(describe_query(raw, "tcp"))
        reply = self.answer(raw)
        if reply is None:
            await trio.sleep_forever()
        await stream.send_all(len(reply).to_bytes(2, "big") + reply)


class Answer(NamedTuple):
    """What the client got (None: nothing) and after how long on the forwarder's clock."""

    reply: bytes | None
    elapsed: float


class Engine:
    """The proxy's core for one configuration and table: answers queries in-process."""

    def __init__(self, config: DnsConfig, table: Any | None, upstream: Upstream) -> None:
        self.config = config
        self.upstream = upstream
        self.table: LookupTable | None = None
        if table is not None:
            self.table = build_beside(
                table_items(table), config.proxy_namespace, config.proxy_domain, config.search
            )
        self.cache = UpstreamCache(
            config.cache_size, config.cache_max_ttl, config.cache_negative_ttl, config.cache_stale,
            config.cache_max_bytes,
        ) if config.cache_size > 0 else None
        self.metrics = DnsMetrics(CollectorRegistry(), self.cache)
        self.upstreams = Upstreams(config.upstreams, config.forward_parallel, config.forward_timeout)
        self.socket_errors: list[OSError] = []
        self.clock = FakeClock()
        self.udp_memo = Memo()
        self.tcp_memo = Memo()

    def ask(self, wire: bytes, transport: str) -> Answer:
        """The reply a client sending `wire` over `transport` gets: local answers take the
        first rotation."""
        wire = bytes(wire)  # as a socket gives it (dnslib packs a bytearray)
        tcp = transport == "tcp"
        memo = self.tcp_memo if tcp else self.udp_memo
        hit = lookup_reply(memo, wire, self.clock)
        if hit is not None:
            return Answer(hit, 0.0)
        outcome = respond(self.table, wire, tcp, self.config.forward_before_table)
        if outcome is None:
            return Answer(None, 0.0)
        if isinstance(outcome, Reply):
            key = stored_key(wire) if outcome.local else None
            if key is not None:
                memo.put_local(key, outcome.variants, 0)
            return Answer(outcome.variants[0], 0.0)
        return self._forward_tcp(outcome) if tcp else self._forward_udp(outcome, wire)

    def _forward_udp(self, fwd: Forward, wire: bytes) -> Answer:
        """Through UdpForwarder: `submit`, then its `run` loop until the client has a reply. The
        mock answers whatever was sent; when nothing is left to read, the clock moves on by a
        tenth of the forward timeout, so a deadline is seen at most that late."""
        clock, client = self.clock, _Client(self.clock)
        started = clock()
        forwarder = UdpForwarder(
            self.upstreams, self.cache, self.metrics, 64, self.socket_errors.append, lambda _: None,
            connect=self.upstream.connect_udp, clock=clock,
        )
        steps = 0

        def stopping() -> bool:
            nonlocal steps
            steps += 1
            if client.sent or steps > MAX_STEPS:
                return True
            if not self.upstream.answer_udp():
                clock.now += self.upstreams.timeout / 10
            return False

        try:
            forwarder.submit(fwd, client, CLIENT, self.udp_memo, stored_key(wire))  # type: ignore[arg-type]
            forwarder.run(stopping)
        finally:
            forwarder.close()
            self.upstream.close()
        assert len(client.sent) <= 1, f"{len(client.sent)} replies to one query"
        if not client.sent:
            return Answer(None, clock() - started)
        reply, at = client.sent[0]
        return Answer(reply, at - started)

    def _forward_tcp(self, fwd: Forward) -> Answer:
        """Through TcpForwarder on trio's virtual clock (a timeout passes at once)."""

        async def resolve() -> Answer:
            forwarder = TcpForwarder(
                self.upstreams, self.cache, self.metrics, self.socket_errors.append,
                exchange=self.upstream.exchange_tcp, clock=trio.current_time,
            )
            started = trio.current_time()
            resolved = await forwarder.resolve(fwd)
            return Answer(resolved.reply, trio.current_time() - started)

        return trio.run(resolve, clock=trio.testing.MockClock(autojump_threshold=0))

