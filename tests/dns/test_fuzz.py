"""Robustness of pilotfish's DNS proxy against hostile and broken clients.

15,000 random and mutated queries go through the proxy's core in-process
(tests/dns/engine_harness.py: the reply memo, the answer engine, the real forwarders with the
dnslib mock upstream; table: the vectors' ``istio_test`` fixture), one in 50 as a TCP
query. Every reply must echo the query's ID, have QR=1 and fit the client's UDP size; the
core must still answer normal queries correctly afterwards, and nothing may have logged an ERROR
or a traceback on the ``pilotfish`` loggers. Then a real proxy on loopback gets a burst of the
same kind of datagrams and many abusive TCP clients (what is about transport: the listener, TCP
framing, half-open, stalled, slow and pipelined connections), and must still answer over UDP and
TCP, with no exception ending a thread or escaping ``serve()``. Why: the proxy sits on every
pod's DNS path, where a malformed packet must cost at most that packet,
never the listener.

The packets are generated from a fixed seed (override with ``PILOTFISH_FUZZ_SEED``), so a
failure can be replayed. The mutations of valid queries are: bit flips, truncation, random
section counts, header flag/opcode changes, compression-pointer loops (self, mutual, forward,
into the header), label length bytes 64-255, names over 255 bytes (directly or through a
pointer), extra/malformed records and OPT records, trailing garbage and splices of two packets;
plus pure random bytes of 0-600 (sometimes up to 4096) bytes.

Over the socket, the UDP burst is paced by batches (send a batch, drain replies until the proxy
falls quiet for a few ms), so the packets are processed rather than dropped by the kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from dnslib import EDNS0, QTYPE, DNSError, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, EDNSOption

from engine_harness import Engine, Upstream
from mock_upstream import MockUpstream
from pilotfish.dns.config import DnsConfig
from proxy_harness import ProxyRunner, tcp_exchange, tcp_read_message, udp_exchange
from vectors import fixture_table, name_table

SEED = int(os.environ.get("PILOTFISH_FUZZ_SEED", "20260822"))
ENGINE_PACKETS = 15_000  # each reply checked (the socket flood of 100,000 checked a 300-query sample)
TCP_EVERY = 50  # one engine query in TCP_EVERY is asked as over TCP
SOCKET_PACKETS = 3_000  # the burst of datagrams to the real proxy
UDP_BUDGET = 10.0  # seconds for the paced burst; past it the rest goes out unpaced
BATCH = 128
QUIET = 0.003  # seconds without a reply that end a batch's drain
TCP_RANDOM_CONNECTIONS = 400
HELD_HALF_OPEN = 100
HELD_STALLED = 50
HELD_SHORT_PREFIX = 50

ISTIO_TABLE = fixture_table("istio_test")

NAMES = (
    "productpage.", "productpage.ns1.", "productpage.ns1.svc.cluster.local.", "www.google.com.",
    "www.google.com.ns1.svc.cluster.local.", "www.google.com.svc.cluster.local.", "foo.wildcard.",
    "x.y.b.wildcard.", "*.wildcard.", "details.ns2.svc.cluster.remote.", "dual.localhost.",
    "ipv6.localhost.", "example.localhost.", "svc-with-alt.ns1.svc.clusterset.local.",
    "www.bing.com.", "giant.", "giant-tc.", "nx.example.", "a.svc.mesh.company.net.", ".",
)
QTYPES = (1, 1, 1, 28, 28, 5, 33, 16, 255, 0, 65, 12, 6, 2, 15, 252, 251, 41, 65535)


# --- packet generation --------------------------------------------------------------------------


def _mixed_case(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if rng.random() < 0.3 else c for c in name)


def valid_query(rng: random.Random) -> bytes:
    """A well-formed query with random id, flags, name case, qtype, class and EDNS."""
    name = _mixed_case(rng, rng.choice(NAMES))
    if rng.random() < 0.2:
        name = f"r{rng.randrange(10**6)}." + name.lstrip(".")
    header = DNSHeader(id=rng.randrange(65536), bitmap=0)
    header.rd = rng.random() < 0.8
    header.cd = rng.random() < 0.1
    qclass = 1 if rng.random() < 0.9 else rng.choice((3, 254, 255, 0, 65535))
    record = DNSRecord(header, q=DNSQuestion(DNSLabel(name.encode()), rng.choice(QTYPES), qclass))
    if rng.random() < 0.4:
        opts = []
        roll = rng.random()
        if roll < 0.2:
            opts.append(EDNSOption(12, bytes(rng.randrange(400))))  # padding
        elif roll < 0.4:
            opts.append(EDNSOption(10, rng.randbytes(rng.choice((8, 16, 40)))))  # cookie
        elif roll < 0.5:
            opts.append(EDNSOption(rng.randrange(65536), rng.randbytes(rng.randrange(20))))
        record.add_ar(EDNS0(
            udp_len=rng.choice((0, 100, 512, 1232, 1400, 4096, 65535)),
            flags="do" if rng.random() < 0.3 else "",
            version=0 if rng.random() < 0.9 else rng.randrange(1, 256),
            opts=opts,
        ))
    return record.pack()


def _qname_end(p: bytes | bytearray) -> int:
    """Offset just after the question name (best effort; 12 if the name does not parse)."""
    i = 12
    while i < len(p):
        n = p[i]
        if n == 0:
            return i + 1
        if n >= 0xC0:
            return i + 2
        i += 1 + n
    return 12


def m_bitflip(rng: random.Random, p: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        bit = rng.randrange(len(p) * 8)
        p[bit // 8] ^= 1 << (bit % 8)
    return p


def m_truncate(rng: random.Random, p: bytearray) -> bytearray:
    return p[: rng.randrange(len(p))]


def m_counts(rng: random.Random, p: bytearray) -> bytearray:
    for off in rng.sample((4, 6, 8, 10), rng.randint(1, 4)):
        p[off:off + 2] = struct.pack("!H", rng.choice((0, 1, 2, 3, 0xFFFF, rng.randrange(65536))))
    return p


def m_flags(rng: random.Random, p: bytearray) -> bytearray:
    p[2] = rng.randrange(256)
    p[3] = rng.randrange(256)
    return p


def m_pointer_loop(rng: random.Random, p: bytearray) -> bytearray:
    tail = p[_qname_end(p):] or b"\x00\x01\x00\x01"
    name = rng.choice((
        b"\xc0\x0c",  # points at itself
        b"\x01a\xc0\x0c",  # label then back to the start: a.a.a.a...
        b"\xc0\x0e\xc0\x0c",  # two pointers pointing at each other
        b"\x03abc\xc0\x0e",  # pointer into its own label bytes
        b"\xc0" + bytes([rng.randrange(256)]),  # anywhere, usually forward/past the end
        b"\xc0\x00",  # into the header
        b"\xff\xff",  # pointer to offset 0x3fff
        b"\x01a" * 20 + b"\xc0\x0c",
    ))
    return bytearray(p[:12] + name + tail)


def m_long_label(rng: random.Random, p: bytearray) -> bytearray:
    length = rng.randint(64, 255)
    body = bytes(rng.choices(b"abcdefgh", k=rng.choice((length, length // 2, 3))))
    return bytearray(p[:12] + bytes([length]) + body + p[12:])


def m_huge_name(rng: random.Random, p: bytearray) -> bytearray:
    tail = p[_qname_end(p):] or b"\x00\x01\x00\x01"
    kind = rng.randrange(5)
    if kind == 0:
        name = b"\x01a" * rng.randint(127, 400) + b"\x00"  # > 255 bytes of 1-letter labels
    elif kind == 1:
        name = (b"\x3f" + b"b" * 63) * rng.randint(4, 40) + b"\x00"
    elif kind == 2:  # 255 / 256 boundary
        name = (b"\x3f" + b"c" * 63) * 3 + bytes([rng.choice((61, 62, 63))]) + b"d" * 63 + b"\x00"
    elif kind == 3:  # long only after decompression: a 200-byte name, then 200 more + pointer to it
        first = (b"\x31" + b"e" * 49) * 4 + b"\x00"
        name = (b"\x31" + b"f" * 49) * 4 + b"\xc0" + bytes([12 + len(first) + 4])
        return bytearray(p[:12] + first + b"\x00\x01\x00\x01" + name + tail)
    else:
        name = rng.randbytes(rng.randint(256, 2000))
    return bytearray(p[:12] + name + tail)


def m_bad_record(rng: random.Random, p: bytearray) -> bytearray:
    """An extra record in a random section, often with a lying rdlength or a bad OPT."""
    rtype = rng.choice((1, 28, 5, 41, 41, 6, rng.randrange(65536)))
    owner = b"\x00" if rtype == 41 and rng.random() < 0.7 else b"\x01x\x00"
    rdata = rng.randbytes(rng.randrange(40))
    if rtype == 41 and rng.random() < 0.5:  # option whose length exceeds the rdata
        rdata = struct.pack("!HH", rng.randrange(65536), rng.randint(50, 65535)) + rdata[:10]
    rdlength = len(rdata) if rng.random() < 0.6 else rng.randrange(65536)
    rr = owner + struct.pack("!HHIH", rtype, rng.randrange(65536), rng.randrange(2**32), rdlength) + rdata
    section = rng.choice((6, 8, 10))
    count = struct.unpack("!H", p[section:section + 2])[0]
    p[section:section + 2] = struct.pack("!H", (count + rng.choice((1, 1, 2))) & 0xFFFF)
    return p + rr


def m_two_opts(rng: random.Random, p: bytearray) -> bytearray:
    opt = b"\x00" + struct.pack("!HHIH", 41, 4096, 0, 0)
    p[10:12] = struct.pack("!H", (struct.unpack("!H", p[10:12])[0] + 2) & 0xFFFF)
    return p + opt + opt


def m_garbage(rng: random.Random, p: bytearray) -> bytearray:
    return p + rng.randbytes(rng.randint(1, 64))


Mutator = Callable[[random.Random, bytearray], bytearray]
MUTATORS: tuple[Mutator, ...] = (
    m_bitflip, m_bitflip, m_truncate, m_counts, m_flags, m_pointer_loop, m_long_label,
    m_huge_name, m_bad_record, m_two_opts, m_garbage,
)


def mutated_query(rng: random.Random) -> bytes:
    p = bytearray(valid_query(rng))
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if len(p) < 13:
            break
        p = rng.choice(MUTATORS)(rng, p)
    if rng.random() < 0.05:  # splice with another packet
        other = valid_query(rng)
        p = p[: rng.randrange(len(p) + 1)] + other[rng.randrange(len(other)):]
    return bytes(p)


def random_packet(rng: random.Random) -> bytes:
    size = rng.randrange(600) if rng.random() < 0.95 else rng.randrange(4097)
    return rng.randbytes(size)


def fuzz_packet(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.70:
        return mutated_query(rng)
    if roll < 0.90:
        return random_packet(rng)
    if roll < 0.93:
        return rng.randbytes(rng.randrange(12))  # shorter than a header
    return valid_query(rng)


# --- checks -------------------------------------------------------------------------------------


def _a_query(name: str, qid: int, qtype: str = "A") -> bytes:
    query = DNSRecord.question(name, qtype)
    query.header.id = qid
    return query.pack()


def _answers(reply: bytes | None) -> list[tuple[str, str, str]]:
    assert reply is not None, "no reply"
    msg = DNSRecord.parse(reply)
    return [(str(rr.rname), QTYPE.get(rr.rtype), str(rr.rdata)) for rr in msg.rr]


Ask = Callable[[str, bytes], "bytes | None"]  # (transport, query) -> reply


def assert_serves_normally(ask: Ask, tag: str) -> None:
    """A local name and a never-seen forwarded name, over UDP and TCP, answered correctly."""
    for transport in ("udp", "tcp"):
        local = ask(transport, _a_query("www.google.com.", 0x1111))
        assert _answers(local) == [("www.google.com.", "A", "1.1.1.1")], f"{tag}: local answer over {transport}"
        assert DNSRecord.parse(local).header.id == 0x1111
        fresh = f"{tag}-{transport}.www.bing.com."
        forwarded = ask(transport, _a_query(fresh, 0x2222))
        assert _answers(forwarded) == [("www.bing.com.", "A", "1.1.1.1")], f"{tag}: forwarded answer over {transport}"
        assert DNSRecord.parse(forwarded).header.id == 0x2222


def udp_limit_of(request: bytes) -> int | None:
    """The UDP size limit the request asks for, None if dnslib cannot tell."""
    try:
        msg = DNSRecord.parse(request)
    except (DNSError, ValueError, UnicodeError, IndexError, struct.error):
        return None
    opts = [rr for rr in msg.ar if rr.rtype == 41]
    if len(opts) > 1:
        return None
    return max(512, opts[0].rclass) if opts else 512


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def thread_exceptions() -> Iterator[list[threading.ExceptHookArgs]]:
    """Exceptions that end any thread (the proxy's UDP threads included) during the test."""
    caught: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = caught.append
    try:
        yield caught
    finally:
        threading.excepthook = previous


CONFIG = DnsConfig(
    listen=(("127.0.0.1", 0),),
    search=("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local"),
    proxy_namespace="ns1",
    proxy_domain="ns1.svc.cluster.local",
    forward_parallel=False,
    forward_timeout=0.5,
)


@pytest.fixture
def fuzz_target(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[ProxyRunner, MockUpstream]]:
    caplog.set_level(logging.WARNING, logger="pilotfish")
    with MockUpstream("normal") as mock:
        config = dataclasses.replace(CONFIG, upstreams=(mock.address,))
        with ProxyRunner(config, [name_table(ISTIO_TABLE)]) as runner:
            yield runner, mock


def _bad_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("pilotfish") and (r.levelno >= logging.ERROR or r.exc_info)
    ]


