"""The running proxy, in-process, for behaviour the Istio vectors do not cover: the upstream
cache and serve-stale, UPDATE forwarding, EDNS versions, and table swaps while serving. What
depends on time passing (serve-stale) runs on the proxy's core with a clock the test moves
(tests/dns/engine_harness.py)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dnslib import OPCODE, QTYPE, DNSRecord, EDNS0
from engine_harness import Engine, Upstream
from mock_upstream import MockUpstream
from proxy_harness import running_proxy, tcp_exchange, udp_exchange
from vectors import fixture_table, name_table

from pilotfish.dns.config import DnsConfig
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
MOCK = ("127.0.0.1", 53)  # the in-process upstream's name


def _config(upstream: tuple[str, int], **kw: object) -> DnsConfig:
    base = dict(
        listen=(("127.0.0.1", 0),), upstreams=(upstream,), search=SEARCH,
        proxy_namespace="ns1", proxy_domain="ns1.svc.cluster.local", forward_timeout=0.3,
    )
    base.update(kw)
    return DnsConfig(**base)  # type: ignore[arg-type]


def _ask(addr: tuple[str, int], name: str, qtype: str = "A", edns: EDNS0 | None = None, timeout: float = 3.0) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(edns)
    raw = udp_exchange(addr, q.pack(), timeout)
    assert raw is not None, f"no reply for {name}"
    return DNSRecord.parse(raw)


def test_repeated_forwarded_query_is_served_from_the_cache() -> None:
    with MockUpstream() as upstream, running_proxy(_config(upstream.address), [name_table(fixture_table("istio_test"))]) as proxy:
        first = _ask(proxy.udp_address, "www.bing.com")
        second = _ask(proxy.udp_address, "WWW.BING.COM")
        assert [str(r.rdata) for r in first.rr] == [str(r.rdata) for r in second.rr] == ["1.1.1.1"]
        assert str(second.q.qname) == "WWW.BING.COM."
        assert upstream.query_count == 1
        assert (proxy.proxy.cache.hits, proxy.proxy.cache.misses) == (1, 1)


def _core(**kw: object) -> Engine:
    """The proxy's core in-process with the mock upstream (tests/dns/engine_harness.py): its
    clock moves when the test moves it, so a TTL passes without waiting for it."""
    config = _config(MOCK, **kw)
    return Engine(config, name_table(fixture_table("istio_test")), Upstream("normal"))


def _core_ask(core: Engine, name: str, edns: EDNS0 | None = None) -> DNSRecord:
    q = DNSRecord.question(name)
    if edns is not None:
        q.add_ar(edns)
    raw = core.ask(q.pack(), "udp").reply
    assert raw is not None, f"no reply for {name}"
    return DNSRecord.parse(raw)


def test_stale_answer_when_every_upstream_fails() -> None:
    """RFC 8767: the entry expired (TTL capped at 0.2 s) and the upstream went silent."""
    core = _core(cache_max_ttl=0.2)
    assert _core_ask(core, "www.bing.com").rr[0].ttl == 30
    core.clock.now += 0.3
    core.upstream.behaviour = "silent"
    stale = _core_ask(core, "www.bing.com", edns=EDNS0(udp_len=1232))
    assert stale.header.rcode == 0 and [str(r.rdata) for r in stale.rr] == ["1.1.1.1"]
    assert stale.rr[0].ttl == 30
    assert stale.ar[0].rdata[0].code == 15 and stale.ar[0].rdata[0].data == b"\x00\x03"  # EDE 3
    assert len(core.upstream.queries) == 2 and core.cache is not None and core.cache.stale_hits == 1
    never_cached = _core_ask(core, "sub.www.bing.com")
    assert never_cached.header.rcode == 2  # nothing stale to fall back on: SERVFAIL


def test_stale_window_zero_turns_serve_stale_off() -> None:
    core = _core(cache_max_ttl=0.2, cache_stale=0)
    _core_ask(core, "www.bing.com")
    core.clock.now += 0.3
    core.upstream.behaviour = "silent"
    assert _core_ask(core, "www.bing.com").header.rcode == 2


def test_cache_size_zero_turns_the_cache_off() -> None:
    with MockUpstream() as upstream, running_proxy(_config(upstream.address, cache_size=0), [name_table(fixture_table("istio_test"))]) as proxy:
        for _ in range(3):
            _ask(proxy.udp_address, "www.bing.com")
        assert upstream.query_count == 3 and proxy.proxy.cache is None


def test_update_is_forwarded_not_refused() -> None:
    """istio#55962: Istio answers UPDATE with NOTIMP; pilotfish passes it to the nameserver."""
    with MockUpstream() as upstream, running_proxy(_config(upstream.address), [name_table(fixture_table("istio_test"))]) as proxy:
        update = DNSRecord.question("ns1.svc.cluster.local", "SOA")
        update.header.opcode = OPCODE.UPDATE
        update.header.id = 777
        raw = udp_exchange(proxy.udp_address, update.pack(), 3.0)
        assert [q.opcode for q in upstream.queries] == [OPCODE.UPDATE]
        assert raw is not None
        reply = DNSRecord.parse(raw)
        assert reply.header.id == 777 and reply.header.opcode == OPCODE.UPDATE
        assert reply.header.rcode == 4  # the mock nameserver's own NOTIMP, relayed


