"""What goes upstream and what comes back to the client. Pure functions over bytes.

Istio forwards the client's message unchanged and reads UDP replies into a 512-byte buffer, so
an answer larger than 512 bytes becomes SERVFAIL (istio#61371). pilotfish asks upstream over UDP
with EDNS0 and a buffer of at least 1232 bytes, then fits the reply to what the client can take:
truncated with TC=1 to the client's size, so the client retries over TCP. An OPT record the
client did not send is never returned to it (RFC 6891 §7).
"""

from __future__ import annotations

import struct

from .answer import size_limit
from .wire import EDNS_UDP_SIZE, Message, opt_record, pack_message, read_header

_U16 = struct.Struct("!H")


def upstream_query(query: Message, raw: bytes, tcp: bool) -> bytes:
    """The bytes to send upstream: the client's own message (same ID, case, flags, options),
    over UDP with an EDNS0 buffer raised to at least 1232 bytes."""
    if tcp:
        return raw
    if query.opt is None:
        out = bytearray(raw[: query.end])
        _U16.pack_into(out, 10, read_header(raw)[5] + 1)
        out += opt_record(EDNS_UDP_SIZE)
        return bytes(out)
    if query.opt.udp_size < EDNS_UDP_SIZE:
        out = bytearray(raw)
        _U16.pack_into(out, query.opt.class_offset, EDNS_UDP_SIZE)
        return bytes(out)
    return raw


def relay(query: Message, raw: bytes, reply: Message, tcp: bool) -> bytes:
    """The upstream reply as the client gets it: unchanged when it fits and carries no OPT the
    client did not ask for; otherwise repacked without that OPT and truncated to fit."""
    limit = size_limit(query, tcp)
    strip_opt = query.opt is None and reply.opt is not None
    if not strip_opt and len(raw) <= limit:
        return raw
    opt = None
    if reply.opt is not None and not strip_opt:
        o = reply.opt
        opt = opt_record(o.udp_size, o.do, o.ext_rcode, o.options, o.version)
    sections = (reply.answer, reply.authority, reply.additional)
    return pack_message(reply.id, reply.flags, reply.question or None, sections, limit, opt)