def reply_problems(request: bytes, reply: bytes, transport: str) -> list[str]:
    """What is wrong with `reply` to `request`: ID not echoed, QR=0, over the UDP size limit."""
    problems = []
    if len(reply) < 12 or reply[:2] != request[:2] or not reply[2] & 0x80:
        problems.append(f"reply {reply[:12].hex()} to {request.hex()}: ID not echoed or QR=0")
    if transport == "udp" and len(reply) > 512:  # 512 fits every client
        limit = udp_limit_of(request)
        if limit is not None and len(reply) > limit:
            problems.append(f"{len(reply)}-byte UDP reply over the limit {limit} for {request.hex()}")
    return problems


# --- the core, in-process -----------------------------------------------------------------------


def test_fuzz_engine_survives(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pilotfish")
    rng = random.Random(SEED)
    upstream = Upstream("normal")
    core = Engine(dataclasses.replace(CONFIG, upstreams=(("127.0.0.1", 53),)), name_table(ISTIO_TABLE), upstream)

    def ask(transport: str, wire: bytes) -> bytes | None:
        return core.ask(wire, transport).reply

    assert_serves_normally(ask, "before")
    answered = 0
    problems: list[str] = []
    for n in range(ENGINE_PACKETS):
        packet = fuzz_packet(rng)
        transport = "tcp" if n % TCP_EVERY == 0 else "udp"
        reply = ask(transport, packet)
        if reply is not None:
            answered += 1
            problems += reply_problems(packet, reply, transport)
    print(f"\nfuzz seed {SEED}: {ENGINE_PACKETS} queries, {answered} answered, {len(upstream.queries)} upstream")
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems[:20])
    assert_serves_normally(ask, "after")
    assert not core.socket_errors, core.socket_errors
    bad_logs = _bad_logs(caplog)
    assert not bad_logs, f"seed {SEED}: the core logged errors:\n" + "\n".join(bad_logs[:20])


