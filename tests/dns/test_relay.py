"""What goes upstream (EDNS0 added over UDP) and what comes back to the client."""

from __future__ import annotations

from dnslib import QTYPE, RR as DRR, A, DNSRecord, EDNS0

from pilotfish.dns.relay import relay, upstream_query
from pilotfish.dns.wire import parse_message


def _query(edns: int | None = None) -> bytes:
    q = DNSRecord.question("Giant.", "A")
    q.header.id = 4127
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return q.pack()


def _giant_reply(query: bytes, with_opt: bool) -> bytes:
    r = DNSRecord.parse(query).reply()
    r.ar = []
    for i in range(64):
        r.add_answer(DRR("aaaaaaaaaaaa.aaaaaa.", QTYPE.A, rdata=A(f"240.0.0.{i}"), ttl=30))
    if with_opt:
        r.add_ar(EDNS0(udp_len=1232))
    return r.pack()


def test_udp_query_without_edns_gets_edns0_upstream() -> None:
    raw = _query()
    sent = DNSRecord.parse(upstream_query(parse_message(raw), raw, tcp=False))
    assert sent.header.id == 4127 and str(sent.q.qname) == "Giant."
    assert [ar.rtype for ar in sent.ar] == [QTYPE.OPT] and sent.ar[0].rclass == 1232


def test_small_edns_size_is_raised_and_large_one_kept() -> None:
    raw = _query(edns=600)
    assert DNSRecord.parse(upstream_query(parse_message(raw), raw, tcp=False)).ar[0].rclass == 1232
    raw = _query(edns=4096)
    assert upstream_query(parse_message(raw), raw, tcp=False) == raw


def test_tcp_query_goes_upstream_unchanged() -> None:
    raw = _query()
    assert upstream_query(parse_message(raw), raw, tcp=True) == raw


def test_large_answer_reaches_a_non_edns_client_truncated_without_opt() -> None:
    """istio#61371: the 64-record answer must become TC=1 + what fits in 512, not SERVFAIL."""
    raw = _query()
    reply = _giant_reply(upstream_query(parse_message(raw), raw, tcp=False), with_opt=True)
    out = relay(parse_message(raw), reply, parse_message(reply), tcp=False)
    parsed = DNSRecord.parse(out)
    assert len(out) <= 512 and parsed.header.tc and parsed.header.rcode == 0
    assert 0 < len(parsed.rr) < 64 and parsed.ar == []


def test_reply_that_fits_is_relayed_byte_for_byte() -> None:
    raw = _query(edns=4096)
    reply = _giant_reply(raw, with_opt=True)
    assert relay(parse_message(raw), reply, parse_message(reply), tcp=False) == reply


def test_tcp_client_gets_everything() -> None:
    raw = _query()
    reply = _giant_reply(raw, with_opt=False)
    assert relay(parse_message(raw), reply, parse_message(reply), tcp=True) == reply
