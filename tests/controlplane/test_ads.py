"""The control plane's ADS: the state-of-the-world stream protocol without gRPC, then a real gRPC
client over TLS, for both variants (the delta protocol's vectors are in test_delta.py).

The mesh is a stand-in (streams.py): a table whose one host is named after the mesh version and
answers with the proxy's own IPs, so a test sees both which version it got and that it was built
for it, and the real Envoy config.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.rpc.status_pb2 import Status

import pilotfish.controlplane.ads as ads_module
from pilotfish.common.ratelog import RateLimitedLog
from pilotfish.xds_client.inbox import MAX_QUEUED_REQUESTS, pump
from pilotfish.controlplane.ads import (
    NAME_TABLE_TYPE,
    Acked,
    AdsServicer,
    Connected,
    Ignored,
    MeshHub,
    Nacked,
    Sent,
    Stale,
    StreamError,
    StreamState,
    check_bearer,
    proxy_info,
    start_server,
)
from pilotfish.controlplane.ca import cert_pem, issue_serving, key_pem, new_key, new_root, serving_names
from pilotfish.controlplane.nametable import ProxyInfo
from pilotfish.controlplane.tokenreview import ReviewFailed
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from streams import CLUSTER_TYPE, ROUTE_TYPE, LISTENER_TYPE, NODE_ID, node, snapshot

SERVER_NAME = "istiod.istio-system.svc"


def request(node: Node | None = None, version: str = "", nonce: str = "", error: str | None = None,
            type_url: str = NAME_TABLE_TYPE) -> DiscoveryRequest:
    req = DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce)
    if node is not None:
        req.node.CopyFrom(node)
    if error is not None:
        req.error_detail.CopyFrom(Status(code=13, message=error))
    return req


def table_of(response: DiscoveryResponse) -> NameTable:
    assert response.type_url == NAME_TABLE_TYPE
    assert len(response.resources) == 1
    table = NameTable()
    assert response.resources[0].Unpack(table)
    return table


# --- who the proxy is -------------------------------------------------------------------------


def test_proxy_info_from_node_id_and_metadata() -> None:
    got = proxy_info(node(INSTANCE_IPS="10.1.1.5,fd00::5", NETWORK="net1", CLUSTER_ID="Kubernetes",
                          DNS_CAPTURE="true", NAMESPACE="ns"))
    assert got == ProxyInfo(ips=("10.1.1.5", "fd00::5"), network="net1", cluster="Kubernetes",
                            dns_domain="ns.svc.cluster.local", dns_capture=True)


def test_proxy_info_falls_back_to_the_node_id_ip() -> None:
    assert proxy_info(node()).ips == ("10.1.1.5",)
    # istiod takes INSTANCE_IPS only when every entry is an IP
    assert proxy_info(node(INSTANCE_IPS="10.1.1.6,nope")).ips == ("10.1.1.5",)
    assert proxy_info(node(DNS_CAPTURE="")).dns_capture is False


@pytest.mark.parametrize(("node_id", "message"), [
    ("", "missing node information"),
    ("sidecar~10.1.1.5~pod.ns", "missing parts in the service node"),
    ("gateway~10.1.1.5~pod.ns~ns.svc.cluster.local", "invalid node type"),
    ("sidecar~not-an-ip~pod.ns~ns.svc.cluster.local", "no valid IP address"),
])
def test_proxy_info_rejects_what_istiod_rejects(node_id: str, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        proxy_info(node(node_id))


# --- the stream protocol, without gRPC --------------------------------------------------------


def subscribed(version: str = "v1") -> tuple[StreamState, DiscoveryResponse]:
    state = StreamState("s1")
    outcome = state.on_request(request(node()), snapshot(version))
    assert len(outcome.responses) == 1
    return state, outcome.responses[0]


def test_first_request_gets_the_table_for_that_proxy() -> None:
    state = StreamState("s1")
    outcome = state.on_request(request(node()), snapshot("v1"))
    (response,) = outcome.responses
    assert response.version_info == "v1"
    assert response.nonce
    assert dict(table_of(response).table) == {"v1.example.com": NameTable.NameInfo(ips=["10.1.1.5"])}
    connected, sent = outcome.events
    assert isinstance(connected, Connected) and connected.node_id == NODE_ID
    assert sent == Sent(NAME_TABLE_TYPE, "v1", response.nonce, 1)
    assert state.node_id == NODE_ID


def test_first_request_without_node_ends_the_stream() -> None:
    with pytest.raises(StreamError, match="missing node information"):
        StreamState("s1").on_request(request(), snapshot("v1"))


def test_ack_is_recorded_and_not_answered() -> None:
    state, response = subscribed()
    outcome = state.on_request(request(version="v1", nonce=response.nonce), snapshot("v1"))
    assert outcome.responses == ()
    assert outcome.events == (Acked(NAME_TABLE_TYPE, "v1", response.nonce),)
    assert state.acked_version(NAME_TABLE_TYPE) == "v1"


def test_nack_is_reported_and_not_answered() -> None:
    state, response = subscribed()
    outcome = state.on_request(request(version="", nonce=response.nonce, error="bad table"), snapshot("v1"))
    assert outcome.responses == ()
    assert outcome.events == (Nacked(NAME_TABLE_TYPE, "", response.nonce, "bad table"),)
    assert state.acked_version(NAME_TABLE_TYPE) is None


def test_request_without_nonce_gets_the_resource_again() -> None:
    state, first = subscribed()
    (again,) = state.on_request(request(), snapshot("v1")).responses
    assert again.version_info == "v1"
    assert again.nonce != first.nonce


def test_unknown_nonce_gets_the_current_resource() -> None:
    """A client that reconnected from another control plane echoes a nonce we never sent."""
    state = StreamState("s1")
    (response,) = state.on_request(request(node(), version="old", nonce="elsewhere-7"), snapshot("v2")).responses
    assert response.version_info == "v2"
    state2, _ = subscribed()
    (response,) = state2.on_request(request(nonce="other-1"), snapshot("v1")).responses
    assert response.version_info == "v1"


def test_stale_nonce_is_ignored() -> None:
    """An ACK of an older push, while a newer one is in flight: answering it would ping-pong."""
    state, first = subscribed("v1")
    (second,) = state.on_snapshot(snapshot("v2")).responses
    outcome = state.on_request(request(version="v1", nonce=first.nonce), snapshot("v2"))
    assert outcome.responses == ()
    assert outcome.events == (Stale(NAME_TABLE_TYPE, first.nonce),)
    assert state.on_request(request(version="v2", nonce=second.nonce), snapshot("v2")).events == (
        Acked(NAME_TABLE_TYPE, "v2", second.nonce),
    )


def test_types_not_served_are_ignored() -> None:
    state = StreamState("s1")
    outcome = state.on_request(request(node(), type_url=ROUTE_TYPE), snapshot("v1"))
    assert outcome.responses == ()
    assert isinstance(outcome.events[0], Connected)
    assert outcome.events[1:] == (Ignored(ROUTE_TYPE),)


def test_envoy_gets_its_clusters_and_listeners() -> None:
    state = StreamState("s1")
    (clusters,) = state.on_request(request(node(), type_url=CLUSTER_TYPE), snapshot("v1")).responses
    assert [names_of(clusters)] == [["PassthroughCluster", "InboundPassthroughCluster", "BlackHoleCluster"]]
    outcome = state.on_request(request(type_url=LISTENER_TYPE), snapshot("v1"))
    (listeners,) = outcome.responses
    assert (listeners.type_url, listeners.version_info) == (LISTENER_TYPE, "v1")
    assert names_of(listeners) == ["virtualOutbound", "virtualInbound"]
    assert outcome.events == (Sent(LISTENER_TYPE, "v1", listeners.nonce, 2),)
    ack = state.on_request(request(version="v1", nonce=listeners.nonce, type_url=LISTENER_TYPE), snapshot("v1"))
    assert ack.events == (Acked(LISTENER_TYPE, "v1", listeners.nonce),)


def test_a_new_mesh_version_pushes_only_the_types_that_changed_for_the_proxy() -> None:
    """The stand-in's table changes with every version, its Envoy config does not; a version
    whose table is the same as the last one's is not pushed either."""
    state = StreamState("s1")
    for type_url in (NAME_TABLE_TYPE, CLUSTER_TYPE, LISTENER_TYPE):
        state.on_request(request(node(), type_url=type_url), snapshot("v1"))
    (pushed,) = state.on_snapshot(snapshot("v2")).responses
    assert pushed.type_url == NAME_TABLE_TYPE and pushed.version_info == "v2"
    assert state.on_snapshot(snapshot("v3", host="v2")).responses == ()