# --- the proxy on loopback sockets --------------------------------------------------------------


def udp_flood(runner: ProxyRunner, rng: random.Random) -> dict[str, int]:
    """Send SOCKET_PACKETS fuzz packets, paced by batches; count and sanity-check the replies."""
    stats = {"sent": 0, "replies": 0, "bad_replies": 0, "unpaced": 0}
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.connect(runner.udp_address)
        s.setblocking(False)
    deadline = time.monotonic() + UDP_BUDGET

    def drain(wait: float) -> None:
        while True:
            ready, _, _ = select.select(socks, [], [], wait)
            if not ready:
                return
            for s in ready:
                while True:
                    try:
                        reply = s.recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    stats["replies"] += 1
                    if len(reply) < 12 or not reply[2] & 0x80:
                        stats["bad_replies"] += 1

    try:
        while stats["sent"] < SOCKET_PACKETS:
            paced = time.monotonic() < deadline
            for _ in range(min(BATCH, SOCKET_PACKETS - stats["sent"])):
                packet = fuzz_packet(rng)
                s = socks[stats["sent"] % len(socks)]
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                    s.send(packet)
                stats["sent"] += 1
                if not paced:
                    stats["unpaced"] += 1
            drain(QUIET if paced else 0)
        drain(0.1)
    finally:
        for s in socks:
            s.close()
    return stats


