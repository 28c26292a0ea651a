"""DNS wire format: the little the proxy needs, without allocation-heavy objects.

Pure functions over bytes. Names are kept as uncompressed wire bytes (length-prefixed labels,
original letter case) so a reply can echo exactly what the client sent; compression is applied
when a message is packed. dnslib stays out of the serving path (it costs ~100 µs a message:
docs/istio-compat.md "Measured figures"); the tests use it as an independent decoder of what this
module produces.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Header flag bits (second 16-bit word).
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
Z = 0x0040
AD = 0x0020
CD = 0x0010
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F

OPCODE_QUERY = 0
OPCODE_IQUERY = 1
OPCODE_STATUS = 2
OPCODE_NOTIFY = 4
OPCODE_UPDATE = 5

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended rcode, lives partly in the OPT record

TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1

EDNS_UDP_SIZE = 1232  # what pilotfish advertises and asks upstream for (DNS flag day 2020)
EDE_STALE_ANSWER = 3  # RFC 8914 extended error: served from stale cache data
OPT_CODE_EDE = 15

MAX_NAME = 255
MAX_POINTER_HOPS = 64

# Names inside these RR types may be compressed on the wire (RFC 1035 types; RFC 3597 §4 says
# receivers must decompress them). Layout: "N" is a domain name, an int is that many fixed bytes.
COMPRESSIBLE_RDATA: dict[int, tuple[str | int, ...]] = {
    2: ("N",), 3: ("N",), 4: ("N",), 5: ("N",), 7: ("N",), 8: ("N",), 9: ("N",), 12: ("N",),
    6: ("N", "N", 20),  # SOA
    14: ("N", "N"),  # MINFO
    15: (2, "N"),  # MX
}
# Types some servers compress although they should not (RFC 3597 §4): decompressed when read,
# written uncompressed.
DECOMPRESS_ONLY_RDATA: dict[int, tuple[str | int, ...]] = {
    17: ("N", "N"),  # RP
    18: (2, "N"),  # AFSDB
    21: (2, "N"),  # RT
    26: (2, "N", "N"),  # PX
    33: (6, "N"),  # SRV
    36: (2, "N"),  # KX
}

_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")


class WireError(ValueError):
    """The bytes are not a well-formed DNS message."""


@dataclass(slots=True)
class RR:
    """A resource record with its rdata decompressed (safe to copy into another message)."""

    name: bytes
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes


@dataclass(slots=True)
class Opt:
    """The EDNS(0) OPT pseudo-record of a message (RFC 6891)."""

    udp_size: int
    ext_rcode: int = 0
    version: int = 0
    do: bool = False
    options: bytes = b""
    class_offset: int = -1  # where the UDP size sits in the message it was read from


@dataclass(slots=True)
class Message:
    """A parsed message. `question` is the first question's raw wire bytes (name+type+class)."""

    id: int
    flags: int
    qname: bytes = b""  # wire form, case as received
    qtype: int = 0
    qclass: int = 0
    question: bytes = b""
    qdcount: int = 0
    answer: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)  # without the OPT record
    opt: Opt | None = None
    end: int = 12  # offset just past the last parsed record
    short_question: bool = False  # the first question ended before its type or class

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK


def read_name(buf: bytes, off: int) -> tuple[bytes, int]:
    """Read a possibly compressed name at `off`; return (uncompressed wire name, next offset).

    Pointers must point strictly backwards, which rules out loops without a hop budget; the hop
    budget is kept anyway as a guard against pathological chains.
    """
    labels: list[bytes] = []
    total = 1
    end = -1
    hops = 0
    n = len(buf)
    while True:
        if off >= n:
            raise WireError("name runs past the end of the message")
        length = buf[off]
        if length == 0:
            off += 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if off + 1 >= n:
                raise WireError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | buf[off + 1]
            if end < 0:
                end = off + 2
            if target >= off or hops >= MAX_POINTER_HOPS:
                raise WireError("bad compression pointer")
            hops += 1
            off = target
            continue
        if kind:
            raise WireError("reserved label type")
        label_end = off + 1 + length
        if label_end > n:
            raise WireError("label runs past the end of the message")
        total += length + 1
        if total > MAX_NAME:
            raise WireError("name longer than 255 bytes")
        labels.append(buf[off:label_end])
        off = label_end
    return b"".join(labels) + b"\x00", (end if end >= 0 else off)


