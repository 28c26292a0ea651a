"""The reply memo (dns/memo.py): what its key holds, what it stores, what it costs, how forwarded
answers age in it, and which entries survive a table swap."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from dnslib import QTYPE, RR as DRR, A, DNSRecord, EDNS0, EDNSOption
from mock_upstream import MockUpstream
from proxy_harness import running_proxy, udp_exchange
from vectors import fixture_table, name_table

from pilotfish.dns import memo as memo_mod
from pilotfish.dns.config import DnsConfig
from pilotfish.dns.memo import CachedReply, Memo, lookup_reply, memo_key, stored_key
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable


def _q(name: str = "svc.example.", edns: EDNS0 | None = None, qid: int = 7) -> bytes:
    q = DNSRecord.question(name, "A")
    q.header.id = qid
    if edns is not None:
        q.add_ar(edns)
    return bytes(q.pack())


def test_a_plain_query_is_its_own_key() -> None:
    data = _q()
    assert stored_key(data) == data[2:] == memo_key(data)


def test_edns_option_contents_are_not_in_the_key() -> None:
    one = _q(edns=EDNS0(udp_len=1232, opts=[EDNSOption(10, b"A" * 8)]))
    two = _q(edns=EDNS0(udp_len=1232, opts=[EDNSOption(10, b"B" * 24)]), qid=9)
    assert stored_key(one) == stored_key(two) == memo_key(one) == memo_key(two)
    other_size = _q(edns=EDNS0(udp_len=4096))
    do_bit = _q(edns=EDNS0(udp_len=1232, flags="do"))
    assert len({stored_key(one), stored_key(other_size), stored_key(do_bit), stored_key(_q())}) == 4


@pytest.mark.parametrize("padding", [b"\0", b"x" * 9, b"junk" * 16000])
def test_trailing_bytes_are_never_stored_nor_part_of_a_stored_key(padding: bytes) -> None:
    data = _q() + padding
    assert stored_key(data) is None
    assert memo_key(data) != stored_key(_q())  # a plain query padded misses...
    assert len(memo_key(data)) <= len(_q()) + 9  # ...and its lookup key stays small


def test_non_canonical_questions_are_not_stored() -> None:
    plain = _q()
    compressed = plain[:12] + b"\xc0\x0c" + plain[-4:]  # a pointer in the question
    inner_zero = _q("a\\000b.example.")  # a label holding a zero byte
    two_questions = plain[:5] + b"\x02" + plain[6:] + plain[12:]
    for data in (compressed, inner_zero, two_questions):
        assert stored_key(data) is None


def test_a_memo_is_bounded_in_bytes_and_its_entries_cost_what_it_counts() -> None:
    memo = Memo(max_bytes=1 << 20)
    for i in range(100_000):
        memo.put(b"k%07d" % i + b"." * 40, b"r%07d" % i + b"." * 80, 88)
        assert memo.nbytes <= memo.max_bytes
    assert 0 < len(memo) < 100_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fresh = Memo(max_bytes=1 << 30)
        for i in range(20_000):
            fresh.put(b"k%07d" % i + b"." * 40, b"r%07d" % i + b"." * 80, 88)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used <= fresh.nbytes, f"{used} bytes held, {fresh.nbytes} counted"


def _upstream_reply(query: bytes, ttl: int) -> bytes:
    r = DNSRecord.parse(query).reply()
    r.header.aa = 1
    r.add_answer(DRR(r.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=ttl))
    r.add_answer(DRR(r.q.qname, QTYPE.A, rdata=A("192.0.2.2"), ttl=ttl + 100))
    return bytes(r.pack())


def test_a_kept_forwarded_reply_ages_and_expires() -> None:
    query = _q()
    kept = CachedReply(_upstream_reply(query, 60), ttl=60, now=100.0)
    memo = Memo()
    memo[stored_key(query)] = kept
    clock = [100.5]
    first = DNSRecord.parse(lookup_reply(memo, _q(qid=1234), lambda: clock[0]))
    assert first.header.id == 1234 and not first.header.aa
    assert [r.ttl for r in first.rr] == [60, 160]
    clock[0] = 117.2
    assert [r.ttl for r in DNSRecord.parse(lookup_reply(memo, query, lambda: clock[0])).rr] == [43, 143]
    clock[0] = 160.0
    assert lookup_reply(memo, query, lambda: clock[0]) is None


SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


def _config(upstream: MockUpstream) -> DnsConfig:
    return DnsConfig(
        listen=(("127.0.0.1", 0),), upstreams=(upstream.address,), search=SEARCH,
        proxy_namespace="ns1", proxy_domain="ns1.svc.cluster.local", forward_timeout=1.0,
    )


def _table(**hosts: str) -> NameTable:
    table = NameTable()
    for host, ip in hosts.items():
        entry = table.table[host.replace("_", ".")]
        entry.ips.append(ip)
        entry.registry = "External"
    return table


@pytest.mark.timeout(30)
def test_a_table_swap_carries_the_entries_it_does_not_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an NDS push, a name whose answer stayed the same is still a memo hit, and so is a
    forwarded name still absent from the table; a changed or newly added name is not."""
    carried: list[int] = []
    real_carry = memo_mod.carry

    def counting_carry(*args: object) -> int:
        n = real_carry(*args)  # type: ignore[arg-type]
        carried.append(n)
        return n

    monkeypatch.setattr("pilotfish.dns.server.carry", counting_carry)
    before = _table(same_example="10.0.0.1", changed_example="10.0.0.2")
    after = _table(same_example="10.0.0.1", changed_example="10.0.0.3", www_bing_com="10.0.0.4")
    with MockUpstream() as upstream, running_proxy(_config(upstream), [before]) as runner:
        proxy = runner.proxy
        names = ("same.example.", "changed.example.", "www.bing.com.")
        for name in names:
            assert udp_exchange(runner.udp_address, _q(name), 3.0) is not None
        # the forwarded answer is kept by the trio thread after the reply went out
        wait = 0
        while stored_key(_q("www.bing.com.")) not in proxy._state.udp_memo and wait < 3000:
            wait += 1
            udp_exchange(runner.udp_address, _q("www.bing.com."), 3.0)
        keys = {n: stored_key(_q(n)) for n in names}
        assert all(k in proxy._state.udp_memo for k in keys.values())
        proxy.set_table(after)
        memo = proxy._state.udp_memo
        assert keys["same.example."] in memo
        assert keys["changed.example."] not in memo
        assert keys["www.bing.com."] not in memo  # now a mesh name: must not be forwarded
        reply = DNSRecord.parse(udp_exchange(runner.udp_address, _q("www.bing.com."), 3.0))
        assert [str(r.rdata) for r in reply.rr] == ["10.0.0.4"]
        proxy.set_table(_table(same_example="10.0.0.1"))
        assert sum(carried[-2:]) >= 1  # the UDP memo, then the TCP one


def test_a_forwarded_name_stays_a_memo_hit_across_a_push() -> None:
    with MockUpstream() as upstream, running_proxy(_config(upstream), [name_table(fixture_table("istio_test"))]) as runner:
        proxy = runner.proxy
        query = _q("www.bing.com.")
        for _ in range(100):
            udp_exchange(runner.udp_address, query, 3.0)
            if stored_key(query) in proxy._state.udp_memo:
                break
        proxy.set_table(name_table(fixture_table("istio_test")))
        asked = upstream.query_count
        assert stored_key(query) in proxy._state.udp_memo
        assert udp_exchange(runner.udp_address, query, 3.0) is not None
        assert upstream.query_count == asked