def _framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def _read_all_frames(sock: socket.socket, quiet: float) -> tuple[list[bytes], bytes]:
    """Everything the proxy sends until it closes or falls quiet: (frames, leftover bytes)."""
    data = bytearray()
    sock.settimeout(quiet)
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65535):
            data += chunk
    frames = []
    while len(data) >= 2:
        size = struct.unpack("!H", data[:2])[0]
        if len(data) < 2 + size:
            break
        frames.append(bytes(data[2:2 + size]))
        del data[: 2 + size]
    return frames, bytes(data)


def tcp_random_client(addr: tuple[str, int], seed: int) -> list[str]:
    """One abusive TCP client; returns problems seen in what the proxy sent back."""
    rng = random.Random(seed)
    problems = []
    kind = rng.randrange(6)
    with socket.create_connection(addr, timeout=2) as sock:
        if kind == 0:  # a few framed fuzz messages in one write
            sock.sendall(b"".join(_framed(fuzz_packet(rng)) for _ in range(rng.randint(1, 4))))
        elif kind == 1:  # random bytes, no framing at all
            sock.sendall(rng.randbytes(rng.randrange(1, 3000)))
        elif kind == 2:  # truncated length prefix, then close
            sock.sendall(bytes([rng.randrange(256)]))
        elif kind == 3:  # prefix larger than the body, then close
            body = valid_query(rng)
            sock.sendall(struct.pack("!H", len(body) + rng.randint(1, 500)) + body)
        elif kind == 4:  # zero-length message, then a valid one
            sock.sendall(b"\x00\x00" + _framed(valid_query(rng)))
        else:  # reset in the middle of a message
            body = valid_query(rng)
            sock.sendall(struct.pack("!H", len(body)) + body[: len(body) // 2])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return problems
        sock.shutdown(socket.SHUT_WR)  # the proxy sees EOF and closes once it has answered
        frames, leftover = _read_all_frames(sock, 1.0)
        for frame in frames:
            if len(frame) < 12 or not frame[2] & 0x80:
                problems.append(f"TCP reply that is not a DNS response: {frame[:16].hex()}")
        if leftover:
            problems.append(f"TCP reply stream ends in a partial frame: {leftover[:16].hex()}")
    return problems


def slow_client(addr: tuple[str, int], qid: int) -> bytes | None:
    """A valid query sent one byte at a time (5 ms apart)."""
    message = _framed(_a_query("productpage.", qid))
    deadline = time.monotonic() + 5
    with socket.create_connection(addr, timeout=2) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in message:
            sock.sendall(bytes([byte]))
            time.sleep(0.005)
        return tcp_read_message(sock, deadline)


def pipelined_client(addr: tuple[str, int], base: int) -> list[int]:
    """Five local queries in one write; returns the IDs of the replies."""
    ids = list(range(base, base + 5))
    deadline = time.monotonic() + 5
    with socket.create_connection(addr, timeout=2) as sock:
        sock.sendall(b"".join(_framed(_a_query("productpage.ns1.", i)) for i in ids))
        got = []
        for _ in ids:
            reply = tcp_read_message(sock, deadline)
            if reply is None:
                break
            got.append(struct.unpack("!H", reply[:2])[0])
    return got


@contextlib.contextmanager
def held_connections(addr: tuple[str, int], rng: random.Random) -> Iterator[list[socket.socket]]:
    """Idle and stalled TCP connections, held open for the body of the with-block."""
    held: list[socket.socket] = []
    try:
        for _ in range(HELD_HALF_OPEN):  # connect and send nothing
            held.append(socket.create_connection(addr, timeout=2))
        for _ in range(HELD_STALLED):  # a length prefix larger than the body, then stall
            sock = socket.create_connection(addr, timeout=2)
            sock.sendall(struct.pack("!H", 300) + rng.randbytes(20))
            held.append(sock)
        for _ in range(HELD_SHORT_PREFIX):  # half a length prefix, then stall
            sock = socket.create_connection(addr, timeout=2)
            sock.sendall(b"\x00")
            held.append(sock)
        yield held
    finally:
        for sock in held:
            sock.close()


def test_fuzz_proxy_survives(
    fuzz_target: tuple[ProxyRunner, MockUpstream],
    caplog: pytest.LogCaptureFixture,
    thread_exceptions: list[threading.ExceptHookArgs],
) -> None:
    runner, mock = fuzz_target
    rng = random.Random(SEED)

    def ask(transport: str, wire: bytes) -> bytes | None:
        return (udp_exchange if transport == "udp" else tcp_exchange)(runner.address(transport), wire, 3.0)

    assert_serves_normally(ask, "before")
    flood = udp_flood(runner, rng)
    print(f"\nfuzz seed {SEED}: {flood['sent']} UDP packets ({flood['unpaced']} unpaced), {flood['replies']} replies")
    assert flood["sent"] >= SOCKET_PACKETS
    assert flood["bad_replies"] == 0, f"seed {SEED}: {flood['bad_replies']} UDP replies that are not DNS responses"
    assert runner.alive, "the proxy died during the UDP flood"
    assert_serves_normally(ask, "after-udp")

    tcp_addr = runner.tcp_address
    with held_connections(tcp_addr, rng):
        assert_serves_normally(ask, "while-held")  # idle clients must not block others
        with ThreadPoolExecutor(32) as pool:
            slow = [pool.submit(slow_client, tcp_addr, 0x3000 + i) for i in range(8)]
            piped = [pool.submit(pipelined_client, tcp_addr, 0x4000 + 5 * i) for i in range(20)]
            abusive = list(pool.map(lambda i: tcp_random_client(tcp_addr, SEED * 1000 + i), range(TCP_RANDOM_CONNECTIONS)))
            slow_replies = [f.result() for f in slow]
            piped_ids = [f.result() for f in piped]
    tcp_problems = [p for problems in abusive for p in problems]
    assert not tcp_problems, f"seed {SEED}:\n" + "\n".join(tcp_problems[:20])
    for i, reply in enumerate(slow_replies):
        assert _answers(reply) == [("productpage.", "A", "9.9.9.9")], "slow client not answered"
        assert DNSRecord.parse(reply).header.id == 0x3000 + i
    for i, ids in enumerate(piped_ids):
        assert sorted(ids) == list(range(0x4000 + 5 * i, 0x4005 + 5 * i)), "pipelined queries not all answered"

    assert_serves_normally(ask, "after-tcp")
    assert runner.alive, "the proxy died during the TCP abuse"
    assert not mock.errors, f"mock upstream errors (harness problem): {mock.errors}"
    assert not thread_exceptions, f"exceptions ended threads: {[(t.thread, t.exc_value) for t in thread_exceptions]}"
    bad_logs = _bad_logs(caplog)
    assert not bad_logs, f"seed {SEED}: the proxy logged errors:\n" + "\n".join(bad_logs[:20])