def name_labels(wire: bytes) -> list[bytes]:
    """The labels of an uncompressed wire name, without length bytes."""
    out = []
    off = 0
    while wire[off]:
        length = wire[off]
        out.append(wire[off + 1 : off + 1 + length])
        off += 1 + length
    return out


def text_labels(wire: bytes) -> list[str]:
    """Labels of a wire name in presentation form, as miekg/dns prints them.

    Bytes that would make two different names print alike ('.' inside a label, backslash,
    non-printables) are escaped, so a crafted label can never match another table name.
    """
    parts = []
    for label in name_labels(wire):
        text = label.decode("latin-1")
        if not _is_plain(text):
            text = "".join(_escape_char(c) for c in text)
        parts.append(text)
    return parts


def name_to_text(wire: bytes) -> str:
    """Presentation form with a trailing dot."""
    parts = text_labels(wire)
    return ".".join(parts) + "." if parts else "."


def _is_plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and not any(c in text for c in '.\\ "()@;$')


def _escape_char(c: str) -> str:
    o = ord(c)
    if c in '.\\ "()@;$':
        return "\\" + c
    if 0x21 <= o <= 0x7E:
        return c
    return "\\%03d" % o


def text_to_name(text: str) -> bytes:
    """Wire form of a plain dotted name (no escapes: table names and config values only)."""
    text = text.rstrip(".")
    if not text:
        return b"\x00"
    out = bytearray()
    for label in text.split("."):
        raw = label.encode("ascii", "strict")
        if not 0 < len(raw) < 64:
            raise WireError(f"bad label {label!r} in {text!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise WireError(f"name {text!r} longer than 255 bytes")
    return bytes(out)


def _decompress_rdata(buf: bytes, off: int, rdlen: int, layout: tuple[str | int, ...]) -> bytes:
    end = off + rdlen
    parts = []
    for part in layout:
        if isinstance(part, int):
            parts.append(buf[off : off + part])
            off += part
        else:
            name, off = read_name(buf, off)
            parts.append(name)
        if off > end:
            raise WireError("rdata shorter than its fields")
    if off != end:
        raise WireError("rdata length does not match its fields")
    return b"".join(parts)


def _read_rr(buf: bytes, off: int) -> tuple[RR, int, int]:
    """Read one record; return it, the offset of its class field and the next offset."""
    name, off = read_name(buf, off)
    if off + 10 > len(buf):
        raise WireError("truncated record header")
    rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(buf, off)
    class_off = off + 2
    off += 10
    if off + rdlen > len(buf):
        raise WireError("rdata runs past the end of the message")
    layout = COMPRESSIBLE_RDATA.get(rtype) or DECOMPRESS_ONLY_RDATA.get(rtype)
    rdata = _decompress_rdata(buf, off, rdlen, layout) if layout else buf[off : off + rdlen]
    return RR(name, rtype, rclass, ttl, rdata), class_off, off + rdlen


def _skip_name(buf: bytes, off: int) -> int:
    """The offset just past a (possibly compressed) name, without reading it."""
    while True:
        length = buf[off]
        if length >= 0xC0:
            return off + 2
        if length == 0:
            return off + 1
        off += 1 + length


def ttl_offsets(buf: bytes) -> list[int]:
    """Where the TTL of every record but OPT sits in a message that parse_message accepted: what
    a kept reply patches as it ages (dns/memo.py)."""
    qd, an, ns, ar = _HEADER.unpack_from(buf, 0)[2:]
    off = 12
    for _ in range(qd):
        off = _skip_name(buf, off) + 4
    out = []
    for _ in range(an + ns + ar):
        off = _skip_name(buf, off)
        rtype, _, _, rdlen = _RR_FIXED.unpack_from(buf, off)
        if rtype != TYPE_OPT:
            out.append(off + 4)
        off += 10 + rdlen
    return out


def has_edns_options(buf: bytes) -> bool:
    """Whether a message that parse_message accepted carries an OPT record with options."""
    qd, an, ns, ar = _HEADER.unpack_from(buf, 0)[2:]
    off = 12
    for _ in range(qd):
        off = _skip_name(buf, off) + 4
    for i in range(an + ns + ar):
        off = _skip_name(buf, off)
        rtype, _, _, rdlen = _RR_FIXED.unpack_from(buf, off)
        if rtype == TYPE_OPT and i >= an + ns:
            return bool(rdlen)
        off += 10 + rdlen
    return False


def read_header(buf: bytes) -> tuple[int, int, int, int, int, int]:
    """(id, flags, qdcount, ancount, nscount, arcount) of a message of at least 12 bytes."""
    return _HEADER.unpack_from(buf, 0)


class PartialMessage(WireError):
    """Parsing failed after part of the message was read; `partial` holds what was read."""

    def __init__(self, reason: str, partial: Message) -> None:
        super().__init__(reason)
        self.partial = partial


def parse_message(buf: bytes) -> Message:
    """Parse a whole message (query or reply) the way miekg/dns reads it.

    A bare 12-byte header parses as a message with no sections whatever its counts say. A first
    question cut short after its name reads as qtype/qclass 0 (`short_question`). Trailing bytes
    after the last record are ignored. Any other fault raises PartialMessage (a WireError)
    carrying whatever parsed before it, so a FORMERR reply can echo the question.
    """
    if len(buf) < 12:
        raise WireError("shorter than a DNS header")
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(buf, 0)
    msg = Message(qid, flags, qdcount=qd)
    n = len(buf)
    if n == 12:
        return msg
    off = 12
    try:
        for i in range(qd):
            name, off = read_name(buf, off)
            if off + 4 > n:
                if i or off + 4 - n not in (2, 4):
                    raise WireError("truncated question")
                tail = buf[off:] + bytes(off + 4 - n)
                off = n
                msg.short_question = True
            else:
                tail = buf[off : off + 4]
                off += 4
            if i == 0:
                msg.qname = name
                msg.qtype, msg.qclass = struct.unpack("!HH", tail)
                msg.question = name + tail
        for count, section in ((an, msg.answer), (ns, msg.authority), (ar, msg.additional)):
            for _ in range(count):
                rr, class_off, off = _read_rr(buf, off)
                if rr.rtype == TYPE_OPT and section is msg.additional:
                    if msg.opt is not None:
                        raise WireError("more than one OPT record")
                    msg.opt = Opt(
                        udp_size=rr.rclass,
                        ext_rcode=rr.ttl >> 24,
                        version=(rr.ttl >> 16) & 0xFF,
                        do=bool(rr.ttl & 0x8000),
                        options=rr.rdata,
                        class_offset=class_off,
                    )
                else:
                    section.append(rr)
    except WireError as err:
        raise PartialMessage(str(err), msg) from None
    msg.end = off
    return msg


def opt_record(
    udp_size: int, do: bool = False, ext_rcode: int = 0, options: bytes = b"", version: int = 0
) -> bytes:
    """Wire bytes of an OPT record (root owner)."""
    ttl = (ext_rcode << 24) | (version << 16) | (0x8000 if do else 0)
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, udp_size, ttl, len(options)) + options


