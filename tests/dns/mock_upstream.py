"""A mock upstream nameserver for the DNS proxy tests, built on dnslib only.

Why a separate implementation: the proxy under test must be checked by something that does not
share its code, so this module uses dnslib (and the standard library) and nothing from
``pilotfish``. It copies the upstream that Istio's own tests use (``makeUpstream()`` in
Istio's ``dns_test.go``, docs/istio-compat.md "DNS forwarding"), because the recorded vectors in ``data/cases.json`` were produced
against that upstream:

* ``www.bing.com.`` and names below it: ``www.bing.com. 30 IN A 1.1.1.1``;
* ``giant.`` (and below): 64 A records, owner ``aaaaaaaaaaaa.aaaaaa.``, 240.0.0.0-240.0.0.63,
  TTL 30, never truncated, even over UDP (the whole 2263-byte message is sent);
* ``giant-tc.`` (and below): the same records truncated by the upstream to 512 bytes (TC=1,
  29 records, names compressed as miekg's ``Truncate`` does);
* every other name: NXDOMAIN without records.

As in Istio's mock (a miekg ``ServeMux``) the handler is chosen by the name alone, whatever the
qtype or qclass, and the answer owner is the handler's name in lower case. Replies keep the
query's ID, opcode and first question (letter case as received), copy RD and CD for opcode QUERY
(miekg ``SetReply``), have AA=0 and RA=0, carry no OPT record, and are packed without name
compression (miekg's default), except the deliberately truncated ``giant-tc.`` reply.

Behaviours (``proxy_config.upstream`` of a vector): ``normal`` (above), ``silent`` (reads queries,
never answers), ``refused`` (REFUSED for everything), ``bad_id`` (normal, but reply ID = query
ID + 1), ``edns`` (normal, plus an OPT record with UDP size 1232 whenever the query had one).

The server listens on one random port for both UDP and TCP (like the miekg pair in Istio's test)
and records every query it receives, so a test can assert what the proxy sent upstream.
"""

from __future__ import annotations

import contextlib
import ipaddress
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass

from dnslib import CLASS, EDNS0, QTYPE, RCODE, RR, A, DNSError, DNSHeader, DNSRecord
from dnslib.label import DNSBuffer

BEHAVIOURS = ("normal", "silent", "refused", "bad_id", "edns")

BING = "www.bing.com."
BING_ADDRESS = "1.1.1.1"
GIANT = "giant."
GIANT_TC = "giant-tc."
GIANT_OWNER = "aaaaaaaaaaaa.aaaaaa."
GIANT_ADDRESSES = tuple(f"240.0.0.{i}" for i in range(64))
TTL = 30
UPSTREAM_EDNS_SIZE = 1232  # the OPT size the 'edns' behaviour puts in its replies
TRUNCATE_TO = 512  # giant-tc.: miekg's Truncate(512)

OPCODE_QUERY = 0
OPCODE_NOTIFY = 4
TYPE_OPT = 41


@dataclass(frozen=True)
class ReceivedQuery:
    """One query as the mock received it (fields are None where the packet did not parse)."""

    transport: str  # "udp" or "tcp"
    qname: str | None  # presentation form with trailing dot, letter case as received
    qtype: str | None  # "A", "AAAA", ... or the number for types dnslib does not name
    id: int | None
    edns_udp_size: int | None  # UDP size of the query's OPT record, None without OPT
    edns_do: bool | None
    rd: bool | None
    opcode: int | None
    raw: bytes
    received_at: float  # time.monotonic()

    def as_vector(self, client_id: int) -> dict[str, object]:
        """The query in the vectors' ``upstream_queries`` form."""
        return {
            "transport": self.transport,
            "qname": self.qname,
            "qtype": self.qtype,
            "same_id_as_client": self.id == client_id,
            "edns_udp_size": self.edns_udp_size,
            "rd": self.rd,
        }


def type_name(code: int) -> str:
    """dnslib's name for a qtype, or ``TYPE<n>`` (RFC 3597) for the ones it does not know."""
    name = QTYPE.get(code)
    return name if isinstance(name, str) else f"TYPE{code}"


