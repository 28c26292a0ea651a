"""The upstream cache's rules (RFC 2308 negative caching, TTL caps, LRU, RFC 8767 serve-stale),
with the clock passed in."""

from __future__ import annotations

from dnslib import QTYPE, RCODE, RR as DRR, SOA, A, DNSRecord, EDNS0

from pilotfish.dns.cache import UpstreamCache, cache_key, render
from pilotfish.dns.wire import parse_message


def _query(name: str = "www.example.com", edns: bool = False, qid: int = 1) -> bytes:
    q = DNSRecord.question(name, "A")
    q.header.id = qid
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    return q.pack()


def _reply(query: bytes, ttl: int = 60, rcode: int = RCODE.NOERROR, soa: tuple[int, int] | None = None, answer: bool = True) -> bytes:
    r = DNSRecord.parse(query).reply()
    r.ar = []
    r.header.rcode = rcode
    if answer:
        r.add_answer(DRR(r.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=ttl))
    if soa:
        soa_ttl, minimum = soa
        r.add_auth(DRR("example.com", QTYPE.SOA, rdata=SOA("ns.example.com", "h.example.com", (1, 2, 3, 4, minimum)), ttl=soa_ttl))
    return r.pack()


def _store(cache: UpstreamCache, reply: bytes, now: float = 0.0) -> tuple:
    query = parse_message(_query())
    key = cache_key(query)
    cache.put(key, bytes(reply), parse_message(reply), now)
    return key


def test_positive_answer_lives_for_its_ttl_capped() -> None:
    cache = UpstreamCache(10, max_ttl=300)
    key = _store(cache, _reply(_query(), ttl=60))
    assert cache.fresh(key, 59.0) is not None
    assert cache.fresh(key, 60.0) is None
    key = _store(cache, _reply(_query(), ttl=86400))
    assert cache.fresh(key, 299.0) is not None and cache.fresh(key, 300.0) is None
    assert (cache.hits, cache.misses) == (2, 2)


def test_negative_answer_uses_soa_minimum_and_cap() -> None:
    cache = UpstreamCache(10, negative_ttl=30)
    key = _store(cache, _reply(_query(), rcode=RCODE.NXDOMAIN, answer=False, soa=(3600, 10)))
    assert cache.fresh(key, 9.0) is not None and cache.fresh(key, 10.0) is None
    key = _store(cache, _reply(_query(), answer=False, soa=(3600, 900)))  # NODATA, capped
    assert cache.fresh(key, 29.0) is not None and cache.fresh(key, 30.0) is None


def test_uncacheable_replies_are_not_stored() -> None:
    cache = UpstreamCache(10)
    _store(cache, _reply(_query(), rcode=RCODE.NXDOMAIN, answer=False))  # no SOA: RFC 2308 §5
    _store(cache, _reply(_query(), rcode=RCODE.SERVFAIL, answer=False, soa=(60, 60)))
    _store(cache, _reply(_query(), ttl=0))
    truncated = DNSRecord.parse(_reply(_query()))
    truncated.header.tc = 1
    _store(cache, truncated.pack())
    assert len(cache) == 0


def test_size_bound_evicts_least_recently_used() -> None:
    cache = UpstreamCache(2)
    keys = []
    for name in ("a.example", "b.example", "c.example"):
        query = parse_message(_query(name))
        keys.append(cache_key(query))
        if name == "c.example":
            cache.fresh(keys[0], 0.0)  # touch a: b becomes the oldest
        cache.put(keys[-1], bytes(_reply(_query(name))), parse_message(_reply(_query(name))), 0.0)
    assert len(cache) == 2
    assert cache.fresh(keys[0], 1.0) is not None and cache.fresh(keys[1], 1.0) is None


def test_stale_window() -> None:
    cache = UpstreamCache(10, stale=100)
    key = _store(cache, _reply(_query(), ttl=10))
    assert cache.fresh(key, 50.0) is None
    assert cache.stale_entry(key, 50.0) is not None
    assert cache.stale_entry(key, 110.0) is None


def test_render_ages_ttls_and_adapts_to_the_client() -> None:
    cache = UpstreamCache(10)
    key = _store(cache, _reply(_query(), ttl=60))
    entry = cache.fresh(key, 25.4)
    other = parse_message(_query("WWW.example.COM", edns=True, qid=999))
    out = DNSRecord.parse(render(other, entry, 25.4, tcp=False))
    assert out.header.id == 999 and str(out.q.qname) == "WWW.example.COM."
    assert out.rr[0].ttl == 35 and out.header.aa == 0
    assert [ar.rtype for ar in out.ar] == [QTYPE.OPT]
    plain = DNSRecord.parse(render(parse_message(_query()), entry, 25.4, tcp=False))
    assert plain.ar == []


def test_stale_render_has_ttl_30_and_extended_error() -> None:
    cache = UpstreamCache(10)
    key = _store(cache, _reply(_query(), ttl=10))
    entry = cache.stale_entry(key, 500.0)
    out = DNSRecord.parse(render(parse_message(_query(edns=True)), entry, 500.0, tcp=False, stale=True))
    assert out.rr[0].ttl == 30
    assert out.ar[0].rdata[0].code == 15 and out.ar[0].rdata[0].data == b"\x00\x03"


def test_key_ignores_case_and_id_but_not_dnssec_bits() -> None:
    a = cache_key(parse_message(_query("A.Example", qid=1)))
    b = cache_key(parse_message(_query("a.example", qid=2)))
    q = DNSRecord.question("a.example", "A")
    q.add_ar(EDNS0(flags="do"))
    assert a == b and cache_key(parse_message(q.pack())) != a


def test_the_cache_holds_no_more_bytes_than_it_counts_and_stays_within_its_bound() -> None:
    import gc
    import tracemalloc

    names = [f"host-{i}.example.com" for i in range(2000)]
    replies = [(parse_message(_query(n)), _reply(_query(n))) for n in names]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = UpstreamCache(100_000, max_bytes=1 << 30)
        for query, raw in replies:
            cache.put(cache_key(query), bytes(raw), parse_message(raw), 0.0)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 2000
    assert used <= cache.nbytes, f"{used} bytes held, {cache.nbytes} counted"
    small = UpstreamCache(100_000, max_bytes=200_000)
    for query, raw in replies:
        small.put(cache_key(query), bytes(raw), parse_message(raw), 0.0)
        assert small.nbytes <= 200_000
    assert small.evictions > 0 and len(small) < 2000


def test_a_reply_over_4096_bytes_is_never_cached() -> None:
    query = _query("big.example.com")
    r = DNSRecord.parse(query).reply()
    for i in range(300):
        r.add_answer(DRR(r.q.qname, QTYPE.A, rdata=A(f"10.0.{i // 256}.{i % 256}"), ttl=60))
    raw = bytes(r.pack())
    assert len(raw) > 4096
    cache = UpstreamCache(10)
    assert cache.put(cache_key(parse_message(query)), raw, parse_message(raw), 0.0) is None
    assert len(cache) == 0 and cache.nbytes == 0
