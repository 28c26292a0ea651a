"""The DNS proxy's I/O shell: sockets, the UDP serving threads, the trio tasks for TCP and
forwarding, and the swap of lookup tables.

UDP is served by one plain thread per socket with a blocking recvfrom/sendto loop: measured on
this machine, that loop keeps up with dnsmasq while the same loop on trio reaches a third of it
(docs/istio-compat.md "Measured figures"). Its hot path is a dict lookup in a memo of finished
replies, keyed by what decides the answer (dns/memo.py), then an ID patch: mesh answers and forwarded answers still fresh in the
cache alike. A miss runs the pure engine in the same thread; a query that must go upstream is
sent by that thread and relayed by the UDP forwarder's thread (dns/udpforward.py). TCP, and the
TCP clients' forwards, run on the trio loop.

A new NameTable is built into a new LookupTable aside and installed with one reference
assignment, together with new memos, so a reader sees either the old table or the new one; the
memo entries whose answer the new table does not change are then carried over.

Every resource a client can make the proxy hold is bounded (docs/dns.md, "Bounds"): memo and
cache bytes, forwards in flight (sized by the open-files limit; beyond it SERVFAIL at once), TCP
connections (a new one evicts a stalled or the oldest one), and the time any send may take.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from pilotfish.common.limits import open_files_limit
from pilotfish.common.ratelog import RateLimitedLog

from .answer import Forward, Reply, respond, servfail
from .cache import UpstreamCache
from .config import DnsConfig
from .forward import TcpForwarder, Upstreams
from .memo import CachedReply, Memo, carry, lookup_reply, stored_key
from .metrics import DnsMetrics, ThreadStats
from .rebuild import Pacer, build_beside, free_replaced, table_items
from .table import LookupTable, NameInfo
from .udpforward import UdpForwarder

log = logging.getLogger("pilotfish.dns")

# 1 MiB: the default 208 KiB overflows under bursts (docs/istio-compat.md "Measured figures").
RCVBUF = 1 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by Python
MAX_INFLIGHT = 1024  # forwarded queries in progress at most, whatever the open-files limit
MAX_TCP_CONNECTIONS = 512  # miekg/Istio have no bound; CoreDNS's default max_tcp_queries... none
FD_RESERVE = 128  # descriptors left to everything else: listeners, logs, the agent's streams
# Pending connections the kernel queues. Not larger: under a flood of reconnecting clients that
# never read, a 1,024 backlog left honest clients queued behind attackers until they timed out
# (0 of 10 answered), where 128 answered 14 of 14 (p50 1.9 s; a review's TCP flood, bound 224).
TCP_BACKLOG = 128
TCP_PIPELINE = 32  # concurrent forwarded queries per TCP connection
TCP_FIRST_READ = 2.0  # seconds to the first query on a new connection (miekg's 2 s)
TCP_IDLE = 10.0  # seconds between queries before the connection is closed (RFC 7766 §6.2.3)
TCP_BODY = 2.0  # seconds to receive a message once its length prefix arrived
TCP_SEND = 2.0  # seconds any reply may take to leave (miekg's write timeout is 2 s too)
ACCEPT_BACKOFF = 0.1  # seconds between accept() retries when out of descriptors (as trio's)
PAIR_ATTEMPTS = 20  # port 0: tries to find a port free for both UDP and TCP
EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def fd_bounds(soft_limit: int, sockets_per_forward: int) -> tuple[int, int]:
    """(forwards in flight, TCP connections) that fit an open-files limit: a quarter of what is
    left after FD_RESERVE for client connections, half for forwards (each holding one socket per
    upstream it asks at once), the last quarter for kept upstream sockets and the rest of the
    process. With the common container soft limit of 1024 (when it cannot be raised): 224 TCP
    connections and 448 serial forwards, so the file table never fills (issue 7 item 4)."""
    spare = max(0, soft_limit - FD_RESERVE)
    tcp = max(8, min(MAX_TCP_CONNECTIONS, spare // 4))
    inflight = max(8, min(MAX_INFLIGHT, spare // 2 // max(1, sockets_per_forward)))
    return inflight, tcp


@dataclass(frozen=True)
class BuiltLookup:
    """A lookup table built aside, and how long it took (logged when it is swapped in)."""

    lookup: LookupTable
    build_seconds: float


class ServingState:
    """What a reader needs, swapped as one reference: the table and the reply memos for it."""

    __slots__ = ("table", "tcp_memo", "udp_memo")

    def __init__(self, table: LookupTable | None) -> None:
        self.table = table
        self.udp_memo = Memo()
        self.tcp_memo = Memo()


_turns = itertools.count()  # rotation for replies built on the slow path (next() is atomic)


def _pick(reply: Reply) -> int:
    """Which variant to send. Queries that are not memoised (not in canonical form) miss the
    memo every time, so the slow path must rotate too."""
    n = len(reply.variants)
    return next(_turns) % n if n > 1 else 0


class _Connection:
    """A TCP client connection as the connection limit sees it."""

    __slots__ = ("scope", "sending")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.sending = False  # in a send: a client that never reads is stuck here


def _bind(family: socket.AddressFamily, kind: socket.SocketKind, addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            try:  # FORCE passes net.core.rmem_max when we may (root or CAP_NET_ADMIN)
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same address and port.

    With port 0 (tests, demos) the kernel picks the UDP port and TCP takes the same one, as a
    client expects both on one port; that port may already be in use for TCP (another
    connection's ephemeral port), so a new pair is tried.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(PAIR_ATTEMPTS):
        udp = _bind(family, socket.SOCK_DGRAM, (host, port))
        try:
            return udp, _bind(family, socket.SOCK_STREAM, (host, port or udp.getsockname()[1]))
        except OSError as err:
            udp.close()
            if port or err.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no free UDP+TCP port pair on {host} after {PAIR_ATTEMPTS} tries")


class DnsProxy:
    """The DNS proxy: binds at construction, serves while `serve()` runs."""

    def __init__(self, config: DnsConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.cache = UpstreamCache(
            config.cache_size, config.cache_max_ttl, config.cache_negative_ttl, config.cache_stale,
            config.cache_max_bytes,
        ) if config.cache_size > 0 else None
        self._state = ServingState(None)
        self.metrics = DnsMetrics(self.registry, self.cache, self._memo_usage)
        per_forward = len(config.upstreams) if config.forward_parallel else 1
        inflight_bound, tcp_bound = fd_bounds(open_files_limit(), per_forward)
        self.max_inflight = config.max_inflight or inflight_bound
        self.max_tcp_connections = config.max_tcp_connections or tcp_bound
        self._exhausted_lock = threading.Lock()
        upstreams = Upstreams(config.upstreams, config.forward_parallel, config.forward_timeout)
        self.tcp_forwarder = TcpForwarder(upstreams, self.cache, self.metrics, self._exhausted)
        self.udp_forwarder = UdpForwarder(
            upstreams, self.cache, self.metrics, self.max_inflight, self._exhausted, self._log_rejected
        )
        self._stopping = False
        self._udp: list[socket.socket] = []
        self._tcp: list[socket.socket] = []
        try:
            for host, port in config.listen:  # UDP then TCP per address, as Istio binds them
                udp, tcp = _bind_pair(host, port)
                self._udp.append(udp)
                self._tcp.append(tcp)
        except BaseException:
            self.close()
            raise
        self.udp_addresses = [s.getsockname()[:2] for s in self._udp]
        self.tcp_addresses = [s.getsockname()[:2] for s in self._tcp]
        self._inflight = 0
        self._connections: dict[_Connection, None] = {}  # oldest first
        self._trio_stats: ThreadStats = self.metrics.thread_stats()
        self._bug_log = RateLimitedLog(log)
        self._busy_log = RateLimitedLog(log)
        self._exhausted_log = RateLimitedLog(log)
        self._tcp_log = RateLimitedLog(log)

    @property
    def table(self) -> LookupTable | None:
        """The lookup table being served (None before the first NameTable)."""
        return self._state.table

    def build_table(self, table: Mapping[str, NameInfo] | Any) -> BuiltLookup:
        """Build a lookup table, with this proxy's namespace, domain and search, from a
        NameTable (its serialized bytes, the proto message, its `table` map, or (host, NameInfo)
        pairs), without serving it. Safe from any thread; serving goes on meanwhile, paced so
        that it keeps the GIL (dns/rebuild.py). Raises TableError on a table that does not build."""
        cfg = self.config
        started = time.perf_counter()
        lookup = build_beside(table_items(table), cfg.proxy_namespace, cfg.proxy_domain, cfg.search)
        return BuiltLookup(lookup, time.perf_counter() - started)

    def set_table(self, table: Mapping[str, NameInfo] | Any) -> LookupTable:
        """Build a lookup table (build_table) and swap it in; one that does not build changes nothing."""
        built = self.build_table(table)
        self.install(built.lookup, built.build_seconds)
        return built.lookup

    def install(self, lookup: LookupTable, build_seconds: float) -> None:
        """Swap in a lookup table built aside (with this proxy's namespace, domain and search),
        carry over the memo entries it does not change, then free the replaced one piecemeal."""
        new = ServingState(lookup)
        replaced, self._state = self._state, new
        log.info(
            "dns: name table installed: %d hosts, %d names, built in %.1f ms",
            lookup.entries, len(lookup), build_seconds * 1000,
        )
        pause = Pacer()
        for old_memo, new_memo in ((replaced.udp_memo, new.udp_memo), (replaced.tcp_memo, new.tcp_memo)):
            carry(old_memo, new_memo, replaced.table, lookup, pause)
            old_memo.clear()
        del new
        free_replaced(replaced)

    def _memo_usage(self) -> tuple[int, int]:
        """(entries, bytes) of the reply memos being served."""
        state = self._state
        return len(state.udp_memo) + len(state.tcp_memo), state.udp_memo.nbytes + state.tcp_memo.nbytes

    def _exhausted(self, err: OSError) -> None:
        """Out of descriptors or buffers: counted, one line per interval, never a traceback.
        Called from any thread."""
        with self._exhausted_lock:
            self.metrics.resource_exhausted += 1
        self._exhausted_log(
            logging.WARNING, "dns: out of resources (%s); open files limit %d",
            err.strerror or err, open_files_limit(),
        )

    def close(self) -> None:
        """Close every socket (serve() does this on exit)."""
        for sock in self._udp + self._tcp:
            sock.close()
        self.udp_forwarder.close()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, then stop the UDP threads and close the sockets."""
        threads = [
            threading.Thread(target=self._udp_loop, args=(sock,), name=f"dns-udp-{i}", daemon=True)
            for i, sock in enumerate(self._udp)
        ]
        threads.append(threading.Thread(
            target=self.udp_forwarder.run, args=(lambda: self._stopping,), name="dns-forward", daemon=True
        ))
        try:
            async with trio.open_nursery() as nursery:
                for thread in threads:
                    thread.start()
                for sock in self._tcp:
                    nursery.start_soon(self._accept, trio.socket.from_stdlib_socket(sock), nursery)
                for kind, addrs in (("udp", self.udp_addresses), ("tcp", self.tcp_addresses)):
                    for host, port in addrs:
                        log.info("dns: listening %s %s", kind, _hostport(host, port))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stopping = True
            for sock in self._udp:
                try:
                    sock.shutdown(socket.SHUT_RD)  # wakes the thread blocked in recvfrom
                except OSError:
                    pass
            with trio.CancelScope(shield=True):  # finish the shutdown even though cancelled
                for thread in threads:
                    if thread.is_alive():
                        await trio.to_thread.run_sync(thread.join, 2.0)
            self.close()

    # --- UDP ---------------------------------------------------------------------------------

    def _udp_loop(self, sock: socket.socket) -> None:
        stats = self.metrics.thread_stats()
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        monotonic = time.monotonic
        while not self._stopping:
            try:
                data, addr = recvfrom(65535)
            except OSError:
                if self._stopping:
                    return
                continue
            # dns/memo.py: the key is the packet up to the name's root label, QTYPE, QCLASS and
            # an OPT record's fixed part; inlined here, as is lookup_reply
            value = self._state.udp_memo.get(data[2 : data.find(b"\0", 12) + 14])
            if value is not None:
                kind = type(value)
                if kind is bytes:
                    body = value
                    stats.memo_hits += 1
                elif kind is CachedReply:
                    body = value.current(monotonic())
                    stats.cache_hits += body is not None
                else:
                    body = next(value)
                    stats.memo_hits += 1
                if body is not None:
                    try:
                        sendto(data[:2] + body, addr)
                    except OSError:
                        pass
                    continue
            if not data and self._stopping:
                return
            try:
                self._udp_slow(sock, data, addr, stats)
            except Exception:  # a bug must cost one query, not the listener
                self._bug_log(logging.ERROR, "dns: error handling a UDP query", exc_info=True)

    def _answer(
        self, state: ServingState, data: bytes, tcp: bool, stats: ThreadStats
    ) -> bytes | Forward | None:
        """The slow path of both transports: run the engine on `state`'s table, count, pick the
        rotation to send and memoise a local answer. Returns the reply, a query to forward, or
        None (drop)."""
        outcome = respond(state.table, data, tcp, self.config.forward_before_table)
        if outcome is None or isinstance(outcome, Forward):
            if outcome is not None:
                stats.requests += 1
            return outcome
        _count(stats, outcome)
        sent = _pick(outcome)
        if outcome.local:
            key = stored_key(data)
            if key is not None:
                (state.tcp_memo if tcp else state.udp_memo).put_local(key, outcome.variants, sent)
        return outcome.variants[sent]

    def _udp_slow(self, sock: socket.socket, data: bytes, addr: Any, stats: ThreadStats) -> None:
        state = self._state  # the forwarded answer goes to the memo of the table that forwarded
        result = self._answer(state, data, False, stats)
        if result is None:
            return
        if isinstance(result, bytes):
            try:
                sock.sendto(result, addr)
            except OSError:
                pass
            return
        self.udp_forwarder.submit(result, sock, addr, state.udp_memo, stored_key(data))

    def _take_forward(self) -> bool:
        """Count a TCP client's forward in flight; False (counted, logged per interval) at the
        bound, a quarter of the UDP one (TCP clients are the few retrying truncated replies)."""
        if self._inflight < max(8, self.max_inflight // 4):
            self._inflight += 1
            return True
        self.metrics.forward_rejected += 1
        self._log_rejected(self._inflight)
        return False

    def _log_rejected(self, in_flight: int) -> None:
        self._busy_log(
            logging.WARNING, "dns: %d forwarded queries in flight (the bound): answering SERVFAIL",
            in_flight,
        )

    # --- TCP ---------------------------------------------------------------------------------

    async def _accept(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Accept connections for as long as the proxy serves. Out of descriptors: counted, one
        line per interval and a pause, never a traceback per retry (trio's serve_listeners logs
        one per failed accept)."""
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as err:
                if err.errno in EXHAUSTION:
                    self._exhausted(err)
                    await trio.sleep(ACCEPT_BACKOFF)
                elif err.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    self._tcp_log(logging.WARNING, "dns: accept failed: %s", err.strerror or err)
                    await trio.sleep(ACCEPT_BACKOFF)
                continue
            nursery.start_soon(self._tcp_connection, trio.SocketStream(conn))

    def _make_room(self) -> None:
        """At the connection bound, close the oldest connection stuck in a send (a client that
        does not read), else the oldest of all (idle or slow): honest clients keep getting in
        while the bound is under attack, an attacker's connections live only until the next
        arrivals."""
        victim = next((c for c in self._connections if c.sending), None)
        if victim is None:
            victim = next(iter(self._connections))
        del self._connections[victim]
        victim.scope.cancel()
        self.metrics.tcp_evicted += 1
        self._tcp_log(
            logging.WARNING, "dns: %d TCP connections open (the bound): closed the %s one",
            len(self._connections) + 1, "stalled" if victim.sending else "oldest",
        )

    async def _tcp_connection(self, stream: trio.SocketStream) -> None:
        if len(self._connections) >= self.max_tcp_connections:
            self._make_room()
        with trio.CancelScope() as scope:
            conn = _Connection(scope)
            self._connections[conn] = None
            try:
                try:
                    async with stream, trio.open_nursery() as nursery:
                        await self._tcp_queries(stream, nursery, conn)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the client went away (trio reports it inside an exception group)
            except Exception:  # a bug must cost one connection, not the listener
                self._bug_log(logging.ERROR, "dns: error on a TCP connection", exc_info=True)
            finally:
                self._connections.pop(conn, None)

    async def _send(self, stream: trio.SocketStream, lock: trio.Lock, conn: _Connection, reply: bytes) -> None:
        """Send one framed reply within TCP_SEND, else close the connection: a client that
        pipelines queries and never reads would otherwise hold it, and a slot, forever."""
        with trio.move_on_after(TCP_SEND) as deadline:
            async with lock:
                conn.sending = True
                await stream.send_all(_framed(reply))
                conn.sending = False
        if deadline.cancelled_caught:
            self.metrics.tcp_send_timeouts += 1
            conn.scope.cancel()
            await trio.lowlevel.checkpoint()

    async def _tcp_queries(self, stream: trio.SocketStream, nursery: trio.Nursery, conn: _Connection) -> None:
        """Read length-prefixed queries; answer local ones in order, forward others
        concurrently (RFC 7766 §6.2.1.1 allows replies out of order)."""
        reader = _StreamReader(stream)
        send_lock = trio.Lock()
        pipeline = trio.Semaphore(TCP_PIPELINE)
        wait = TCP_FIRST_READ
        stats = self._trio_stats
        while True:
            prefix = data = None
            with trio.move_on_after(wait):
                prefix = await reader.read(2)
            if prefix is None:
                return
            wait = TCP_IDLE
            with trio.move_on_after(TCP_BODY):
                data = await reader.read(int.from_bytes(prefix, "big"))
            if data is None:
                return
            reply = lookup_reply(self._state.tcp_memo, data)
            if reply is not None:
                stats.memo_hits += 1
            else:
                result = self._answer(self._state, data, True, stats)
                if result is None:
                    continue
                if isinstance(result, Forward):
                    await pipeline.acquire()
                    if not self._take_forward():
                        pipeline.release()
                        await self._send(stream, send_lock, conn, servfail(result.query))
                        continue
                    nursery.start_soon(self._forward_tcp, result, stream, send_lock, pipeline, conn)
                    continue
                reply = result
            await self._send(stream, send_lock, conn, reply)

    async def _forward_tcp(
        self, fwd: Forward, stream: trio.SocketStream, lock: trio.Lock, pipeline: trio.Semaphore,
        conn: _Connection,
    ) -> None:
        try:
            resolved = await self.tcp_forwarder.resolve(fwd)
            await self._send(stream, lock, conn, resolved.reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a bug must cost one query, not the connection's siblings
            self._bug_log(logging.ERROR, "dns: error forwarding a TCP query", exc_info=True)
        finally:
            self._inflight -= 1
            pipeline.release()


def _count(stats: ThreadStats, reply: Reply) -> None:
    if reply.handled:
        stats.requests += 1
        if reply.local:
            stats.local += 1


def _framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _StreamReader:
    """Exact-length reads from a trio stream (DNS over TCP frames messages by length)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def read(self, n: int) -> bytes | None:
        """n bytes, or None at end of stream (or when cancelled by the caller's timeout)."""
        while len(self._buf) < n:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

