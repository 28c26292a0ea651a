"""The DNS proxy's I/O shell: sockets, the UDP serving threads, the trio tasks for TCP and
forwarding, and the swap of lookup tables.

UDP is served by one plain thread per socket with a blocking recvfrom/sendto loop: measured on
this machine, that loop keeps up with dnsmasq while the same loop on trio reaches a third of it
(design.md). Its hot path is a dict lookup of the packet bytes after the ID in a memo of
finished replies, then an ID patch. A miss runs the pure engine in the same thread; a query that
must go upstream is handed to the trio loop, which owns forwarding, the cache and TCP.

A new NameTable is built into a new LookupTable aside and installed with one reference
assignment, together with empty memos, so a reader sees either the old table or the new one.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from .answer import Forward, Reply, respond
from .cache import UpstreamCache
from .config import DnsConfig
from .forward import Forwarder
from .metrics import DnsMetrics, ThreadStats
from .rebuild import build_beside, free_replaced, table_items
from .table import LookupTable, NameInfo

log = logging.getLogger("pilotfish.dns")

RCVBUF = 1 << 20  # 1 MiB: the default 208 KiB overflows under bursts (measurements.md)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by Python
MEMO_MAX = 50_000  # finished replies kept per table and transport; cleared when full
MAX_INFLIGHT = 2048  # forwarded queries in progress; beyond this, UDP queries are dropped
MAX_TCP_CONNECTIONS = 512
TCP_PIPELINE = 32  # concurrent forwarded queries per TCP connection
TCP_FIRST_READ = 2.0  # seconds to the first query on a new connection (miekg's 2 s)
TCP_IDLE = 10.0  # seconds between queries before the connection is closed (RFC 7766 §6.2.3)
TCP_BODY = 2.0  # seconds to receive a message once its length prefix arrived
LOG_EVERY = 10.0  # seconds between repeated log lines about bad input
PAIR_ATTEMPTS = 20  # port 0: tries to find a port free for both UDP and TCP


class ServingState:
    """What a reader needs, swapped as one reference: the table and the reply memos for it."""

    __slots__ = ("table", "udp_memo", "tcp_memo")

    def __init__(self, table: LookupTable | None) -> None:
        self.table = table
        self.udp_memo: dict[bytes, Any] = {}  # packet[2:] -> reply[2:] or a cycle of them
        self.tcp_memo: dict[bytes, Any] = {}


_turns = itertools.count()  # rotation for replies built on the slow path (next() is atomic)


def _pick(reply: Reply) -> int:
    """Which variant to send. Queries that never repeat byte for byte (dig sends a fresh EDNS
    cookie each time) miss the memo, so the slow path must rotate too."""
    n = len(reply.variants)
    return next(_turns) % n if n > 1 else 0


def _memo_store(memo: dict[bytes, Any], data: bytes, reply: Reply, sent: int) -> None:
    if len(memo) >= MEMO_MAX:
        memo.clear()
    variants = reply.variants
    if len(variants) == 1:
        memo[data[2:]] = variants[0][2:]
    else:  # continue the rotation after the variant just sent
        order = variants[sent + 1 :] + variants[: sent + 1]
        memo[data[2:]] = itertools.cycle([v[2:] for v in order])


def _memo_reply(memo: dict[bytes, Any], data: bytes) -> bytes | None:
    value = memo.get(data[2:])
    if value is None:
        return None
    return data[:2] + (value if type(value) is bytes else next(value))


class _RateLimitedLog:
    """One log line per interval for a recurring problem, with the count of the ones skipped."""

    def __init__(self) -> None:
        self._last = 0.0
        self._skipped = 0

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < LOG_EVERY:
            self._skipped += 1
            return
        if self._skipped:
            msg += " (%d similar suppressed)"
            args = (*args, self._skipped)
        self._last, self._skipped = now, 0
        log.log(level, msg, *args, exc_info=exc_info)


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
            sock.listen(128)
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
            config.cache_size, config.cache_max_ttl, config.cache_negative_ttl, config.cache_stale
        ) if config.cache_size > 0 else None
        self.metrics = DnsMetrics(self.registry, self.cache)
        self.forwarder = Forwarder(
            config.upstreams, config.forward_parallel, config.forward_timeout, self.cache, self.metrics
        )
        self._state = ServingState(None)
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
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._inflight = 0
        self._tcp_connections = 0
        self._trio_stats: ThreadStats = self.metrics.thread_stats()
        self._warn = _RateLimitedLog()

    @property
    def table(self) -> LookupTable | None:
        """The lookup table being served (None before the first NameTable)."""
        return self._state.table

    def set_table(self, table: Mapping[str, NameInfo] | Any) -> LookupTable:
        """Build a lookup table from a NameTable (its serialized bytes, the proto message, its
        `table` map, or (host, NameInfo) pairs) and swap it in. Safe from any thread; serving goes on with the old
        table while this builds, paced so that it keeps the GIL (dns/rebuild.py). A table that
        does not build raises TableError and changes nothing."""
        cfg = self.config
        started = time.perf_counter()
        lookup = build_beside(table_items(table), cfg.proxy_namespace, cfg.proxy_domain, cfg.search)
        self.install(lookup, time.perf_counter() - started)
        return lookup

    def install(self, lookup: LookupTable, build_seconds: float) -> None:
        """Swap in a lookup table built aside (with this proxy's namespace, domain and search),
        then free the replaced one piecemeal."""
        replaced, self._state = self._state, ServingState(lookup)
        log.info(
            "dns: name table installed: %d hosts, %d names, built in %.1f ms",
            lookup.entries, len(lookup), build_seconds * 1000,
        )
        free_replaced(replaced)

    def close(self) -> None:
        """Close every socket (serve() does this on exit)."""
        for sock in self._udp + self._tcp:
            sock.close()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, then stop the UDP threads and close the sockets."""
        self._token = trio.lowlevel.current_trio_token()
        threads = [
            threading.Thread(target=self._udp_loop, args=(sock,), name=f"dns-udp-{i}", daemon=True)
            for i, sock in enumerate(self._udp)
        ]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for thread in threads:
                    thread.start()
                for sock in self._tcp:
                    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    nursery.start_soon(trio.serve_listeners, self._tcp_connection, [listener])
                for kind, addrs in (("udp", self.udp_addresses), ("tcp", self.tcp_addresses)):
                    for host, port in addrs:
                        log.info("dns: listening %s %s", kind, _hostport(host, port))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
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
        while not self._stopping:
            try:
                data, addr = recvfrom(65535)
            except OSError:
                if self._stopping:
                    return
                continue
            memo = self._state.udp_memo
            value = memo.get(data[2:])
            if value is not None:
                stats.memo_hits += 1
                try:
                    sendto(data[:2] + (value if type(value) is bytes else next(value)), addr)
                except OSError:
                    pass
                continue
            if not data and self._stopping:
                return
            try:
                self._udp_slow(sock, data, addr, stats)
            except Exception:  # a bug must cost one query, not the listener
                self._warn(logging.ERROR, "dns: error handling a UDP query", exc_info=True)

    def _answer(self, data: bytes, tcp: bool, stats: ThreadStats) -> bytes | Forward | None:
        """The slow path of both transports: run the engine, count, pick the rotation to send
        and memoise a local answer. Returns the reply, a query to forward, or None (drop)."""
        state = self._state
        outcome = respond(state.table, data, tcp, self.config.forward_before_table)
        if outcome is None or isinstance(outcome, Forward):
            if outcome is not None:
                stats.requests += 1
            return outcome
        _count(stats, outcome)
        sent = _pick(outcome)
        if outcome.local:
            _memo_store(state.tcp_memo if tcp else state.udp_memo, data, outcome, sent)
        return outcome.variants[sent]

    def _udp_slow(self, sock: socket.socket, data: bytes, addr: Any, stats: ThreadStats) -> None:
        result = self._answer(data, False, stats)
        if result is None:
            return
        if isinstance(result, bytes):
            try:
                sock.sendto(result, addr)
            except OSError:
                pass
            return
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._start_udp_forward, result, sock, addr)
        except trio.RunFinishedError:
            pass

    def _start_udp_forward(self, fwd: Forward, sock: socket.socket, addr: Any) -> None:
        """Runs in the trio thread."""
        if self._nursery is None:
            return
        if self._inflight >= MAX_INFLIGHT:
            self._warn(logging.WARNING, "dns: %d forwarded queries in flight, dropping", self._inflight)
            return
        self._inflight += 1
        self._nursery.start_soon(self._forward_udp, fwd, sock, addr)

    async def _forward_udp(self, fwd: Forward, sock: socket.socket, addr: Any) -> None:
        try:
            reply = await self.forwarder.resolve(fwd, tcp=False)
            sock.sendto(reply, socket.MSG_DONTWAIT, addr)
        except OSError:
            pass
        except Exception:  # a bug must cost one query, not the server
            self._warn(logging.ERROR, "dns: error forwarding a UDP query", exc_info=True)
        finally:
            self._inflight -= 1

    # --- TCP ---------------------------------------------------------------------------------

    async def _tcp_connection(self, stream: trio.SocketStream) -> None:
        if self._tcp_connections >= MAX_TCP_CONNECTIONS:
            self._warn(logging.WARNING, "dns: %d TCP connections open, refusing", self._tcp_connections)
            await stream.aclose()
            return
        self._tcp_connections += 1
        try:
            try:
                async with stream, trio.open_nursery() as nursery:
                    await self._tcp_queries(stream, nursery)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client went away (trio reports it inside an exception group)
        except Exception:  # a bug must cost one connection, not the listener
            self._warn(logging.ERROR, "dns: error on a TCP connection", exc_info=True)
        finally:
            self._tcp_connections -= 1

    async def _tcp_queries(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
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
            reply = _memo_reply(self._state.tcp_memo, data)
            if reply is not None:
                stats.memo_hits += 1
            else:
                result = self._answer(data, True, stats)
                if result is None:
                    continue
                if isinstance(result, Forward):
                    await pipeline.acquire()
                    nursery.start_soon(self._forward_tcp, result, stream, send_lock, pipeline)
                    continue
                reply = result
            async with send_lock:
                await stream.send_all(_framed(reply))

    async def _forward_tcp(
        self, fwd: Forward, stream: trio.SocketStream, lock: trio.Lock, pipeline: trio.Semaphore
    ) -> None:
        try:
            reply = await self.forwarder.resolve(fwd, tcp=True)
            async with lock:
                await stream.send_all(_framed(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a bug must cost one query, not the connection's siblings
            self._warn(logging.ERROR, "dns: error forwarding a TCP query", exc_info=True)
        finally:
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

