"""Reply memos: finished replies kept by the serving threads, keyed by what decides them.

The UDP hot path is one dict lookup and an ID patch (dns/server.py). What the key holds decides
what an attacker can make the memo hold, so it is the part of a query that decides the answer
and nothing else: the header after the ID (flags, section counts), the question as sent (its
letter case is echoed) and, when there is an OPT record, its fixed part (UDP size, extended
rcode, version, DO). Not in the key: bytes after the last record (the parser ignores them; a
key of the whole packet let a padded query add up to 64 KiB per key, issue 7 item 1) and EDNS
option contents (dig's fresh cookie per query made every query a miss).

The key is cut from the packet without parsing: `data[2 : data.find(0, 12) + 14]`, that is up to
the question name's first zero byte (its root label), then QTYPE, QCLASS and the 9 fixed bytes
of an OPT record before its RDLENGTH. Only a query in canonical form is stored: one uncompressed
question whose name holds no other zero byte, then nothing, or exactly one OPT record and
nothing after it. For such a query the cut is exact, and a packet whose cut equals a stored key
has the same bytes up to and including the name's root label, so the same question (the label
walk over equal bytes ends at the same place). A packet in another form is never stored; one
that asks the same question but is malformed after the key (an OPT whose RDATA runs short,
records after the OPT) gets the stored answer where the engine would say FORMERR. No packet
gets the reply to another question, flags or EDNS size: a review fuzzed 300,000 mutations of
stored queries (zero bytes, pointers, counts, opcodes, a second question, OPT bytes) and found
none.

Each memo is bounded in bytes (MEMO_MAX_BYTES) and cleared whole when full, as before when it
was bounded in entries: a bound an attacker cannot push past, at the price that a flood of
distinct names sends honest queries to the slow path for a moment.

Forwarded answers live in the same memo (CachedReply): the relayed reply with its TTLs patched
for its age, rebuilt at most once a second, until the cache TTL runs out; so a cache hit costs
what a mesh hit costs, on the UDP thread, without a hand-off to the trio loop.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from .table import LookupTable
from .wire import AA, TYPE_A, TYPE_AAAA, text_labels, ttl_offsets

# Per memo (one for UDP, one for TCP). Mesh replies are 60-200 bytes; with ENTRY_OVERHEAD,
# 8 MiB holds ~25,000 replies, every A and AAAA answer of a 10,000-service mesh; an attacker
# cycling distinct names gets at most this much memory before the memo is cleared.
MEMO_MAX_BYTES = 8 << 20
# What a dict slot and two bytes objects cost beyond their lengths (CPython 3.11+, 64-bit):
# measured with tracemalloc by tests/dns/test_memo.py.
ENTRY_OVERHEAD = 160
_OPT_FIXED = 9  # an OPT record before RDLENGTH: root name, TYPE, CLASS (UDP size), TTL
_U32 = struct.Struct("!I")


def memo_key(data: bytes) -> bytes:
    """The key of a query packet (see the module docstring); the hot path inlines this."""
    return data[2 : data.find(b"\0", 12) + 14]


def stored_key(data: bytes) -> bytes | None:
    """The key under which the reply to the query `data` may be stored, or None when the
    packet is not in canonical form and must not be memoised (see the module docstring)."""
    root = data.find(b"\0", 12)
    if root < 0 or data[4:10] != b"\0\x01\0\0\0\0":  # QDCOUNT 1, no answer or authority
        return None
    off = 12
    while off < root:  # the label walk must end at the first zero byte: plain labels only
        length = data[off]
        if length > 63:
            return None
        off += 1 + length
    qend = root + 5
    if off != root or qend > len(data):
        return None
    arcount = data[10:12]
    if arcount == b"\0\0":
        return data[2:] if len(data) == qend else None
    fixed_end = qend + _OPT_FIXED
    if arcount != b"\0\x01" or data[qend : qend + 3] != b"\0\0\x29" or fixed_end + 2 > len(data):
        return None
    if fixed_end + 2 + int.from_bytes(data[fixed_end : fixed_end + 2], "big") != len(data):
        return None
    return data[2:fixed_end]


class CachedReply:
    """A forwarded reply kept until `expires` (monotonic), its TTLs aged as it is served."""

    __slots__ = ("_body", "_offsets", "_ttls", "_stored", "_expires", "_age", "_current")

    def __init__(self, reply: bytes, ttl: float, now: float) -> None:
        body = bytearray(reply[2:])
        body[0] &= ~(AA >> 8) & 0xFF  # cached data is not authoritative (RFC 1035 §6.1.3)
        self._offsets = [o - 2 for o in ttl_offsets(reply)]
        self._ttls = [_U32.unpack_from(body, o)[0] for o in self._offsets]
        self._body = bytes(body)
        self._stored = now
        self._expires = now + ttl
        self._age = 0
        self._current = self._body

    @property
    def size(self) -> int:
        """Bytes held: the reply and its aged copy, two lists of ints, the object."""
        return 2 * len(self._body) + 80 * len(self._offsets) + 200

    def current(self, now: float) -> bytes | None:
        """The reply after the ID with TTLs aged, or None once expired (the caller asks again)."""
        if now >= self._expires:
            return None
        age = int(now - self._stored)
        if age != self._age:
            body = bytearray(self._body)
            for off, ttl in zip(self._offsets, self._ttls):
                _U32.pack_into(body, off, max(0, ttl - age))
            self._current, self._age = bytes(body), age
        return self._current


class Rotation(itertools.cycle):  # type: ignore[type-arg]
    """Rotations of a multi-record reply, served in turn; a cycle, so `next` stays the C call."""

    __slots__ = ("size",)
    size: int


class Memo(dict[bytes, Any]):
    """key -> reply after the ID (bytes), a cycle of rotations, or a CachedReply; with the
    bytes it holds. A dict subclass so that the hot path's `get` stays the C method."""

    __slots__ = ("nbytes", "max_bytes")

    def __init__(self, max_bytes: int = MEMO_MAX_BYTES) -> None:
        super().__init__()
        self.nbytes = 0
        self.max_bytes = max_bytes

    def put(self, key: bytes, value: Any, size: int) -> None:
        """Store; clear everything first when the bound would be passed. Several serving threads
        may store at once: the count is then approximate, never unbounded (each clear resets it)."""
        cost = len(key) + size + ENTRY_OVERHEAD
        if self.nbytes + cost > self.max_bytes:
            self.clear()
            self.nbytes = 0
        self[key] = value
        self.nbytes += cost

    def put_local(self, key: bytes, variants: tuple[bytes, ...], sent: int) -> None:
        """A reply made from the table: one body, or a rotation continuing after `sent`."""
        if len(variants) == 1:
            self.put(key, variants[0][2:], len(variants[0]))
        else:
            order = variants[sent + 1 :] + variants[: sent + 1]
            rotation = Rotation([v[2:] for v in order])
            rotation.size = sum(map(len, variants))
            self.put(key, rotation, rotation.size)


