"""The answer engine: a query's bytes in, what to do with them out. Pure: no sockets, no clock.

It reproduces what a client of Istio's agent sees (docs/istio-compat.md "DNS answers"): the
miekg/dns library's filtering of bad packets, then Istio's handler (table lookup, wildcard,
search-domain CNAME, A/AAAA, NODATA, TTL 30, AA, truncation). Differences, all deliberate:
- UDP queries up to 4096 bytes are read whole (Istio's 512-byte buffer turns a padded EDNS
  query into FORMERR);
- a reply the proxy makes itself carries an OPT record when the query had one (RFC 6891 §7);
  an EDNS version other than 0 gets BADVERS (RFC 6891 §6.1.3);
- UPDATE is forwarded upstream instead of NOTIMP (external-dns and nsupdate behind a sidecar);
- a question cut short after its name (no QTYPE, or no QCLASS) is FORMERR, header only: miekg
  reads it as type/class 0 and Istio forwards that (or answers a QCLASS-less A query), but
  RFC 1035 §4.1.2 makes both fields part of every question, Unbound answers FORMERR too, and
  forwarding costs an upstream round trip to relay an answer to a question the client never
  asked (type 0 is reserved, RFC 6895 §3.1);
- multi-record answers rotate: each reply is one of up to 8 precomputed rotations, so the order
  changes from reply to reply without a shuffle per query.
"""

from __future__ import annotations

from typing import NamedTuple

from .table import LookupTable
from .wire import (
    AA,
    BADVERS,
    CD,
    CLASS_IN,
    EDNS_UDP_SIZE,
    FORMERR,
    NOERROR,
    NOTIMP,
    OPCODE_MASK,
    OPCODE_NOTIFY,
    OPCODE_QUERY,
    OPCODE_UPDATE,
    QR,
    RCODE_MASK,
    RD,
    REFUSED,
    RR,
    SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    Z,
    Message,
    PartialMessage,
    WireError,
    header_only,
    opt_record,
    pack_message,
    parse_message,
    read_header,
    text_labels,
    text_to_name,
)

LOCAL_TTL = 30
MAX_ROTATIONS = 8
TCP_LIMIT = 65535
_NO_RECORDS: tuple[list[RR], list[RR], list[RR]] = ([], [], [])


class Reply(NamedTuple):
    """Send one of `variants` (complete replies, the client's ID already in place)."""

    variants: tuple[bytes, ...]
    handled: bool  # the query reached the handler (Istio counts it in dns_requests_total)
    local: bool  # answered from the table: depends only on the packet and the table


class Forward(NamedTuple):
    """Ask the upstream nameservers."""

    query: Message
    raw: bytes


Outcome = Reply | Forward | None  # None: drop silently


def reply_flags(query_flags: int, rcode: int, aa: bool = False) -> int:
    """Header flags of a reply made for a query (miekg's SetReply): QR, the opcode, RD and CD
    copied only for QUERY, the rcode's low four bits."""
    opcode = query_flags & OPCODE_MASK
    flags = QR | opcode | (rcode & RCODE_MASK)
    if not opcode:
        flags |= query_flags & (RD | CD)
    if aa:
        flags |= AA
    return flags


def size_limit(query: Message, tcp: bool) -> int:
    """How large a reply may be: 65535 over TCP; the client's EDNS size (at least 512) over UDP."""
    if tcp:
        return TCP_LIMIT
    return max(512, query.opt.udp_size) if query.opt else 512


def proxy_opt(query: Message, ext_rcode: int = 0, options: bytes = b"") -> bytes | None:
    """The OPT record of a reply the proxy makes itself: present iff the query had one."""
    if query.opt is None:
        return None
    return opt_record(EDNS_UDP_SIZE, query.opt.do, ext_rcode, options)


def servfail(query: Message) -> bytes:
    """The proxy's own SERVFAIL: no table yet, or no upstream answered (question echoed)."""
    return pack_message(
        query.id, reply_flags(query.flags, SERVFAIL), query.question, _NO_RECORDS,
        opt=proxy_opt(query),
    )


