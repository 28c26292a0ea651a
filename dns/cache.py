"""The upstream answer cache: positive and negative (RFC 2308), TTL-capped, size-bounded (LRU),
with serve-stale (RFC 8767) for when every upstream fails. Pure: the caller passes the clock.

Istio's agent caches nothing, so every pod's repeated lookups of external names reach kube-dns
(istio#58806, #44169). Keys hold the lower-cased question and the bits that change the answer
(RD, CD, DO); a hit is rebuilt for the asking client: its ID and question case, TTLs aged, AA
cleared (cached data is not authoritative), and an OPT record only if the client sent one.
"""

from __future__ import annotations

import struct
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
)

STALE_TTL = 30  # RFC 8767 §4: TTL of records served stale
CacheKey = tuple[bytes, int, int, int, bool]


@dataclass(slots=True)
class Entry:
    """One cached upstream reply, its records without the OPT."""

    flags: int  # rcode, RA and AD of the upstream reply
    sections: tuple[list[RR], list[RR], list[RR]]
    stored: float
    ttl: float


def cache_key(query: Message) -> CacheKey | None:
    """The key of a query, or None when it must not use the cache (not a plain QUERY)."""
    if query.flags & OPCODE_MASK or query.short_question or query.qdcount != 1:
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
        return min(min(rr.ttl for rr in reply.answer), max_ttl)
    if rcode in (NOERROR, NXDOMAIN):
        for rr in reply.authority:
            if rr.rtype == TYPE_SOA and len(rr.rdata) >= 20:
                minimum = struct.unpack_from("!I", rr.rdata, len(rr.rdata) - 4)[0]
                return min(rr.ttl, minimum, negative_ttl)
    return 0


class UpstreamCache:
    """LRU cache of upstream replies. Entries past their TTL stay for `stale` seconds more, to be
    served only when no upstream answers."""

    def __init__(
        self, size: int, max_ttl: float = 300, negative_ttl: float = 30, stale: float = 86400
    ) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.stale = stale
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: CacheKey, now: float) -> Entry | None:
        """A live entry (counted as a hit) or None (counted as a miss)."""
        entry = self._entries.get(key)
        if entry is not None:
            age = now - entry.stored
            if age < entry.ttl:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            if age >= entry.ttl + self.stale:
                del self._entries[key]
        self.misses += 1
        return None

    def stale_entry(self, key: CacheKey, now: float) -> Entry | None:
        """An expired entry still inside the serve-stale window."""
        entry = self._entries.get(key)
        if entry is None or now - entry.stored >= entry.ttl + self.stale:
            return None
        self.stale_hits += 1
        return entry

    def put(self, key: CacheKey, reply: Message, now: float) -> None:
        """Store a reply if RFC 2308 and the caps allow; evict the least recently used."""
        ttl = cache_ttl(reply, self.max_ttl, self.negative_ttl)
        if ttl <= 0 or self.size <= 0:
            return
        flags = reply.flags & (RCODE_MASK | RA | AD)
        sections = (reply.answer, reply.authority, reply.additional)
        self._entries[key] = Entry(flags, sections, now, ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def render(query: Message, entry: Entry, now: float, tcp: bool, stale: bool = False) -> bytes:
    """A cached reply for this client: its ID and question, TTLs aged (30 s when stale, with an
    RFC 8914 'Stale Answer' extended error if it sent EDNS), truncated to its size."""
    age = int(now - entry.stored)

    def aged(records: list[RR]) -> list[RR]:
        return [
            RR(rr.name, rr.rtype, rr.rclass, STALE_TTL if stale else max(0, rr.ttl - age), rr.rdata)
            for rr in records
        ]

    flags = reply_flags(query.flags, entry.flags & RCODE_MASK) | (entry.flags & (RA | AD))
    flags &= ~AA
    options = ede_option(EDE_STALE_ANSWER) if stale else b""
    sections = (aged(entry.sections[0]), aged(entry.sections[1]), aged(entry.sections[2]))
    return pack_message(
        query.id, flags, query.question, sections, size_limit(query, tcp), proxy_opt(query, 0, options)
    )