def names_of(response: DiscoveryResponse) -> list[str]:
    """The names of the clusters or listeners in a response."""
    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.listener.v3.listener_pb2 import Listener

    kind = Cluster if response.type_url == CLUSTER_TYPE else Listener
    names = []
    for packed in response.resources:
        message = kind()
        assert packed.Unpack(message)
        names.append(message.name)
    return names


def test_new_version_is_pushed_only_to_a_subscribed_stream() -> None:
    assert StreamState("s1").on_snapshot(snapshot("v2")).responses == ()
    state, first = subscribed("v1")
    assert state.on_snapshot(snapshot("v1")).responses == ()
    (pushed,) = state.on_snapshot(snapshot("v2")).responses
    assert pushed.version_info == "v2"
    assert pushed.nonce != first.nonce
    assert list(table_of(pushed).table) == ["v2.example.com"]


def test_a_nack_keeps_the_stream_and_the_next_version_is_pushed() -> None:
    state, first = subscribed("v1")
    state.on_request(request(nonce=first.nonce, error="no"), snapshot("v1"))
    (pushed,) = state.on_snapshot(snapshot("v2")).responses
    assert pushed.version_info == "v2"


@pytest.mark.parametrize(("header", "problem"), [
    (None, "missing bearer token"),
    ("", "missing bearer token"),
    ("Basic abc", "missing bearer token"),
    ("Bearer ", "missing bearer token"),
    ("Bearer wrong", "bearer token rejected"),
    ("Bearer secret", None),
    ("bearer secret", None),
])
def test_check_bearer(header: str | None, problem: str | None) -> None:
    assert check_bearer(header, "secret") == problem


