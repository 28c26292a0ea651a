"""Checks of the mock upstream itself, with dnslib as the client.

Why: every vector that forwards upstream relies on the mock behaving like Istio's
``makeUpstream()``; if the mock drifted, proxy failures would be misattributed. The wire lengths
asserted here are the ones Istio's Go upstream produced (``wire_len_go`` in the vectors).
"""

from __future__ import annotations

import socket

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from mock_upstream import BEHAVIOURS, GIANT_ADDRESSES, MockUpstream, answer


def _ask(mock: MockUpstream, name: str, tcp: bool, edns: int | None = None, qtype: str = "A") -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    query.header.id = 4242
    if edns is not None:
        query.add_ar(EDNS0(udp_len=edns))
    return DNSRecord.parse(query.send(mock.host, mock.port, tcp=tcp, timeout=2))


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_normal_answers(tcp: bool) -> None:
    with MockUpstream("normal") as mock:
        bing = _ask(mock, "WWW.Bing.com", tcp)
        assert bing.header.id == 4242 and bing.header.rcode == RCODE.NOERROR
        assert (bing.header.aa, bing.header.ra, bing.header.tc, bing.header.rd) == (0, 0, 0, 1)
        assert str(bing.q.qname) == "WWW.Bing.com."  # question echoed with the client's case
        assert [(str(r.rname), r.ttl, str(r.rdata)) for r in bing.rr] == [("www.bing.com.", 30, "1.1.1.1")]
        assert _ask(mock, "sub.www.bing.com", tcp).rr[0].rdata.toZone() == "1.1.1.1"
        assert _ask(mock, "www.bing.com", tcp, qtype="AAAA").rr[0].rtype == QTYPE.A  # name-only mux

        giant = _ask(mock, "giant", tcp)
        assert not giant.header.tc
        assert [str(r.rdata) for r in giant.rr] == list(GIANT_ADDRESSES)
        assert {str(r.rname) for r in giant.rr} == {"aaaaaaaaaaaa.aaaaaa."}

        giant_tc = _ask(mock, "giant-tc", tcp)
        assert giant_tc.header.tc and len(giant_tc.rr) == 29

        other = _ask(mock, "nope.example", tcp, edns=4096)
        assert other.header.rcode == RCODE.NXDOMAIN and not other.rr and not other.ar

        received = mock.queries
        assert [q.transport for q in received] == ["tcp" if tcp else "udp"] * 6
        assert received[0].as_vector(4242) == {
            "transport": "tcp" if tcp else "udp",
            "qname": "WWW.Bing.com.",
            "qtype": "A",
            "same_id_as_client": True,
            "edns_udp_size": None,
            "rd": True,
        }
        assert received[-1].edns_udp_size == 4096


def test_wire_lengths_match_istios_upstream() -> None:
    """Uncompressed like miekg's default: 58 bytes for bing, 2263 for giant (vectors' wire_len_go)."""
    query = DNSRecord.question("www.bing.com")
    assert len(answer(query.pack())) == 58
    assert len(answer(DNSRecord.question("giant").pack())) == 2263
    assert len(answer(DNSRecord.question("giant-tc").pack())) <= 512
    assert len(answer(DNSRecord.question("www.bing.com").pack(), "refused")) == 30


def test_behaviours() -> None:
    with MockUpstream("refused") as mock:
        assert _ask(mock, "www.bing.com", False).header.rcode == RCODE.REFUSED
    with MockUpstream("edns") as mock:
        with_opt = _ask(mock, "www.bing.com", False, edns=4096)
        assert [(r.rtype, r.rclass) for r in with_opt.ar] == [(QTYPE.OPT, 1232)]
        assert not _ask(mock, "www.bing.com", False).ar
    query = DNSRecord.question("www.bing.com")
    query.header.id = 0xFFFF
    assert DNSRecord.parse(answer(query.pack(), "bad_id")).header.id == 0
    assert answer(query.pack(), "silent") is None
    with MockUpstream("silent") as mock:
        with pytest.raises(socket.timeout):
            query.send(mock.host, mock.port, timeout=0.2)
        assert mock.wait_for_queries(1, 1)[0].qname == "www.bing.com."


def test_garbage_does_not_kill_the_mock() -> None:
    with MockUpstream("normal") as mock:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for junk in (b"", b"\x00", b"\xff" * 12, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c"):
            sock.sendto(junk, mock.address)
        sock.close()
        assert _ask(mock, "www.bing.com", False).rr
        assert not mock.errors


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_stop_is_prompt(behaviour: str) -> None:
    with MockUpstream(behaviour) as mock:
        conn = socket.create_connection(mock.address)  # an idle TCP client must not block stop()
    conn.close()

