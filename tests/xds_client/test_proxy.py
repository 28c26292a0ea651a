"""The xDS proxy between a client playing Envoy (on the proxy's unix socket) and a fake control
plane (tests/fake_ads.py), both protocols with the same vectors: what passes unchanged, what the
agent takes for itself, how either side's end reaches the other, and its bounds."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trio
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from fake_ads import Envoyish, FakeAds, Upstream, response, start_fake, wait_for
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, generate_latest

from pilotfish.xds_client.channel import XdsChannel, XdsSettings
from pilotfish.xds_client.health import HEALTH_TYPE, Health
from pilotfish.xds_client.metrics import ProxyMetrics, XdsMetrics
from pilotfish.xds_client.nds import TYPE_URL as NDS
from pilotfish.xds_client.nds import BuiltTable, NameTableType
from pilotfish.xds_client.outbox import MAX_FORWARDED
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.proxy import LISTENER_TYPE, MAX_STREAMS, XdsProxy
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.saved import SavedCopy

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
NODE = Node(id="sidecar~10.1.1.5~app.default~default.svc.cluster.local", cluster="app.default")
PROTOCOLS = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])


def packed(message: Message) -> Any:
    out = Any()
    out.Pack(message)
    return out


def table(ip: str) -> Any:
    nt = NameTable()
    nt.table["a.ns.svc.cluster.local"].ips.append(ip)
    return packed(nt)


def build(serialized: bytes) -> list[str]:
    ips = [ip for info in NameTable.FromString(serialized).table.values() for ip in info.ips]
    for ip in ips:
        socket.inet_pton(socket.AF_INET, ip)
    return ips


def request(delta: bool, type_url: str, nonce: str = "", names: tuple[str, ...] = (),
            node: Node | None = None) -> DiscoveryRequest | DeltaDiscoveryRequest:
    """The same request in either protocol."""
    out: DiscoveryRequest | DeltaDiscoveryRequest
    if delta:
        out = DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names_subscribe=names)
    else:
        out = DiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names=names, version_info="v0")
    if node is not None:
        out.node.CopyFrom(node)
    return out


@dataclass
class Rig:
    fake: FakeAds
    proxy: XdsProxy
    cache: ResourceCache
    nds: NameTableType[list[str]]
    saved: Path
    socket: str

    def envoy(self, delta: bool) -> Envoyish:
        return Envoyish(self.socket, delta)

    def connect(self, delta: bool) -> tuple[Envoyish, Upstream]:
        """An Envoy stream that sent its first request (CDS, with the node) and the upstream
        stream that carries it."""
        envoy = self.envoy(delta)
        upstream = self.fake.next_stream()
        envoy.send(request(delta, CDS, node=NODE))
        upstream.next_request()
        return envoy, upstream


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    fake = FakeAds()
    server, address = start_fake(fake)
    nds = NameTableType(build)
    cache, saved = ResourceCache(), tmp_path / "nametable.pb"
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    channel = XdsChannel(XdsSettings(address, "istiod.istio-system.svc", None, str(token), cluster_id="Kubernetes"))
    path = str(tmp_path / "proxy" / "XDS")
    proxy = XdsProxy(channel, cache, [SavedCopy(nds, str(saved))], path)
    proxy.start()
    yield Rig(fake, proxy, cache, nds, saved, path)
    proxy.stop(0)
    channel.close()
    server.stop(0)


def test_the_socket_is_private_in_a_directory_made_for_it(rig: Rig) -> None:
    assert stat.S_IMODE(os.stat(rig.socket).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(rig.socket).st_mode)
    assert stat.S_IMODE(os.stat(os.path.dirname(rig.socket)).st_mode) == 0o700


@PROTOCOLS
def test_requests_and_responses_pass_unchanged_and_the_agent_subscribes_after_listeners(rig: Rig, delta: bool) -> None:
    envoy, upstream = rig.connect(delta)
    first = upstream.received[0]
    assert first == request(delta, CDS, node=NODE)  # Envoy's node, as Envoy sent it
    assert dict(upstream.metadata)["clusterid"] == "Kubernetes"
    assert dict(upstream.metadata)["authorization"] == "Bearer t0k3n"
    cluster = response(delta, CDS, "v1", "n1", [("c1", packed(Cluster(name="c1", connect_timeout={"seconds": 1})))])
    upstream.push(cluster)
    assert envoy.next_response() == cluster
    for sent in (request(delta, CDS, nonce="n1"), request(delta, LISTENER_TYPE, names=("a", "b"))):
        envoy.send(sent)
        assert upstream.next_request() == sent
    subscription = upstream.next_request()  # after Envoy's first listener request, the agent's own
    assert subscription.type_url == NDS and not subscription.HasField("node") and not subscription.response_nonce
    envoy.send(request(delta, LISTENER_TYPE, nonce="x"))  # a second listener request: no second subscription
    assert upstream.next_request() == request(delta, LISTENER_TYPE, nonce="x")
    envoy.close()
    wait_for(upstream.ended.is_set, "upstream end")
    assert upstream.requests.empty()


@PROTOCOLS
def test_the_name_table_serves_is_acked_upstream_and_never_reaches_envoy(rig: Rig, delta: bool) -> None:
    envoy, upstream = rig.connect(delta)
    envoy.send(request(delta, LISTENER_TYPE))
    upstream.request_of(NDS)
    upstream.push(response(delta, NDS, "t1", "n1", [("t", table("10.0.0.1"))]))
    ack = upstream.request_of(NDS)
    assert ack.response_nonce == "n1" and not ack.HasField("error_detail")
    served = rig.cache.get(rig.nds)
    assert served is not None and served.version == "t1" and isinstance(served.value, BuiltTable)
    assert served.value.built == ["10.0.0.1"]
    assert NameTable.FromString(rig.saved.read_bytes()).table["a.ns.svc.cluster.local"].ips == ["10.0.0.1"]

    upstream.push(response(delta, NDS, "t2", "n2", [("t", table("10.0.0.2\x00"))]))  # poisoned: NACKed
    nack = upstream.request_of(NDS)
    assert nack.response_nonce == "n2" and "embedded null character" in nack.error_detail.message
    assert nack.error_detail.code == 13
    served = rig.cache.get(rig.nds)
    assert served is not None and served.version == "t1"
    assert NameTable.FromString(rig.saved.read_bytes()).table["a.ns.svc.cluster.local"].ips == ["10.0.0.1"]
    state = rig.proxy.state.types[NDS]
    assert (state.accepted, state.rejected) == (1, 1)

    cluster = response(delta, CDS, "v1", "c1", [])
    upstream.push(cluster)
    assert envoy.next_response() == cluster  # the first (and only) thing Envoy got
    assert envoy.responses.empty()
    envoy.close()


@PROTOCOLS
def test_an_upstream_error_ends_envoys_stream_with_its_status(rig: Rig, delta: bool) -> None:
    envoy, upstream = rig.connect(delta)
    upstream.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams")
    assert envoy.status() == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams")
    wait_for(lambda: rig.proxy.counters.streams == 0, "the stream closed")
    assert rig.proxy.state.terminations["error"] == 1 and rig.proxy.state.failures == 0
    envoy.close()


@PROTOCOLS
def test_an_upstream_that_ends_cleanly_ends_envoys_stream_ok(rig: Rig, delta: bool) -> None:
    envoy, upstream = rig.connect(delta)
    upstream.finish()
    assert envoy.status() == (grpc.StatusCode.OK, "")
    envoy.close()


def test_no_control_plane_ends_envoys_stream_unavailable(tmp_path: Path) -> None:
    with socket.socket() as nothing:  # bound, not listening: connections to it are refused
        nothing.bind(("127.0.0.1", 0))
        channel = XdsChannel(XdsSettings(f"127.0.0.1:{nothing.getsockname()[1]}", "x", None, "/nonexistent"))
        proxy = XdsProxy(channel, ResourceCache(), [], str(tmp_path / "XDS"))
        proxy.start()
        try:
            envoy = Envoyish(str(tmp_path / "XDS"), delta=True)
            envoy.send(request(True, CDS, node=NODE))
            assert envoy.status()[0] == grpc.StatusCode.UNAVAILABLE
            assert proxy.state.failures == 1
            envoy.close()
        finally:
            proxy.stop(0)
            channel.close()


@PROTOCOLS
def test_envoy_going_away_cancels_the_upstream_stream(rig: Rig, delta: bool) -> None:
    envoy, upstream = rig.connect(delta)
    envoy.close()
    wait_for(upstream.ended.is_set, "upstream cancelled")
    wait_for(lambda: rig.proxy.counters.streams == 0, "the stream closed")
    assert rig.proxy.counters.envoy_terminations["cancelled"] == 1


def test_one_upstream_stream_per_envoy_stream_and_the_newest_wins(rig: Rig) -> None:
    for n in range(3):
        envoy, upstream = rig.connect(delta=n % 2 == 1)
        assert upstream.delta == (n % 2 == 1)
        envoy.close()
        wait_for(upstream.ended.is_set, "upstream end")
    assert len(rig.fake.streams) == 3
    old, old_upstream = rig.connect(delta=True)
    new, new_upstream = rig.connect(delta=True)
    # a newer stream took over: OK as in Istio, or CANCELLED when the proxy's cancel came first
    assert old.status()[0] in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
    wait_for(old_upstream.ended.is_set, "the old upstream cancelled")
    assert not new_upstream.ended.is_set()
    cluster = response(True, CDS, "v1", "n", [])
    new_upstream.push(cluster)
    assert new.next_response() == cluster
    assert len(rig.fake.streams) == 5
    new.close()


@pytest.mark.timeout(300)
def test_two_hundred_streams_leave_no_thread_behind(rig: Rig) -> None:
    """Every thread a stream starts ends with it: the pump, grpc's reader of the outbox; the
    gRPC servers' pools keep idle threads (the proxy's at most MAX_STREAMS + 2)."""
    def one(delta: bool) -> None:
        envoy, upstream = rig.connect(delta)
        envoy.close()
        wait_for(upstream.ended.is_set, "upstream end")
        wait_for(lambda: rig.proxy.counters.streams == 0, "the stream closed")

    def threads() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if not t.name.startswith(("fake-ads", "xds-proxy_")))

    one(False)
    before = threads()
    for n in range(200):
        one(n % 2 == 0)
    # at most the threads there were before: the first stream's reader may still have been ending
    # when `before` was taken (seen in CI), and then ends too
    wait_for(lambda: set(threads()) <= set(before), f"threads back to {before} (now {threads()})")
    assert sum(t.name.startswith("xds-proxy_") for t in threading.enumerate()) <= MAX_STREAMS + 2


def test_health_goes_up_after_listeners_and_on_every_change(rig: Rig) -> None:
    rig.proxy.report_health(Health(False, "connection refused"))  # before any stream: kept
    envoy, upstream = rig.connect(delta=False)
    rig.proxy.report_health(Health(True))  # before the listener request: kept, not sent
    envoy.send(request(False, LISTENER_TYPE))
    report = upstream.request_of(HEALTH_TYPE)
    assert report == DiscoveryRequest(type_url=HEALTH_TYPE)  # healthy: nothing else
    rig.proxy.report_health(Health(False, "HTTP 503"))
    report = upstream.request_of(HEALTH_TYPE)
    assert report.error_detail.code == 13 and report.error_detail.message == "HTTP 503"
    envoy.close()
    envoy, upstream = rig.connect(delta=True)  # a new stream: the latest again, in delta's form
    envoy.send(request(True, LISTENER_TYPE))
    report = upstream.request_of(HEALTH_TYPE)
    assert isinstance(report, DeltaDiscoveryRequest) and report.error_detail.message == "HTTP 503"
    envoy.close()


def test_types_neither_envoys_nor_workload_are_not_forwarded(rig: Rig) -> None:
    envoy, upstream = rig.connect(delta=False)
    upstream.push(response(False, "type.googleapis.com/istio.something.Else", "v1", "n1", []))
    workload = response(False, "type.googleapis.com/istio.workload.Workload", "v1", "n2", [])
    upstream.push(workload)
    assert envoy.next_response() == workload
    envoy.close()


def test_metrics(rig: Rig) -> None:
    envoy, upstream = rig.connect(delta=False)
    upstream.push(response(False, CDS, "v1", "n1", []))
    envoy.next_response()
    registry = CollectorRegistry()
    registry.register(ProxyMetrics(lambda: rig.proxy.counters))
    registry.register(XdsMetrics(lambda: rig.proxy.state))
    text = generate_latest(registry).decode()
    assert "pilotfish_xds_proxy_streams 1.0" in text
    assert "istio_agent_xds_proxy_requests_total 1.0" in text
    assert "istio_agent_xds_proxy_responses_total 1.0" in text
    assert 'istio_agent_envoy_connection_terminations_total{type="cancelled"} 0.0' in text
    assert "pilotfish_xds_connected 1.0" in text
    envoy.close()


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
@PROTOCOLS
def test_an_envoy_that_floods_without_reading_holds_the_proxy_to_a_bounded_memory(rig: Rig, delta: bool) -> None:
    """10,000 requests of 20 kB each, every one answered upstream with 20 kB, and the client reads
    nothing: gRPC's flow control and the proxy's small outbox stop the flood on the way (far fewer
    requests pass, and memory does not grow by the 200 MB sent), and once the client reads, all
    of it passes."""
    rig.fake.answer = response(delta, CDS, "v1", "n", [("c", packed(Cluster(name="c" * 20_000)))])
    names = tuple(f"cluster-{i:05d}" + "x" * 1000 for i in range(20))
    sent = [0]

    def flood() -> Iterator[Message]:
        for _ in range(10_000):
            sent[0] += 1
            yield request(delta, CDS, names=names)
        threading.Event().wait()  # then nothing, with the stream open

    before = rss()
    envoy = Envoyish(rig.socket, delta, flood())
    upstream = rig.fake.next_stream()
    peak = [0]

    def stalled() -> bool:
        """True once nothing moved for a second (the flood held back somewhere)."""
        counts = (sent[0], upstream.count)
        for _ in range(10):
            current = rig.proxy._current
            peak[0] = max(peak[0], current.outbox.waiting() if current else 0)
            threading.Event().wait(0.1)
        return counts == (sent[0], upstream.count)

    wait_for(stalled, "the flood held back", timeout=120)
    assert sent[0] < 10_000 and upstream.count < sent[0], (sent[0], upstream.count)
    assert peak[0] <= MAX_FORWARDED + 1
    assert rss() - before < 100 << 20, f"grew by {(rss() - before) >> 20} MB"
    received = 0
    for _ in envoy.call:  # now read: everything passes
        received += 1
        if received == 10_000:
            break
    assert upstream.count == 10_000
    envoy.close()


def test_as_a_component_it_serves_until_cancelled_and_ends_its_streams(tmp_path: Path) -> None:
    fake = FakeAds()
    server, address = start_fake(fake)
    channel = XdsChannel(XdsSettings(address, "x", None, "/nonexistent"))
    proxy = XdsProxy(channel, ResourceCache(), [], str(tmp_path / "XDS"))

    async def main() -> Envoyish:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve)
                envoy = await trio.to_thread.run_sync(Envoyish, str(tmp_path / "XDS"), True)
                envoy.send(request(True, CDS, node=NODE))
                await trio.to_thread.run_sync(fake.next_stream)
                nursery.cancel_scope.cancel()
        return envoy

    try:
        envoy = trio.run(main)
        assert proxy.counters.streams == 0
        assert envoy.status()[0] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        wait_for(fake.streams[0].ended.is_set, "the upstream stream cancelled")
        envoy.close()
    finally:
        channel.close()
        server.stop(0)
