"""UDP clients' forwarding on threads (dns/udpforward.py), against real sockets on loopback:
serial failover past a silent upstream, parallel mode taking the first reply, kept sockets, and
the cold path's answers being kept in the memo for the next identical query."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib import DNSRecord
from mock_upstream import MockUpstream
from proxy_harness import running_proxy, udp_exchange

from pilotfish.dns.config import DnsConfig
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable


@contextmanager
def silent_upstream() -> Iterator[tuple[str, int]]:
    """A UDP socket that reads nothing and never answers (held open: no ICMP refusal)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()
    finally:
        sock.close()


@contextmanager
def port_recording_upstream() -> Iterator[tuple[tuple[str, int], list[int]]]:
    """Answers every query with NXDOMAIN, recording the source port of each."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    ports: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            ports.append(addr[1])
            reply = DNSRecord.parse(data).reply()
            reply.header.rcode = 3
            sock.sendto(reply.pack(), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname(), ports
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def _config(*upstreams: tuple[str, int], **kw: object) -> DnsConfig:
    base: dict[str, object] = dict(listen=(("127.0.0.1", 0),), upstreams=upstreams, forward_timeout=0.3)
    base.update(kw)
    return DnsConfig(**base)  # type: ignore[arg-type]


def _ask(addr: tuple[str, int], name: str, timeout: float = 5.0) -> DNSRecord:
    raw = udp_exchange(addr, DNSRecord.question(name, "A").pack(), timeout)
    assert raw is not None, f"no reply for {name} within {timeout} s"
    return DNSRecord.parse(raw)


def test_serial_mode_moves_past_a_silent_upstream() -> None:
    with silent_upstream() as silent, MockUpstream() as good, running_proxy(
        _config(silent, good.address, forward_timeout=0.1), [NameTable()]
    ) as runner:
        for i in range(6):  # the order is random per query: some start with the silent one
            reply = _ask(runner.udp_address, f"a{i}.www.bing.com")
            assert [str(r.rdata) for r in reply.rr] == ["1.1.1.1"]


def test_parallel_mode_takes_the_first_reply_without_waiting_for_the_silent_one() -> None:
    with silent_upstream() as silent, MockUpstream() as good, running_proxy(
        _config(silent, good.address, forward_parallel=True, forward_timeout=30.0), [NameTable()]
    ) as runner:
        for i in range(5):  # answered well before the 30 s upstream timeout
            reply = _ask(runner.udp_address, f"p{i}.www.bing.com", timeout=5.0)
            assert [str(r.rdata) for r in reply.rr] == ["1.1.1.1"]


def test_a_silent_upstream_gets_servfail_after_the_timeout_and_is_counted() -> None:
    with silent_upstream() as silent, running_proxy(_config(silent), [NameTable()]) as runner:
        assert _ask(runner.udp_address, "gone.example").header.rcode == 2
        registry = runner.proxy.registry
        assert registry.get_sample_value("istio_agent_dns_upstream_failures_total") == 1
        assert registry.get_sample_value("istio_agent_dns_upstream_requests_total") == 1


def test_sequential_forwards_reuse_one_kept_socket() -> None:
    with port_recording_upstream() as (upstream, ports), running_proxy(_config(upstream), [NameTable()]) as runner:
        for i in range(50):
            assert _ask(runner.udp_address, f"n{i}.example").header.rcode == 3
        # a socket goes back to the pool just after the reply went out, so the next query may
        # find it still busy and take another: a few ports, not one per query
        assert len(ports) == 50 and len(set(ports)) <= 5, sorted(set(ports))


def test_a_repeated_forwarded_query_is_answered_from_the_memo() -> None:
    with MockUpstream() as good, running_proxy(_config(good.address), [NameTable()]) as runner:
        query = DNSRecord.question("www.bing.com", "A").pack()
        first = udp_exchange(runner.udp_address, query, 5.0)
        assert first is not None
        registry = runner.proxy.registry
        # the reply is kept in the memo once it has been sent; until then a repeat is answered
        # from the upstream cache: ask until the memo holds it
        for _ in range(1000):
            if registry.get_sample_value("pilotfish_dns_memo_entries"):
                break
            assert udp_exchange(runner.udp_address, query, 5.0) is not None
        assert registry.get_sample_value("pilotfish_dns_memo_entries") == 1
        upstream_cache_hits = runner.proxy.cache.hits
        hits = registry.get_sample_value("pilotfish_dns_cache_hits_total")
        assert udp_exchange(runner.udp_address, query, 5.0) is not None
        assert registry.get_sample_value("pilotfish_dns_cache_hits_total") == hits + 1
        assert runner.proxy.cache.hits == upstream_cache_hits  # the memo answered, not the cache
        assert good.query_count == 1