def ede_option(code: int, text: str = "") -> bytes:
    """An Extended DNS Error option (RFC 8914) for the OPT record's rdata."""
    body = _U16.pack(code) + text.encode()
    return _U16.pack(OPT_CODE_EDE) + _U16.pack(len(body)) + body


class Packer:
    """Builds a message with name compression, stopping cleanly when a size budget is reached.

    Records are added in section order; the first record that does not fit is dropped together
    with every record after it (RFC 2181 §9 and miekg/dns `Truncate`), and `truncated` is set.
    Compression targets are matched on exact bytes, so a lower-cased owner never borrows the
    client's letter case from the question.
    """

    __slots__ = ("buf", "limit", "names", "counts", "truncated", "_section")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray(12)
        self.limit = limit
        self.names: dict[bytes, int] = {}
        self.counts = [0, 0, 0, 0]
        self.truncated = False
        self._section = 0

    def question(self, question: bytes) -> None:
        """Copy a raw question (uncompressed name + type + class) and remember its name."""
        base = len(self.buf)
        end = len(question) - 4
        off = 0
        while question[off]:
            self.names.setdefault(question[off : end], base + off)
            off += 1 + question[off]
        self.buf += question
        self.counts[0] += 1

    def _write_name(self, wire: bytes, compress: bool) -> None:
        buf = self.buf
        off = 0
        names = self.names
        while wire[off]:
            suffix = wire[off:]
            ptr = names.get(suffix) if compress else None
            if ptr is not None:
                buf += _U16.pack(0xC000 | ptr)
                return
            if len(buf) < 0x4000:
                names[suffix] = len(buf)
            length = wire[off]
            buf += wire[off : off + 1 + length]
            off += 1 + length
        buf.append(0)

    def add(self, section: int, rr: RR) -> bool:
        """Add a record to section 1 (answer), 2 (authority) or 3 (additional).

        Returns False, and adds nothing more from then on, once the budget is exceeded.
        """
        if self.truncated:
            return False
        buf = self.buf
        mark = len(buf)
        names_before = len(self.names)
        self._write_name(rr.name, True)
        rdata_at = len(buf) + 10
        buf += _RR_FIXED.pack(rr.rtype, rr.rclass, rr.ttl, 0)
        layout = COMPRESSIBLE_RDATA.get(rr.rtype)
        if layout:
            off = 0
            for part in layout:
                if isinstance(part, int):
                    buf += rr.rdata[off : off + part]
                    off += part
                else:
                    end = off
                    while rr.rdata[end]:
                        end += 1 + rr.rdata[end]
                    self._write_name(rr.rdata[off : end + 1], True)
                    off = end + 1
        else:
            buf += rr.rdata
        if len(buf) > self.limit:
            del buf[mark:]
            if len(self.names) != names_before:
                self.names = {k: v for k, v in self.names.items() if v < mark}
            self.truncated = True
            return False
        _U16.pack_into(buf, rdata_at - 2, len(buf) - rdata_at)
        self.counts[section] += 1
        return True

    def finish(self, qid: int, flags: int, opt: bytes | None = None) -> bytes:
        """Header, counts and the optional OPT record (always kept: its size was reserved)."""
        if self.truncated:
            flags |= TC
        arcount = self.counts[3]
        if opt is not None:
            self.buf += opt
            arcount += 1
        _HEADER.pack_into(
            self.buf, 0, qid, flags, self.counts[0], self.counts[1], self.counts[2], arcount
        )
        return bytes(self.buf)


def pack_message(
    qid: int,
    flags: int,
    question: bytes | None,
    sections: tuple[list[RR], list[RR], list[RR]],
    limit: int = 65535,
    opt: bytes | None = None,
) -> bytes:
    """Pack a whole message, truncating to `limit` bytes (the OPT record's size is reserved)."""
    packer = Packer(limit - (len(opt) if opt else 0))
    if question:
        packer.question(question)
    for section, records in enumerate(sections, start=1):
        for rr in records:
            if not packer.add(section, rr):
                break
        if packer.truncated:
            break
    return packer.finish(qid, flags, opt)


def header_only(qid: int, flags: int) -> bytes:
    """A reply that is only a header (all counts zero)."""
    return _HEADER.pack(qid, flags, 0, 0, 0, 0)
