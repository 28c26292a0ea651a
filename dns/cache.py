"""The upstream answer cache: positive and negative (RFC 2308), TTL-capped, bounded in entries
and in bytes (LRU), with serve-stale (RFC 8767) for when every upstream fails. Pure: the caller
passes the clock.

An entry keeps the upstream reply's wire bytes, not parsed records: parsed, a reply of 3,000 A
records (48 KB over TCP) cost ~0.7 MB of Python objects, so a bound in entries was a bound of
gigabytes (issue 7 item 2). Bytes are what the bound counts: the reply plus ENTRY_OVERHEAD. A
reply larger than MAX_CACHED_REPLY is relayed and never cached. A hit is re-read from the bytes;
the hot path serves hits from the reply memo (dns/memo.py) and seldom gets here.

Istio's agent caches nothing, so every pod's repeated lookups of external names reach kube-dns
(istio#58806, #44169). Keys hold the lower-cased question and the bits that change the answer
(RD, CD, DO); a hit is rebuilt for the asking client: its ID and question case, TTLs aged, AA
cleared (cached data is not authoritative), and an OPT record only if the client sent one.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .answer import proxy_opt, reply_flags, size_limit
from .wire import (
    AA,
    AD,
    CD,
    EDE_STALE_ANSWER,
    NOERROR,
    NXDOMAIN,
    OPCODE_MASK,
    RA,
    RCODE_MASK,
    RD,
    RR,
    TC,
    TYPE_SOA,
    Message,
    ede_option,
    pack_message,
    parse_message,
)

STALE_TTL = 30  # RFC 8767 §4: TTL of records served stale
# The largest reply kept: RFC 6891 §6.2.5's suggested maximum EDNS payload, the most a UDP
# client is normally offered; larger replies come over TCP, are rare, and one would fill a
# small cache alone.
MAX_CACHED_REPLY = 4096
# Default bound of the whole cache. Unbound's default message cache is 4 MB too (msg-cache-size);
# at 100-500 bytes a reply that is 8,000-20,000 answers, beyond the 10,000-entry default.
DEFAULT_MAX_BYTES = 4 << 20
ENTRY_OVERHEAD = 400  # the key tuple, the Entry, the LRU node: measured by tests/dns/test_cache.py
CacheKey = tuple[bytes, int, int, int, bool]


@dataclass(slots=True)
class Entry:
    """One cached upstream reply, its records without the OPT."""

    flags: int  # rcode, RA and AD of the upstream reply
    raw: bytes  # the upstream reply as received
    stored: float
    ttl: float

    @property
    def size(self) -> int:
        """What the entry counts against the cache's byte bound."""
        return len(self.raw) + ENTRY_OVERHEAD


def cache_key(query: Message) -> CacheKey | None:
    """The key of a query, or None when it must not use the cache (not a plain QUERY)."""
    if query.flags & OPCODE_MASK or query.qdcount != 1:
        return None
    do = query.opt.do if query.opt is not None else False
    return (query.qname.lower(), query.qtype, query.qclass, query.flags & (RD | CD), do)


def cache_ttl(reply: Message, max_ttl: float, negative_ttl: float) -> float:
    """How long a reply may be cached; 0 when it must not be.

    Positive: the smallest answer TTL. Negative (NXDOMAIN, or NOERROR without answers): the
    smaller of the SOA's TTL and MINIMUM from the authority section; without a SOA a negative
    answer is not cached (RFC 2308 §5). Truncated replies and other rcodes are not cached.
    """
    if reply.flags & TC:
        return 0
    rcode = reply.flags & RCODE_MASK
    if rcode == NOERROR and reply.answer:
        return min(min(_ttl(rr.ttl) for rr in reply.answer), max_ttl)
    if rcode in (NOERROR, NXDOMAIN):
        for rr in reply.authority:
            if rr.rtype == TYPE_SOA and len(rr.rdata) >= 20:
                minimum = struct.unpack_from("!I", rr.rdata, len(rr.rdata) - 4)[0]
                return min(_ttl(rr.ttl), _ttl(minimum), negative_ttl)
    return 0


def _ttl(value: int) -> int:
    """RFC 2181 §8: a TTL with the top bit set is read as 0."""
    return value if value < 1 << 31 else 0


class UpstreamCache:
    """LRU cache of upstream replies. Entries past their TTL stay for `stale` seconds more, to be
    served only when no upstream answers. Safe from several threads (the UDP threads, the UDP
    forwarder's thread, the trio loop): each method holds a lock for its few dict operations."""

    def __init__(
        self,
        size: int,
        max_ttl: float = 300,
        negative_ttl: float = 30,
        stale: float = 86400,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.evictions = 0
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.stale = stale
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: CacheKey, now: float) -> Entry | None:
        """A live entry (counted as a hit) or None (counted as a miss)."""
        with self._lock:
            return self._fresh(key, now)

    def _fresh(self, key: CacheKey, now: float) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            age = now - entry.stored
            if age < entry.ttl:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            if age >= entry.ttl + self.stale:
                self._remove(key)
        self.misses += 1
        return None

    def stale_entry(self, key: CacheKey, now: float) -> Entry | None:
        """An expired entry still inside the serve-stale window."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or now - entry.stored >= entry.ttl + self.stale:
                return None
            self.stale_hits += 1
            return entry

    def put(self, key: CacheKey, raw: bytes, reply: Message, now: float) -> Entry | None:
        """Store a reply (`raw`, parsed as `reply`) if RFC 2308 and the bounds allow, evicting
        the least recently used. Returns the entry stored, or None."""
        ttl = cache_ttl(reply, self.max_ttl, self.negative_ttl)
        entry = Entry(reply.flags & (RCODE_MASK | RA | AD), raw, now, ttl)
        if ttl <= 0 or self.size <= 0 or len(raw) > MAX_CACHED_REPLY or entry.size > self.max_bytes:
            return None
        with self._lock:
            self._remove(key)
            self._entries[key] = entry
            self.nbytes += entry.size
            while len(self._entries) > self.size or self.nbytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.size
                self.evictions += 1
        return entry

    def _remove(self, key: CacheKey) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.size


def render(query: Message, entry: Entry, now: float, tcp: bool, stale: bool = False) -> bytes:
    """A cached reply for this client: its ID and question, TTLs aged (30 s when stale, with an
    RFC 8914 'Stale Answer' extended error if it sent EDNS), truncated to its size."""
    age = int(now - entry.stored)
    reply = parse_message(entry.raw)

    def aged(records: list[RR]) -> list[RR]:
        return [
            RR(rr.name, rr.rtype, rr.rclass, STALE_TTL if stale else max(0, rr.ttl - age), rr.rdata)
            for rr in records
        ]

    flags = reply_flags(query.flags, entry.flags & RCODE_MASK) | (entry.flags & (RA | AD))
    flags &= ~AA
    options = ede_option(EDE_STALE_ANSWER) if stale else b""
    sections = (aged(reply.answer), aged(reply.authority), aged(reply.additional))
    return pack_message(
        query.id, flags, query.question, sections, size_limit(query, tcp), proxy_opt(query, 0, options)
    )