def class_name(code: int) -> str:
    """Class names as the vectors write them (dnslib says ``*`` for ANY and ``None`` for NONE)."""
    return {1: "IN", 3: "CH", 4: "HS", 254: "NONE", 255: "ANY"}.get(code, f"CLASS{code}")


class _PlainBuffer(DNSBuffer):
    """A DNSBuffer that never compresses names, to produce miekg's default (uncompressed) form."""

    def encode_name(self, name: object) -> None:  # type: ignore[override]
        self.encode_name_nocompress(name)


def pack_uncompressed(record: DNSRecord) -> bytes:
    """Pack like ``DNSRecord.pack`` but without name compression."""
    record.set_header_qa()
    buffer = _PlainBuffer()
    record.header.pack(buffer)
    for question in record.questions:
        question.pack(buffer)
    for rr in record.rr + record.auth + record.ar:
        rr.pack(buffer)
    return bytes(buffer.data)


def _reply_header(query: DNSHeader, rcode: int) -> DNSHeader:
    """miekg's ``SetReply``: ID and opcode kept, RD and CD copied only for opcode QUERY."""
    header = DNSHeader(id=query.id, bitmap=0, qr=1, opcode=query.opcode, rcode=rcode)
    if query.opcode == OPCODE_QUERY:
        header.rd = query.rd
        header.cd = query.cd
    return header


def _header_only(raw: bytes, rcode: int) -> bytes:
    """A header-only error reply built from the raw request header (for packets dnslib rejects)."""
    qid, flags = struct.unpack("!HH", raw[:4])
    opcode = (flags >> 11) & 0xF
    out = 0x8000 | (opcode << 11) | rcode
    if opcode == OPCODE_QUERY:
        out |= flags & 0x0110  # RD, CD
    return struct.pack("!HHHHHH", qid, out, 0, 0, 0, 0)


