"""The wire codec, checked against dnslib as an independent encoder/decoder."""

from __future__ import annotations

import pytest
from dnslib import AAAA, CNAME, MX, QTYPE, RR as DRR, SOA, SRV, A, DNSRecord, EDNS0

from pilotfish.dns import wire
from pilotfish.dns.wire import RR, PartialMessage, WireError


def _reply_with_everything() -> bytes:
    r = DNSRecord.question("Www.Example.COM", "A").reply()
    r.add_answer(DRR("Www.Example.COM", QTYPE.CNAME, rdata=CNAME("edge.example.com"), ttl=60))
    r.add_answer(DRR("edge.example.com", QTYPE.A, rdata=A("192.0.2.1"), ttl=20))
    r.add_auth(DRR("example.com", QTYPE.SOA, rdata=SOA("ns.example.com", "host.example.com", (1, 2, 3, 4, 5)), ttl=300))
    r.add_ar(DRR("example.com", QTYPE.MX, rdata=MX("mail.example.com", 10)))
    r.add_ar(DRR("_x._tcp.example.com", QTYPE.SRV, rdata=SRV(1, 2, 3, "t.example.com")))
    r.add_ar(DRR("edge.example.com", QTYPE.AAAA, rdata=AAAA("2001:db8::1")))
    r.add_ar(EDNS0(udp_len=1232, flags="do"))
    return r.pack()  # dnslib compresses names, in rdata too


def test_parse_then_pack_round_trips_through_dnslib() -> None:
    raw = _reply_with_everything()
    msg = wire.parse_message(raw)
    assert wire.name_to_text(msg.qname) == "Www.Example.COM."
    assert [rr.rtype for rr in msg.answer] == [5, 1]
    assert msg.opt is not None and msg.opt.udp_size == 1232 and msg.opt.do
    out = wire.pack_message(msg.id, msg.flags, msg.question, (msg.answer, msg.authority, msg.additional),
                            opt=wire.opt_record(msg.opt.udp_size, msg.opt.do))
    assert str(DNSRecord.parse(out)) == str(DNSRecord.parse(raw))
    assert len(out) <= len(raw) + 30  # names compressed again


def test_rdata_names_are_decompressed_so_records_can_move() -> None:
    msg = wire.parse_message(_reply_with_everything())
    cname, soa = msg.answer[0], msg.authority[0]
    assert cname.rdata == wire.text_to_name("edge.example.com")
    assert soa.rdata.startswith(wire.text_to_name("ns.example.com") + wire.text_to_name("host.example.com"))
    srv = next(rr for rr in msg.additional if rr.rtype == 33)
    assert srv.rdata.endswith(wire.text_to_name("t.example.com"))


def test_truncation_drops_whole_records_and_sets_tc() -> None:
    name = wire.text_to_name("many.example.com")
    question = name + b"\x00\x01\x00\x01"
    records = [RR(name, 1, 1, 30, bytes([10, 0, 0, i])) for i in range(100)]
    out = wire.pack_message(7, wire.QR, question, (records, [], []), limit=512)
    parsed = DNSRecord.parse(out)
    assert len(out) <= 512 and parsed.header.tc and len(parsed.rr) == 29  # Istio's count
    with_opt = wire.pack_message(7, wire.QR, question, (records, [], []), limit=1232, opt=wire.opt_record(1232))
    parsed = DNSRecord.parse(with_opt)
    assert len(with_opt) <= 1232 and len(parsed.rr) == 74 and parsed.ar[0].rtype == QTYPE.OPT


def test_compression_keeps_letter_case() -> None:
    """A lower-cased owner must not point at the client's mixed-case question."""
    question = wire.text_to_name("ProductPage.NS1") + b"\x00\x01\x00\x01"
    owner = wire.text_to_name("productpage.ns1")
    out = DNSRecord.parse(wire.pack_message(1, wire.QR, question, ([RR(owner, 1, 1, 30, b"\x09\x09\x09\x09")], [], [])))
    assert str(out.rr[0].rname) == "productpage.ns1." and str(out.q.qname) == "ProductPage.NS1."


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"\xc0\x0c", "pointer to itself"),
        (b"\x01a\xc0\x0e", "pointer forward"),
        (b"\x40" + b"a" * 64 + b"\x00", "label of 64 bytes"),
        (b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x00", "name over 255"),
        (b"\x05ab", "label past the end"),
        (b"\x80\x00", "reserved label type"),
    ],
)
def test_bad_names_are_rejected(body: bytes, reason: str) -> None:
    packet = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + body + b"\x00\x01\x00\x01"
    with pytest.raises(WireError):
        wire.parse_message(packet)


def test_question_cut_after_the_name_reads_as_type_zero() -> None:
    """miekg/dns accepts a question without type/class (qtype 0); the proxy forwards it."""
    packet = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x00"
    msg = wire.parse_message(packet)
    assert msg.short_question and msg.qtype == 0 and msg.qclass == 0


def test_partial_message_keeps_the_question() -> None:
    packet = DNSRecord.question("productpage.", "A").pack()
    packet = packet[:10] + b"\x00\x01" + packet[12:] + b"\x00\x00"  # ARCOUNT 1, record cut
    with pytest.raises(PartialMessage) as err:
        wire.parse_message(packet)
    assert wire.name_to_text(err.value.partial.qname) == "productpage."


def test_presentation_form_escapes_what_would_collide() -> None:
    dotted_label = b"\x03a.b\x00"
    assert wire.name_to_text(dotted_label) == "a\\.b."
    assert wire.name_to_text(b"\x02\x00z\x00") == "\\000z."
    assert wire.name_to_text(b"\x00") == "."


def test_opt_and_ede_encoding() -> None:
    opt = wire.opt_record(1232, do=True, options=wire.ede_option(wire.EDE_STALE_ANSWER))
    record = DNSRecord.parse(wire.pack_message(1, wire.QR, None, ([], [], []), opt=opt))
    edns = record.ar[0]
    assert edns.rclass == 1232 and edns.ttl & 0x8000
    assert edns.rdata[0].code == 15 and edns.rdata[0].data == b"\x00\x03"