def test_unknown_edns_version_gets_badvers() -> None:
    with MockUpstream() as upstream, running_proxy(_config(upstream.address), [name_table(fixture_table("istio_test"))]) as proxy:
        reply = _ask(proxy.udp_address, "productpage", edns=EDNS0(version=1, udp_len=1232))
        opt = reply.ar[0]
        assert reply.header.rcode == 0 and (opt.ttl >> 24) == 1  # extended rcode 16 = BADVERS
        assert reply.rr == [] and upstream.query_count == 0


def test_tcp_queries_on_one_connection_may_be_pipelined() -> None:
    """RFC 7766: a slow forwarded query does not hold up local answers behind it."""
    with MockUpstream("silent") as upstream, running_proxy(
        _config(upstream.address, forward_timeout=0.5), [name_table(fixture_table("istio_test"))]
    ) as proxy:
        slow, fast = DNSRecord.question("www.bing.com"), DNSRecord.question("productpage")
        slow.header.id, fast.header.id = 1, 2
        with socket.create_connection(proxy.tcp_address, timeout=5) as sock:
            for q in (slow, fast):
                wire = q.pack()
                sock.sendall(len(wire).to_bytes(2, "big") + wire)
            ids = []
            for _ in range(2):
                size = int.from_bytes(sock.recv(2, socket.MSG_WAITALL), "big")
                ids.append(DNSRecord.parse(sock.recv(size, socket.MSG_WAITALL)).header.id)
        assert ids == [2, 1]  # the local answer overtook the forwarded one


def _big_table(n: int, ip_prefix: str) -> NameTable:
    table = NameTable()
    for i in range(n):
        entry = table.table[f"svc-{i}.ns-{i % 100}.svc.cluster.local"]
        entry.ips.append(f"{ip_prefix}.{i // 256 % 256}.{i % 256}")
        entry.registry, entry.shortname, entry.namespace = "Kubernetes", f"svc-{i}", f"ns-{i % 100}"
    return table


def test_serving_goes_on_while_a_large_table_builds() -> None:
    """The build runs aside and the swap is one assignment: every query sent during a
    30,000-service build is answered, by the old table until the swap, then by the new one."""
    with MockUpstream() as upstream, running_proxy(_config(upstream.address), [_big_table(10, "10.1")]) as proxy:
        new = _big_table(30_000, "10.2")
        done = threading.Event()
        builder = threading.Thread(target=lambda: (proxy.proxy.set_table(new), done.set()))
        answers: list[str] = []
        started = time.monotonic()
        builder.start()
        while not done.is_set() and time.monotonic() - started < 120:
            reply = _ask(proxy.udp_address, "svc-3.ns-3.svc.cluster.local", timeout=2.0)
            answers.append(str(reply.rr[0].rdata))
        builder.join()
        answers += [str(_ask(proxy.udp_address, "svc-3.ns-3.svc.cluster.local").rr[0].rdata) for _ in range(3)]
        print(f"{len(answers)} queries answered during a {time.monotonic() - started:.2f} s build")
        assert answers[0] == "10.1.0.3" and answers[-1] == "10.2.0.3"
        assert set(answers) == {"10.1.0.3", "10.2.0.3"}
        switched = answers.index("10.2.0.3")
        assert all(a == "10.2.0.3" for a in answers[switched:])  # never back to the old table
        assert str(_ask(proxy.udp_address, "svc-29999.ns-99.svc.cluster.local").rr[0].rdata) == "10.2.117.47"


def test_before_the_first_table_then_after() -> None:
    with MockUpstream() as upstream, running_proxy(_config(upstream.address)) as proxy:
        assert _ask(proxy.udp_address, "productpage").header.rcode == 2
        assert _ask(proxy.udp_address, "www.bing.com").header.rcode == 2 and upstream.query_count == 0
        proxy.proxy.set_table(name_table(fixture_table("istio_test")))
        assert str(_ask(proxy.udp_address, "productpage").rr[0].rdata) == "9.9.9.9"
        reply = tcp_exchange(proxy.tcp_address, DNSRecord.question("www.bing.com").pack(), 3.0)
        assert reply is not None and str(DNSRecord.parse(reply).rr[0].rdata) == "1.1.1.1"


def test_forward_before_table_when_configured() -> None:
    """Istio's respondBeforeSync (root on :53): forward everything until a table arrives."""
    with MockUpstream() as upstream, running_proxy(_config(upstream.address, forward_before_table=True)) as proxy:
        assert str(_ask(proxy.udp_address, "www.bing.com").rr[0].rdata) == "1.1.1.1"
        assert upstream.query_count == 1
        assert QTYPE.A == _ask(proxy.udp_address, "productpage").q.qtype


def test_serves_on_ipv6_loopback_too() -> None:
    """Istio listens on [::1]:15053 as well when resolv.conf has an IPv6 nameserver."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with MockUpstream() as upstream, running_proxy(
        _config(upstream.address, listen=(("127.0.0.1", 0), ("::1", 0))), [name_table(fixture_table("istio_test"))]
    ) as proxy:
        v6_udp, v6_tcp = proxy.proxy.udp_addresses[1], proxy.proxy.tcp_addresses[1]
        assert v6_udp[0] == "::1" and v6_udp[1] == v6_tcp[1]
        assert str(_ask(v6_udp, "productpage").rr[0].rdata) == "9.9.9.9"
        reply = tcp_exchange(v6_tcp, DNSRecord.question("dual.localhost", "AAAA").pack(), 3.0)
        assert reply is not None and str(DNSRecord.parse(reply).rr[0].rdata) == "2001:db8::ff00:42:8329"
        assert str(_ask(v6_udp, "www.bing.com").rr[0].rdata) == "1.1.1.1"  # forwarded from a v6 client
