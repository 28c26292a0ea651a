"""Two behaviours recorded from Istio's DNS code that are not among data/cases.json (issue 7):

a. resolv.conf search domains written with a trailing dot: Istio's suffix test against search[0]
   then never matches, so every alias is expanded with search[0], the own-namespace FQDN too
   (docs/istio-compat.md "DNS lookup table"): `productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.`
   is a CNAME to the
   FQDN, answered with its A record. pilotfish matches it.
b. A question with a name but no qtype/qclass bytes: miekg reads it as qtype 0 and Istio forwards
   it. pilotfish answers FORMERR (RFC 1035 §4.1.2: QTYPE and QCLASS are part of every question),
   a documented improvement; never SERVFAIL.
"""

from __future__ import annotations

from dnslib import QTYPE, RCODE, DNSRecord
from vectors import fixture_table, name_table

from pilotfish.dns.answer import Forward, Reply, respond
from pilotfish.dns.table import LookupTable

DOTTED = ("ns1.svc.cluster.local.", "svc.cluster.local.", "cluster.local.")


def _table(search: tuple[str, ...]) -> LookupTable:
    return LookupTable.build(name_table(fixture_table("istio_test")).table, "ns1", "ns1.svc.cluster.local", search)


def _local_reply(table: LookupTable, qname: str, qtype: str = "A") -> DNSRecord:
    outcome = respond(table, DNSRecord.question(qname, qtype).pack(), tcp=False)
    assert isinstance(outcome, Reply) and outcome.local, outcome
    return DNSRecord.parse(outcome.variants[0])


def test_a_trailing_dot_search_domain_expands_the_own_namespace_fqdn_as_istio() -> None:
    reply = _local_reply(_table(DOTTED), "productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.")
    assert reply.header.rcode == RCODE.NOERROR and reply.header.aa
    assert [(str(rr.rname), QTYPE[rr.rtype], rr.ttl, str(rr.rdata)) for rr in reply.rr] == [
        ("productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.", "CNAME", 30, "productpage.ns1.svc.cluster.local."),
        ("productpage.ns1.svc.cluster.local.", "A", 30, "9.9.9.9"),
    ]


def test_without_the_trailing_dot_istio_forwards_it_and_so_does_pilotfish() -> None:
    """Istio's rule since 62a70b1 (docs/istio-compat.md "DNS lookup table"): an alias already
    under search[0] is not
    expanded with it."""
    query = DNSRecord.question("productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.").pack()
    table = _table(tuple(s.rstrip(".") for s in DOTTED))
    assert isinstance(respond(table, query, tcp=False), Forward)


def test_the_trailing_dot_changes_nothing_else() -> None:
    """Other answers are the same with and without the dots (search[1:] are pilotfish's own
    extension and keep their rule)."""
    dotted, plain = _table(DOTTED), _table(tuple(s.rstrip(".") for s in DOTTED))
    assert dotted.names() == plain.names()
    extra = set(dotted.expanded_names().items()) - set(plain.expanded_names().items())
    assert extra and all(name.endswith(".ns1.svc.cluster.local.") and name.startswith(target) for name, target in extra)
    assert set(plain.expanded_names().items()) <= set(dotted.expanded_names().items())
    for name in ("productpage.ns1.svc.cluster.local.svc.cluster.local.", "productpage.ns1.svc.cluster.local.cluster.local."):
        assert dotted.resolve(name) is None


QUESTION_WITHOUT_TYPE = bytes.fromhex("abcd01000001000000000000") + b"\x03www\x06google\x03com\x00"


def test_a_question_without_qtype_and_qclass_is_formerr_not_servfail() -> None:
    outcome = respond(_table(DOTTED), QUESTION_WITHOUT_TYPE, tcp=False)
    assert isinstance(outcome, Reply) and not outcome.local
    reply = outcome.variants[0]
    assert reply[:2] == b"\xab\xcd"
    header = DNSRecord.parse(reply).header
    assert header.rcode == RCODE.FORMERR and header.qr and not header.aa
    assert header.q == 0 and header.a == 0  # nothing echoed: the question was never whole


def test_a_question_with_qtype_but_no_qclass_is_formerr_too() -> None:
    outcome = respond(_table(DOTTED), QUESTION_WITHOUT_TYPE + b"\x00\x01", tcp=True)
    assert isinstance(outcome, Reply)
    assert DNSRecord.parse(outcome.variants[0]).header.rcode == RCODE.FORMERR