def _below(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def _find_opt(record: DNSRecord) -> RR | None:
    for rr in record.ar:
        if rr.rtype == TYPE_OPT:
            return rr
    return None


def answer(raw: bytes, behaviour: str = "normal") -> bytes | None:
    """The mock's reply to one query message (without TCP length prefix); None means no reply.

    Pure function so the mock's answers can be checked without sockets.
    """
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown upstream behaviour {behaviour!r}")
    if behaviour == "silent" or len(raw) < 12:
        return None
    flags = struct.unpack("!H", raw[2:4])[0]
    if flags & 0x8000:  # a response: miekg drops it
        return None
    opcode = (flags >> 11) & 0xF
    if opcode not in (OPCODE_QUERY, OPCODE_NOTIFY):
        return _header_only(raw, RCODE.NOTIMP)
    if struct.unpack("!H", raw[4:6])[0] != 1:
        return _header_only(raw, RCODE.FORMERR)
    try:
        query = DNSRecord.parse(raw)
    except (DNSError, ValueError, UnicodeError):
        return _header_only(raw, RCODE.FORMERR)
    if not query.questions:
        return _header_only(raw, RCODE.REFUSED)
    question = query.questions[0]
    try:
        name = str(question.qname).lower()
    except (ValueError, UnicodeError):
        return _header_only(raw, RCODE.FORMERR)

    reply = DNSRecord(_reply_header(query.header, RCODE.NOERROR), q=question)
    compress = False
    if behaviour == "refused":
        reply.header.rcode = RCODE.REFUSED
    elif _below(name, BING):
        reply.add_answer(RR(BING, QTYPE.A, CLASS.IN, TTL, A(BING_ADDRESS)))
    elif _below(name, GIANT):
        for address in GIANT_ADDRESSES:
            reply.add_answer(RR(GIANT_OWNER, QTYPE.A, CLASS.IN, TTL, A(address)))
    elif _below(name, GIANT_TC):
        compress = True
        reply.header.tc = 1
        records = [RR(GIANT_OWNER, QTYPE.A, CLASS.IN, TTL, A(address)) for address in GIANT_ADDRESSES]
        fit, over = 0, len(records) + 1  # the most records that fit TRUNCATE_TO: a bisection
        while over - fit > 1:
            mid = (fit + over) // 2
            reply.rr = records[:mid]
            fit, over = (mid, over) if len(reply.pack()) <= TRUNCATE_TO else (fit, mid)
        reply.rr = records[:fit]
    else:
        reply.header.rcode = RCODE.NXDOMAIN

    if behaviour == "bad_id":
        reply.header.id = (query.header.id + 1) & 0xFFFF
    query_opt = _find_opt(query)
    if behaviour == "edns" and query_opt is not None:
        reply.add_ar(EDNS0(udp_len=UPSTREAM_EDNS_SIZE, flags="do" if query_opt.edns_do else ""))
    try:
        return reply.pack() if compress else pack_uncompressed(reply)
    except (DNSError, ValueError, UnicodeError):  # e.g. a label dnslib parsed but cannot write
        return _header_only(raw, RCODE.FORMERR)


def describe_query(raw: bytes, transport: str) -> ReceivedQuery:
    """Decode what the mock received, as far as it parses."""
    qid = rd = opcode = None
    if len(raw) >= 4:
        qid, flags = struct.unpack("!HH", raw[:4])
        rd = bool(flags & 0x0100)
        opcode = (flags >> 11) & 0xF
    qname = qtype = udp_size = do = None
    try:
        record = DNSRecord.parse(raw)
    except (DNSError, ValueError, UnicodeError):
        record = None
    if record is not None:
        if record.questions:
            qname = str(record.questions[0].qname)
            qtype = type_name(record.questions[0].qtype)
        opt = _find_opt(record)
        if opt is not None:
            udp_size = opt.rclass
            do = bool(opt.edns_do)
    return ReceivedQuery(transport, qname, qtype, qid, udp_size, do, rd, opcode, raw, time.monotonic())


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _bind_udp_tcp(host: str) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound (not listening) to the same random free port."""
    family = _family(host)
    for _ in range(100):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, 0))
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp.bind((host, tcp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise OSError("no port free for both UDP and TCP")


class MockUpstream:
    """The mock nameserver: UDP and TCP on one port of ``host``, served by background threads.

    Use as a context manager. ``queries`` is every query received so far, in arrival order.
    """

    def __init__(self, behaviour: str = "normal", host: str = "127.0.0.1") -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown upstream behaviour {behaviour!r}")
        self.behaviour = behaviour
        self.host = host
        self._udp, self._tcp = _bind_udp_tcp(host)
        self._tcp.listen(128)
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port: int = self._tcp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queries: list[ReceivedQuery] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []  # unexpected exceptions in the server threads
        self._main = threading.Thread(target=self._serve, name=f"mock-upstream-{self.port}", daemon=True)
        self._started = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def queries(self) -> list[ReceivedQuery]:
        with self._lock:
            return list(self._queries)

    @property
    def query_count(self) -> int:
        with self._lock:
            return len(self._queries)

    def clear(self) -> None:
        with self._lock:
            self._queries.clear()

    def wait_for_queries(self, count: int, timeout: float) -> list[ReceivedQuery]:
        """Wait (bounded) until at least ``count`` queries arrived; returns what arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._queries) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._queries)

    def start(self) -> MockUpstream:
        if not self._started:
            self._started = True
            self._main.start()
        return self

    def stop(self) -> None:
        """Stop all threads and close every socket (returns promptly: threads are woken)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._started:
            self._main.join(5)
        for thread in list(self._threads):
            thread.join(5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, raw: bytes, transport: str) -> None:
        received = describe_query(raw, transport)
        with self._cond:
            self._queries.append(received)
            self._cond.notify_all()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    if key.data == "udp":
                        self._serve_udp_once()
                    else:
                        self._accept()
        except BaseException as exc:  # noqa: BLE001 - reported to the test through .errors
            if not self._stopping.is_set():
                self.errors.append(exc)
        finally:
            sel.close()

    def _serve_udp_once(self) -> None:
        try:
            raw, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        self._record(raw, "udp")
        reply = answer(raw, self.behaviour)
        if reply is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _accept(self) -> None:
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        with self._lock:
            self._conns.add(conn)
        thread = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            while not self._stopping.is_set():
                prefix = _recv_exact(conn, 2)
                if prefix is None:
                    return
                raw = _recv_exact(conn, struct.unpack("!H", prefix)[0])
                if raw is None:
                    return
                self._record(raw, "tcp")
                reply = answer(raw, self.behaviour)
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)