def test_an_empty_expected_token_rejects_everything() -> None:
    assert check_bearer("Bearer x", "") == "bearer token rejected"


# --- over gRPC and TLS ------------------------------------------------------------------------


class Collect(logging.Handler):
    """Records of `pilotfish.controlplane`, whatever `propagate` an earlier test left on `pilotfish`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


class AdsClient:
    """One StreamAggregatedResources call over TLS (DeltaAggregatedResources with `delta`), as an
    agent dials istiod; responses are read on a thread so a test can wait for one, or check that
    none comes."""

    def __init__(self, address: str, root_pem: bytes, metadata: tuple[tuple[str, str], ...] = (),
                 delta: bool = False) -> None:
        self.channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=root_pem),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        self._requests: queue.Queue[DiscoveryRequest | DeltaDiscoveryRequest | None] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.call = method(self._outgoing(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _outgoing(self) -> Iterator[DiscoveryRequest | DeltaDiscoveryRequest]:
        while (req := self._requests.get()) is not None:
            yield req

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self._responses.put(None)

    def send(self, req: DiscoveryRequest | DeltaDiscoveryRequest) -> None:
        self._requests.put(req)

    def receive(self, timeout: float = 5.0) -> Any:
        response = self._responses.get(timeout=timeout)
        assert response is not None, f"stream ended: {self.error}"
        return response

    def expect_silence(self, seconds: float = 0.3) -> None:
        try:
            response = self._responses.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected response: {response}")

    def status(self, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
        """How the stream ended (it must end with an error)."""
        self._reader.join(timeout)
        assert self.error is not None, "stream did not end with an error"
        return self.error.code(), self.error.details()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()


@dataclass
class Served:
    hub: MeshHub
    servicer: AdsServicer
    address: str
    root_pem: bytes
    log: Collect

    def client(self, metadata: tuple[tuple[str, str], ...] = (), root_pem: bytes | None = None,
               delta: bool = False) -> AdsClient:
        return AdsClient(self.address, root_pem or self.root_pem, metadata, delta)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tls() -> tuple[bytes, grpc.ServerCredentials]:
    now = datetime.now(timezone.utc)
    ca = new_root(new_key(), now)
    key = new_key()
    cert = issue_serving(ca, key, serving_names(), now)
    return cert_pem(ca.cert), grpc.ssl_server_credentials([(key_pem(key), cert_pem(cert))])


@pytest.fixture
def served(tls: tuple[bytes, grpc.ServerCredentials]) -> Iterator[Served]:
    root_pem, credentials = tls
    hub = MeshHub(snapshot("v1"))
    servicer = AdsServicer(hub)
    server, port = start_server(servicer, "127.0.0.1:0", credentials)
    collect = Collect()
    logger = logging.getLogger("pilotfish.controlplane")
    logger.addHandler(collect)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield Served(hub, servicer, f"127.0.0.1:{port}", root_pem, collect)
    finally:
        server.stop(None).wait()
        logger.removeHandler(collect)
        logger.setLevel(old_level)


def test_initial_request_gets_the_table(served: Served) -> None:
    client = served.client()
    try:
        client.send(request(node(INSTANCE_IPS="10.1.1.5,fd00::5")))
        response = client.receive()
        assert response.version_info == "v1"
        assert dict(table_of(response).table) == {
            "v1.example.com": NameTable.NameInfo(ips=["10.1.1.5", "fd00::5"])
        }
    finally:
        client.close()
    wait_for(lambda: any("closed" in m for m in served.log.messages()))
    assert any(f"node {NODE_ID}" in m and "127.0.0.1" in m for m in served.log.messages(logging.INFO))


def test_ack_gets_nothing(served: Served) -> None:
    client = served.client()
    try:
        client.send(request(node()))
        response = client.receive()
        client.send(request(version=response.version_info, nonce=response.nonce))
        client.expect_silence()
        assert served.servicer.counters.acks == 1
        assert any("accepted NDS version v1" in m for m in served.log.messages(logging.INFO))
    finally:
        client.close()


def test_nack_is_logged_and_counted_and_the_stream_stays(served: Served) -> None:
    client = served.client()
    try:
        client.send(request(node()))
        response = client.receive()
        client.send(request(nonce=response.nonce, error="cannot build the table"))
        client.expect_silence()
        assert served.servicer.counters.nacks == 1
        warnings = served.log.messages(logging.WARNING)
        assert any("rejected NDS" in m and "cannot build the table" in m for m in warnings)
        served.hub.publish(snapshot("v2"))
        assert client.receive().version_info == "v2"
    finally:
        client.close()


def test_a_stream_that_does_not_read_its_inbox_holds_one_change_not_every_snapshot() -> None:
    hub = MeshHub(snapshot("v1"))
    stuck: queue.SimpleQueue[object] = queue.SimpleQueue()  # its thread stuck sending to a client
    hub.subscribe(stuck)
    for k in range(2, 1002):
        assert hub.publish(snapshot(f"v{k}")) == 1
    assert stuck.qsize() == 1
    stuck.get()
    assert hub.take(stuck).version == "v1001"  # the stream serves the latest
    hub.publish(snapshot("v1002"))
    assert stuck.qsize() == 1  # told again once it took the last one


def test_mesh_change_is_pushed_to_every_subscribed_stream(served: Served) -> None:
    clients = [served.client() for _ in range(2)]
    idle = served.client()
    try:
        for i, client in enumerate(clients):
            client.send(request(node(f"sidecar~10.1.1.{i + 1}~p{i}.ns~ns.svc.cluster.local")))
            first = client.receive()
            client.send(request(version=first.version_info, nonce=first.nonce))
        idle.send(request(node(), type_url=ROUTE_TYPE))
        wait_for(lambda: served.servicer.counters.acks == 2)
        assert served.hub.publish(snapshot("v2")) == 3
        for i, client in enumerate(clients):
            pushed = client.receive()
            assert pushed.version_info == "v2"
            assert dict(table_of(pushed).table) == {"v2.example.com": NameTable.NameInfo(ips=[f"10.1.1.{i + 1}"])}
        idle.expect_silence()
    finally:
        for client in (*clients, idle):
            client.close()


def test_bad_node_ends_the_stream_with_invalid_argument(served: Served) -> None:
    client = served.client()
    try:
        client.send(request(node("sidecar~10.1.1.5")))
        code, details = client.status()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing parts in the service node" in details
    finally:
        client.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
@pytest.mark.parametrize(("metadata", "details"), [
    ((), "missing bearer token"),
    ((("authorization", "Bearer wrong"),), "bearer token rejected"),
])
def test_wrong_or_missing_token_is_unauthenticated(served: Served, tmp_path: Path, delta: bool,
                                                   metadata: tuple[tuple[str, str], ...], details: str) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    served.servicer.token_file = str(token)
    client = served.client(metadata, delta=delta)
    try:
        code, got = client.status()
        assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, details)
        assert any(details in m for m in served.log.messages(logging.WARNING))
    finally:
        client.close()


def test_a_flood_of_refused_streams_is_one_log_line(served: Served, tmp_path: Path) -> None:
    """Whoever reaches the port can be refused: 20 refusals (and 20 reads of an empty token file)
    must not be 40 log lines."""
    token = tmp_path / "token"
    token.write_text("\n")
    served.servicer.token_file = str(token)
    for _ in range(20):
        client = served.client((("authorization", "Bearer wrong"),))
        try:
            assert client.status()[0] == grpc.StatusCode.UNAUTHENTICATED
        finally:
            client.close()
    assert sum("refused stream" in m for m in served.log.messages(logging.WARNING)) == 1
    assert sum("is empty; refusing streams" in m for m in served.log.messages(logging.ERROR)) == 1


def test_token_file_is_read_for_each_new_stream(served: Served, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    served.servicer.token_file = str(token)
    client = served.client((("authorization", "Bearer first"), ("clusterid", "Kubernetes")))
    try:
        client.send(request(node()))
        assert client.receive().version_info == "v1"
    finally:
        client.close()
    token.write_text("second")
    client = served.client((("authorization", "Bearer first"),))
    try:
        assert client.status()[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        client.close()


def test_empty_token_file_refuses_every_stream(served: Served, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("\n")
    served.servicer.token_file = str(token)
    client = served.client((("authorization", "Bearer "),))
    try:
        assert client.status() == (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
    finally:
        client.close()
    assert any("is empty; refusing streams" in m for m in served.log.messages(logging.ERROR))


def test_client_trusting_another_root_fails_the_handshake(served: Served) -> None:
    other_root = cert_pem(new_root(new_key(), datetime.now(timezone.utc)).cert)
    client = served.client(root_pem=other_root)
    try:
        client.send(request(node()))
        assert client.status()[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
    assert served.servicer.counters.streams == 0


def test_delta_stream_serves_the_table_and_envoy_and_pushes_only_what_changed(served: Served) -> None:
    client = served.client(delta=True)
    try:
        client.send(DeltaDiscoveryRequest(node=node(), type_url=NAME_TABLE_TYPE))
        first = client.receive()
        assert (first.type_url, first.system_version_info) == (NAME_TABLE_TYPE, "v1")
        table = NameTable()
        assert first.resources[0].resource.Unpack(table)
        assert list(table.table) == ["v1.example.com"]
        client.send(DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE, response_nonce=first.nonce))
        client.send(DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, resource_names_subscribe=["*"]))
        clusters = client.receive()
        assert [r.name for r in clusters.resources] == ["PassthroughCluster", "InboundPassthroughCluster",
                                                         "BlackHoleCluster"]
        client.send(DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=clusters.nonce))
        wait_for(lambda: served.servicer.counters.acks == 2)
        assert any("delta stream from" in m and NODE_ID in m for m in served.log.messages(logging.INFO))
        served.hub.publish(snapshot("v2"))
        pushed = client.receive()
        assert (pushed.type_url, pushed.system_version_info) == (NAME_TABLE_TYPE, "v2")
        client.expect_silence()  # the clusters did not change
    finally:
        client.close()


def test_a_flood_of_nacks_is_one_log_line(served: Served) -> None:
    client = served.client(delta=True)
    try:
        client.send(DeltaDiscoveryRequest(node=node(), type_url=NAME_TABLE_TYPE))
        nonce = client.receive().nonce
        for _ in range(20):
            client.send(DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE, response_nonce=nonce,
                                              error_detail=Status(code=3, message="no")))
        wait_for(lambda: served.servicer.counters.nacks == 20)
        assert sum("rejected NDS" in m for m in served.log.messages(logging.WARNING)) == 1
    finally:
        client.close()


def test_a_stream_whose_requests_pile_up_unread_is_cut_off() -> None:
    """A client that sends while it does not read our pushes (the stream's thread stuck sending)
    had every request queued: 1 MB requests grew the server by 12 GB in 30 s. The pump stops
    reading at the bound (gRPC's flow control then holds the client back) and ends the stream."""
    pulled = 0
    bound = MAX_QUEUED_REQUESTS

    def requests() -> Iterator[DiscoveryRequest]:
        nonlocal pulled
        for _ in range(10 * bound):
            pulled += 1
            yield request(node())

    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    pump(requests(), inbox)
    assert pulled == bound + 1
    assert inbox.qsize() == bound + 1  # and the end of the stream


def test_one_connection_cannot_take_every_stream_slot(
    tls: tuple[bytes, grpc.ServerCredentials], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 idle streams on one connection used every RPC slot: the next agent got
    RESOURCE_EXHAUSTED. Streams per connection are bounded (HTTP/2 MAX_CONCURRENT_STREAMS)."""
    monkeypatch.setattr(ads_module, "MAX_STREAMS", 20)
    root_pem, credentials = tls
    servicer = AdsServicer(MeshHub(snapshot("v1")))
    server, port = start_server(servicer, "127.0.0.1:0", credentials)
    address = f"127.0.0.1:{port}"
    release = threading.Event()

    def silent() -> Iterator[DiscoveryRequest]:
        release.wait(30)
        return
        yield  # a generator that sends nothing until released

    hog = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_pem),
                              options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(hog)
    calls = [stub.StreamAggregatedResources(silent()) for _ in range(30)]
    honest = AdsClient(address, root_pem)
    try:
        wait_for(lambda: servicer.counters.streams >= getattr(ads_module, "MAX_STREAMS_PER_CONNECTION", 8))
        honest.send(request(node()))
        assert honest.receive(timeout=10).version_info == "v1"
    finally:
        release.set()
        honest.close()
        for call in calls:
            call.cancel()
        hog.close()
        server.stop(None)


def test_the_expected_token_is_read_without_blocking_on_a_fifo(tmp_path: Path) -> None:
    """The token file is read again for every stream; opened plainly, a FIFO put in its place
    blocked the stream's thread for good. It is read as common/tokens.py reads every token."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    assert ads_module.read_token(str(fifo), RateLimitedLog(ads_module.log)) == ""
    plain = tmp_path / "plain"
    plain.write_text("  s3cret\n")
    assert ads_module.read_token(str(plain), RateLimitedLog(ads_module.log)) == "s3cret"


def test_a_workloads_token_from_the_identities_opens_a_stream(served: Served, tmp_path: Path) -> None:
    """Each pod's agent sends its own token (istiod accepts any workload's); a token neither in
    the token file nor among the identities is refused."""
    token = tmp_path / "token"
    token.write_text("operator\n")
    served.servicer.token_file = str(token)
    served.servicer.identities = lambda: {"pod-a-token": "spiffe://cluster.local/ns/default/sa/a"}
    client = served.client((("authorization", "Bearer pod-a-token"),))
    try:
        client.send(request(node()))
        assert client.receive().version_info == "v1"
    finally:
        client.close()
    client = served.client((("authorization", "Bearer pod-b-token"),))
    try:
        assert client.status() == (grpc.StatusCode.UNAUTHENTICATED, "bearer token rejected")
    finally:
        client.close()


def test_with_token_review_a_stream_needs_a_token_the_review_vouches_for(served: Served) -> None:
    """`--token-review` guards the streams too, as istiod authenticates xDS with the same
    token: a reviewed token is served, another is refused with the review's reason, and a
    stream without a token never reaches the API server."""
    asked: list[str] = []

    def review(token: str) -> str:
        asked.append(token)
        if token != "pod-token":
            raise ReviewFailed("token not authenticated")
        return "spiffe://cluster.local/ns/shop/sa/client"

    served.servicer.review = review
    client = served.client((("authorization", "Bearer pod-token"),))
    try:
        client.send(request(node()))
        assert client.receive().version_info == "v1"
    finally:
        client.close()
    for metadata, details in (((("authorization", "Bearer other"),), "token review: token not authenticated"),
                              ((), "missing bearer token")):
        client = served.client(metadata)
        try:
            assert client.status() == (grpc.StatusCode.UNAUTHENTICATED, details)
        finally:
            client.close()
    assert asked == ["pod-token", "other"]