def lookup_reply(memo: Memo, data: bytes, now: Callable[[], float] = time.monotonic) -> bytes | None:
    """The memoised reply to a query packet (its ID in place), or None."""
    value = memo.get(memo_key(data))
    if value is None:
        return None
    if type(value) is bytes:
        return data[:2] + value
    if type(value) is CachedReply:
        body = value.current(now())
        return None if body is None else data[:2] + body
    rotated: bytes = next(value)
    return data[:2] + rotated


def _key_labels(key: bytes) -> tuple[int, list[str]]:
    """QTYPE and lower-cased labels of a stored key's question (key = packet from offset 2)."""
    root = key.find(b"\0", 10)
    return int.from_bytes(key[root + 1 : root + 3], "big"), text_labels(key[10 : root + 1].lower())


def carry(
    old: Memo,
    new: Memo,
    old_table: LookupTable | None,
    new_table: LookupTable,
    pause: Callable[[], None],
) -> int:
    """Copy into `new` the entries of `old` whose answer the new table does not change: a
    question of another type than A/AAAA (always forwarded), or one the two tables resolve alike
    (both not at all: still forwarded; or to equal records). Returns how many were carried.

    Runs after the swap, in the thread that built the table, pausing as it goes: entries not yet
    carried take the slow path meanwhile, which stores them itself.
    """
    if old_table is None:
        return 0
    carried = 0
    items: Iterable[tuple[bytes, Any]] = old.copy().items()  # one C call: safe against writers
    for n, (key, value) in enumerate(items):
        if not n % 256:
            pause()
        qtype, labels = _key_labels(key)
        if qtype in (TYPE_A, TYPE_AAAA) and not old_table.same_answer(new_table, labels):
            continue
        if key not in new:
            new.put(key, value, _size(value))
            carried += 1
    return carried


def _size(value: Any) -> int:
    return len(value) if type(value) is bytes else int(value.size)