def _reject(qid: int, flags: int) -> Reply:
    return Reply((header_only(qid, flags),), False, False)


def _formerr(qid: int, base: int, partial: Message) -> Reply:
    flags = (base & ~OPCODE_MASK) | FORMERR
    return Reply((pack_message(qid, flags, partial.question or None, _NO_RECORDS),), False, False)


def respond(
    table: LookupTable | None, data: bytes, tcp: bool, forward_before_table: bool = False
) -> Outcome:
    """Decide what to do with one query. `table` None means no NameTable has arrived yet."""
    if len(data) < 12:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = read_header(data)
    if flags & QR:
        return None
    opcode = (flags & OPCODE_MASK) >> 11
    # Library-made rejections reuse the request header: QR set, AA and Z cleared.
    base = (flags | QR) & ~(AA | Z | RCODE_MASK)
    if opcode == OPCODE_UPDATE:
        try:
            msg = parse_message(data)
        except PartialMessage as err:
            return _formerr(qid, base, err.partial)
        if qdcount != 1 or not msg.qname:
            return _formerr(qid, base, msg)
        if msg.short_question:
            return _reject(qid, (base & ~OPCODE_MASK) | FORMERR)
        return Forward(msg, data)
    if opcode != OPCODE_QUERY and opcode != OPCODE_NOTIFY:
        return _reject(qid, base | NOTIMP)
    if qdcount != 1 or ancount > 1 or nscount > 1 or arcount > 2:
        return _reject(qid, (base & ~OPCODE_MASK) | FORMERR)
    try:
        msg = parse_message(data)
    except PartialMessage as err:
        return _formerr(qid, base, err.partial)
    if not msg.qname:
        return _reject(qid, reply_flags(flags, REFUSED))
    if msg.short_question:  # nothing to echo: the question was never whole
        return _reject(qid, (base & ~OPCODE_MASK) | FORMERR)
    return _handle(table, msg, data, tcp, forward_before_table)


def _handle(
    table: LookupTable | None, msg: Message, data: bytes, tcp: bool, forward_before_table: bool
) -> Outcome:
    """Istio's handler, for a query that passed the library's checks."""
    if msg.opt is not None and msg.opt.version:
        flags = reply_flags(msg.flags, BADVERS)
        opt = proxy_opt(msg, ext_rcode=BADVERS >> 4)
        return Reply((pack_message(msg.id, flags, msg.question, _NO_RECORDS, opt=opt),), True, False)
    if table is None:
        if forward_before_table:
            return Forward(msg, data)
        return Reply((servfail(msg),), True, False)
    qtype = msg.qtype
    if qtype != TYPE_A and qtype != TYPE_AAAA:
        return Forward(msg, data)
    qname = msg.qname.lower()
    match = table.lookup(text_labels(qname))
    if match is None:
        return Forward(msg, data)
    records = match.a if qtype == TYPE_A else match.aaaa
    answers: list[RR] = []
    owner = qname
    if match.cname is not None:
        try:
            owner = text_to_name(match.cname)
        except WireError:  # a table name that cannot be a DNS name: let upstream decide
            return Forward(msg, data)
        if records:
            answers.append(RR(qname, TYPE_CNAME, CLASS_IN, LOCAL_TTL, owner))
    flags = reply_flags(msg.flags, NOERROR, aa=True)
    limit = size_limit(msg, tcp)
    opt = proxy_opt(msg)
    rrs = [RR(owner, qtype, CLASS_IN, LOCAL_TTL, rdata) for rdata in records]
    variants = tuple(
        pack_message(msg.id, flags, msg.question, (answers + rrs[r:] + rrs[:r], [], []), limit, opt)
        for r in range(min(len(rrs), MAX_ROTATIONS) or 1)
    )
    return Reply(variants, True, True)
