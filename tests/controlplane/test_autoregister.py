"""Auto-registration (Istio's WorkloadGroup -> WorkloadEntry): the pure registry (register, labels,
health, grace, reconnect, bounds, bad metadata), the mesh's services selecting the entries (EDS,
name tables), the stream's health event, and the ADS server registering a proxy and pushing its
address to another one (docs/controlplane.md "Auto-registration")."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.protobuf.struct_pb2 import Struct
from google.rpc.status_pb2 import Status

from pilotfish.controlplane.ads import AdsServicer, StreamState, start_server
from pilotfish.controlplane.autoregister import (
    Disconnected,
    HealthChanged,
    Reconnected,
    Refused,
    Registered,
    Registration,
    RegistrationError,
    Registry,
    Removed,
    entry_name,
    registration,
)
from pilotfish.controlplane.command import snapshot_of
from pilotfish.controlplane.mesh import mesh_version, parse_mesh
from pilotfish.controlplane.model import ServedModel
from pilotfish.controlplane.nametable import Health, ProxyInfo
from pilotfish.controlplane.served import ENDPOINT_TYPE, NAME_TABLE_TYPE
from pilotfish.controlplane.stream import HealthReported, proxy_info
from pilotfish.xds_client.health import HEALTH_TYPE
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from test_ads import AdsClient, tls, wait_for  # noqa: F401 - the fixture, the client over TLS

MESH = """\
services:
  - name: vm-headless
    namespace: vms
    clusterIP: None
    ports: [{port: 9080, name: http}]
    selector: {app: vm}
  - name: vm
    namespace: vms
    clusterIP: 10.96.0.50
    ports: [{port: 80, name: http, targetPort: 9080}, {port: 7070, name: tcp, targetPort: 9081}]
    selector: {app: vm}
  - name: other
    namespace: elsewhere
    clusterIP: None
    ports: [9080]
    selector: {app: vm}
workloadGroups:
  - name: vm
    namespace: vms
    labels: {app: vm, tier: backend}
    serviceAccount: vm-sa
    ports: {http: 8080}
    probe: {periodSeconds: 1, httpGet: {path: /ready, port: 8080}}
  - name: plain
    namespace: vms
    labels: {app: vm}
"""
GROUPS = parse_mesh(MESH).workload_groups


def reg(address: str = "10.0.0.7", group: str = "vm", network: str = "", **labels: str) -> Registration:
    return Registration(group, "vms", address, network, labels)


# --- the registry -----------------------------------------------------------------------------


def test_a_proxy_becomes_an_entry_named_as_istiod_names_it_with_the_groups_labels_under_its_own() -> None:
    registry = Registry()
    events = registry.connect("c1", reg(tier="frontend", version="v2"), GROUPS, now=0.0)
    assert events == [Registered("vms", "vm-10.0.0.7", "10.0.0.7", True)]
    [entry] = registry.entries(GROUPS)
    assert (entry.name, entry.namespace, entry.address, entry.service_account) == ("vm-10.0.0.7", "vms", "10.0.0.7",
                                                                                   "vm-sa")
    assert entry.labels == {"app": "vm", "tier": "frontend", "version": "v2"}
    assert entry.ports == {"http": 8080}
    assert entry_name("vm", "fd00::7", "net1") == "vm-fd00--7-net1"
    assert len(entry_name("g" * 300, "10.0.0.7", "")) == 253


def test_a_health_checked_entry_is_ready_only_once_its_agent_reports_healthy() -> None:
    registry = Registry()
    registry.connect("c1", reg(), GROUPS, 0.0)
    assert registry.entries(GROUPS)[0].health is Health.UNHEALTHY  # the group has a probe, no report yet
    assert registry.report_health("c1", True) == [HealthChanged("vms", "vm-10.0.0.7", True, "")]
    assert registry.entries(GROUPS)[0].health is Health.HEALTHY
    assert registry.report_health("c1", True) == []  # no change, nothing to push
    assert registry.report_health("c1", False, "probe failed") == [HealthChanged("vms", "vm-10.0.0.7", False,
                                                                                  "probe failed")]
    assert registry.entries(GROUPS)[0].health is Health.UNHEALTHY
    assert registry.report_health("unknown", True) == []


def test_an_entry_without_a_probe_is_ready_unless_its_proxy_runs_one() -> None:
    registry = Registry()
    registry.connect("c1", reg(group="plain"), GROUPS, 0.0)
    registry.connect("c2", Registration("plain", "vms", "10.0.0.8", health_checked=True), GROUPS, 0.0)
    by_address = {e.address: e.health for e in registry.entries(GROUPS)}
    assert by_address == {"10.0.0.7": Health.HEALTHY, "10.0.0.8": Health.UNHEALTHY}


def test_an_entry_is_removed_a_grace_period_after_its_last_connection() -> None:
    registry = Registry(grace=10.0)
    registry.connect("c1", reg(), GROUPS, 0.0)
    registry.connect("c2", reg(), GROUPS, 1.0)  # a second stream of the same proxy
    assert registry.disconnect("c1", 2.0) == []
    assert registry.disconnect("c2", 3.0) == [Disconnected("vms", "vm-10.0.0.7", 13.0)]
    assert registry.next_expiry() == 13.0
    assert registry.expire(12.9) == [] and len(registry) == 1  # still served meanwhile
    assert registry.expire(13.0) == [Removed("vms", "vm-10.0.0.7", "disconnected for 10s")]
    assert registry.entries(GROUPS) == () and registry.next_expiry() is None


def test_a_reconnect_within_the_grace_period_keeps_the_entry_and_its_health() -> None:
    registry = Registry(grace=10.0)
    registry.connect("c1", reg(), GROUPS, 0.0)
    registry.report_health("c1", True)
    registry.disconnect("c1", 1.0)
    assert registry.connect("c2", reg(), GROUPS, 5.0) == [Reconnected("vms", "vm-10.0.0.7")]
    assert registry.expire(100.0) == []
    assert registry.entries(GROUPS)[0].health is Health.HEALTHY
    assert registry.report_health("c2", False, "down")  # the new connection reports for it


def test_the_entries_are_bounded_per_group_and_in_all() -> None:
    """A client connecting with ever new IPs: refused once every slot is held by a connected
    proxy; a disconnected entry (going away anyway) makes room."""
    registry = Registry(max_per_group=3, max_total=4)
    for i in range(3):
        registry.connect(f"c{i}", reg(f"10.0.1.{i}"), GROUPS, 0.0)
    [refused] = registry.connect("c9", reg("10.0.1.9"), GROUPS, 0.0)
    assert isinstance(refused, Refused) and refused.exhausted
    assert "WorkloadGroup vms/vm has 3 connected entries, at most 3" in refused.reason
    registry.disconnect("c1", 1.0)
    registry.disconnect("c0", 2.0)
    events = registry.connect("c9", reg("10.0.1.9"), GROUPS, 3.0)
    assert events[0] == Removed("vms", "vm-10.0.1.1", "room for a new entry")  # the longest gone
    assert {e.address for e in registry.entries(GROUPS)} == {"10.0.1.0", "10.0.1.2", "10.0.1.9"}
    registry.connect("p1", reg("10.0.2.1", group="plain"), GROUPS, 3.0)
    # 4 in all: the idle entry of the other group makes room
    assert registry.connect("p2", reg("10.0.2.2", group="plain"), GROUPS, 4.0)[0] == Removed(
        "vms", "vm-10.0.1.0", "room for a new entry")
    [refused] = registry.connect("p3", reg("10.0.2.3", group="plain"), GROUPS, 4.0)
    assert refused == Refused("auto-registration of 10.0.2.3 refused: 4 connected entries in all, at most 4",
                              exhausted=True)
    assert len(registry) == 4


def test_an_unknown_group_is_refused_with_istiods_words() -> None:
    registry = Registry()
    [refused] = registry.connect("c1", reg(group="nope"), GROUPS, 0.0)
    assert refused == Refused("auto-registration of 10.0.0.7 failed: cannot find WorkloadGroup vms/nope")
    assert len(registry) == 0


SA = "spiffe://cluster.local/ns/vms/sa/vm-sa"  # group vm's service account


@pytest.mark.parametrize("identity, why", [
    ("spiffe://cluster.local/ns/vms/sa/intruder", "the stream's identity spiffe://cluster.local/ns/vms/sa/intruder "
     "is not WorkloadGroup vms/vm's service account vms/vm-sa"),
    ("spiffe://cluster.local/ns/elsewhere/sa/vm-sa", "the stream's identity spiffe://cluster.local/ns/elsewhere/sa/vm-sa "
     "is not WorkloadGroup vms/vm's service account vms/vm-sa"),
    ("", "the stream authenticated with the shared token, which names no workload; WorkloadGroup vms/vm takes "
     "the token of service account vms/vm-sa"),
])
def test_only_the_groups_service_account_registers_and_joins_its_entry(identity: str, why: str) -> None:
    registry = Registry()
    [refused] = registry.connect("c1", reg(), GROUPS, 0.0, identity)
    assert refused == Refused(f"auto-registration of 10.0.0.7 refused: {why}", denied=True)
    assert len(registry) == 0
    assert isinstance(registry.connect("c2", reg(), GROUPS, 0.0, SA)[0], Registered)
    # another workload cannot join the entry to change its labels or report its health
    assert registry.connect("c3", reg(app="other"), GROUPS, 1.0, identity)[0] == refused
    assert registry.report_health("c3", False, "hijacked") == []
    assert registry.entries(GROUPS)[0].labels["app"] == "vm"


def _node(**metadata: object) -> Node:
    meta = Struct()
    meta.update(metadata)
    return Node(id="sidecar~10.0.0.7~vm-1.vms~vms.svc.cluster.local", metadata=meta)


def test_the_registration_is_read_from_the_nodes_metadata() -> None:
    proxy = ProxyInfo(ips=("10.0.0.7",), network="net1")
    assert registration(_node(NAMESPACE="vms"), proxy) is None  # no AUTO_REGISTER_GROUP
    got = registration(_node(AUTO_REGISTER_GROUP="vm", NAMESPACE="vms",
                             LABELS={"version": "v2", "istio-locality": "r/z"},
                             PROXY_CONFIG={"readinessProbe": {"tcpSocket": {"port": 80}}}), proxy)
    assert got == Registration("vm", "vms", "10.0.0.7", "net1", {"version": "v2"}, True)
    assert got.key == ("vms", "vm-10.0.0.7-net1")


@pytest.mark.parametrize(("metadata", "ips", "message"), [
    ({"AUTO_REGISTER_GROUP": "vm"}, ("10.0.0.7",), "AUTO_REGISTER_GROUP 'vm': the node has no NAMESPACE"),
    ({"AUTO_REGISTER_GROUP": "vm", "NAMESPACE": "vms"}, ("0.0.0.0",), "0.0.0.0 is not a workload's address"),
    ({"AUTO_REGISTER_GROUP": "vm", "NAMESPACE": "vms", "LABELS": {f"k{i}": "v" for i in range(100)}},
     ("10.0.0.7",), "100 LABELS, at most 64"),
    ({"AUTO_REGISTER_GROUP": "vm", "NAMESPACE": "vms", "LABELS": {"k": "v" * 64}}, ("10.0.0.7",), "is too long"),
])
def test_bad_registration_metadata_is_an_error_naming_it(metadata: dict[str, object], ips: tuple[str, ...],
                                                         message: str) -> None:
    with pytest.raises(RegistrationError, match=message):
        registration(_node(**metadata), ProxyInfo(ips=ips))


# --- services selecting entries -----------------------------------------------------------------


def test_selecting_services_list_the_entry_healthy_only_and_on_its_named_port() -> None:
    registry = Registry()
    registry.connect("c1", reg(), GROUPS, 0.0)
    mesh = parse_mesh(MESH)
    proxy = ProxyInfo(ips=("10.1.1.5",), cluster="Kubernetes")

    def table(entries_mesh: object) -> dict[str, list[str]]:
        return {k: list(v.ips) for k, v in entries_mesh.name_table(proxy).table.items()}  # type: ignore[attr-defined]

    def endpoints(entries_mesh: object) -> dict[str, list[tuple[str, int]]]:
        config = snapshot_of(entries_mesh, "v").envoy_for(proxy)  # type: ignore[arg-type]
        return {a.cluster_name: [(e.endpoint.address.socket_address.address,
                                  e.endpoint.address.socket_address.port_value)
                                 for group in a.endpoints for e in group.lb_endpoints] for a in config.endpoints}

    not_ready = mesh.with_entries(registry.entries(GROUPS))
    assert "vm-headless.vms.svc.cluster.local" not in table(not_ready)
    assert endpoints(not_ready)["outbound|80||vm.vms.svc.cluster.local"] == []
    registry.report_health("c1", True)
    ready = mesh.with_entries(registry.entries(GROUPS))
    assert table(ready)["vm-headless.vms.svc.cluster.local"] == ["10.0.0.7"]
    assert table(ready)["vm.vms.svc.cluster.local"] == ["10.96.0.50"]  # a ClusterIP keeps its VIP
    assert "other.elsewhere.svc.cluster.local" not in table(ready)  # another namespace selects nothing
    assert endpoints(ready)["outbound|80||vm.vms.svc.cluster.local"] == [("10.0.0.7", 8080)]  # the group's `http`
    assert endpoints(ready)["outbound|7070||vm.vms.svc.cluster.local"] == [("10.0.0.7", 9081)]  # the targetPort
    assert mesh_version(mesh) == mesh_version(parse_mesh(MESH))


def test_the_vms_own_envoy_gets_inbound_chains_on_its_named_port() -> None:
    registry = Registry()
    registry.connect("c1", reg(), GROUPS, 0.0)
    mesh = parse_mesh(MESH).with_entries(registry.entries(GROUPS))
    config = snapshot_of(mesh, "v").envoy_for(ProxyInfo(ips=("10.0.0.7",)))
    inbound = next(listener for listener in config.listeners if listener.name == "virtualInbound")
    ports = {c.filter_chain_match.destination_port.value for c in inbound.filter_chains
             if c.filter_chain_match.HasField("destination_port")}
    assert {8080, 9081} <= ports


# --- the stream and the server ------------------------------------------------------------------


def test_a_health_request_is_an_event_never_answered() -> None:
    state = StreamState("n")
    state.on_request(DiscoveryRequest(type_url=NAME_TABLE_TYPE, node=_node()), snapshot_of(parse_mesh(""), "v"))
    outcome = state.on_request(DiscoveryRequest(type_url=HEALTH_TYPE), snapshot_of(parse_mesh(""), "v"))
    assert outcome.responses == () and outcome.events == (HealthReported(True),)
    bad = DiscoveryRequest(type_url=HEALTH_TYPE, error_detail=Status(code=13, message="refused"))
    assert state.on_request(bad, snapshot_of(parse_mesh(""), "v")).events == (HealthReported(False, "refused"),)


@pytest.fixture
def served(tls: tuple[bytes, grpc.ServerCredentials]) -> Iterator[tuple[ServedModel, str, bytes]]:  # noqa: F811
    root_pem, credentials = tls
    mesh = parse_mesh(MESH)
    model = ServedModel(mesh, mesh_version(mesh), snapshot_of, Registry(grace=0.0), publish_interval=0.0)
    server, port = start_server(AdsServicer(model.hub, workloads=model), "127.0.0.1:0", credentials)
    try:
        yield model, f"127.0.0.1:{port}", root_pem
    finally:
        server.stop(None).wait()


def _vm_node(group: str = "vm") -> Node:
    return _node(AUTO_REGISTER_GROUP=group, NAMESPACE="vms", INSTANCE_IPS="10.0.0.7")


def _headless_ips(response: object) -> list[str]:
    table = NameTable()
    assert response.resources[0].Unpack(table)  # type: ignore[attr-defined]
    info = table.table.get("vm-headless.vms.svc.cluster.local")
    return list(info.ips) if info else []


@pytest.mark.timeout(30)
def test_a_vm_connecting_becomes_an_endpoint_of_another_proxys_table_and_eds(
        served: tuple[ServedModel, str, bytes], caplog: pytest.LogCaptureFixture) -> None:
    model, address, root = served
    caplog.set_level(logging.INFO, "pilotfish.controlplane")
    pod = AdsClient(address, root)
    vm = AdsClient(address, root)
    try:
        pod.send(DiscoveryRequest(type_url=NAME_TABLE_TYPE, node=_node(INSTANCE_IPS="10.1.1.5")))
        assert _headless_ips(pod.receive()) == []
        pod.send(DiscoveryRequest(type_url=ENDPOINT_TYPE))
        pod.receive()
        vm.send(DiscoveryRequest(type_url=NAME_TABLE_TYPE, node=_vm_node()))
        vm.receive()
        # registered, not ready (the group has a probe): pushed only once the VM reports healthy
        vm.send(DiscoveryRequest(type_url=HEALTH_TYPE))
        pushed = [pod.receive(), pod.receive()]
        table = next(r for r in pushed if r.type_url == NAME_TABLE_TYPE)
        assert _headless_ips(table) == ["10.0.0.7"]
        eds = next(r for r in pushed if r.type_url == ENDPOINT_TYPE)
        loads = [ClusterLoadAssignment.FromString(r.value) for r in eds.resources]
        assert any(e.endpoint.address.socket_address.address == "10.0.0.7"
                   for a in loads for g in a.endpoints for e in g.lb_endpoints)
        vm.send(DiscoveryRequest(type_url=HEALTH_TYPE, error_detail=Status(code=13, message="app down")))
        pushed = [pod.receive(), pod.receive()]
        assert _headless_ips(next(r for r in pushed if r.type_url == NAME_TABLE_TYPE)) == []
        vm.close()
        groups = parse_mesh(MESH).workload_groups

        def removed() -> bool:  # grace 0: gone at the first expiry after the disconnect
            model.expire()
            return model.registry.entries(groups) == ()

        wait_for(removed)
    finally:
        pod.close()
        vm.close()
    messages = caplog.text
    assert "registered WorkloadEntry vms/vm-10.0.0.7" in messages and "is unhealthy: app down" in messages
    assert "removed WorkloadEntry vms/vm-10.0.0.7" in messages


@pytest.mark.timeout(30)
def test_a_vm_of_an_unknown_group_is_refused(served: tuple[ServedModel, str, bytes]) -> None:
    _, address, root = served
    vm = AdsClient(address, root)
    try:
        vm.send(DiscoveryRequest(type_url=NAME_TABLE_TYPE, node=_vm_node("nope")))
        code, details = vm.status()
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert details == "auto-registration of 10.0.0.7 failed: cannot find WorkloadGroup vms/nope"
    finally:
        vm.close()


@pytest.mark.timeout(30)
def test_a_stream_registers_only_with_its_groups_service_account_token(
        tls: tuple[bytes, grpc.ServerCredentials], tmp_path: Path) -> None:  # noqa: F811
    root_pem, credentials = tls
    (tmp_path / "token").write_text("shared-token\n")
    listed = {"vm-token": SA, "other-token": "spiffe://cluster.local/ns/vms/sa/intruder"}
    mesh = parse_mesh(MESH)
    model = ServedModel(mesh, mesh_version(mesh), snapshot_of, Registry(grace=0.0), publish_interval=0.0)
    servicer = AdsServicer(model.hub, str(tmp_path / "token"), lambda: listed, workloads=model)
    server, port = start_server(servicer, "127.0.0.1:0", credentials)
    try:
        for token, code in (("other-token", grpc.StatusCode.PERMISSION_DENIED),
                            ("shared-token", grpc.StatusCode.PERMISSION_DENIED), ("vm-token", None)):
            vm = AdsClient(f"127.0.0.1:{port}", root_pem, (("authorization", f"Bearer {token}"),))
            try:
                vm.send(DiscoveryRequest(type_url=NAME_TABLE_TYPE, node=_vm_node()))
                if code is None:
                    vm.receive()
                    assert [e.name for e in model.registry.entries(mesh.workload_groups)] == ["vm-10.0.0.7"]
                else:
                    assert vm.status()[0] is code, token
                    assert len(model.registry) == 0
            finally:
                vm.close()
    finally:
        server.stop(None).wait()


def test_registry_changes_are_published_at_most_once_per_interval_and_the_last_one_is_not_lost() -> None:
    mesh = parse_mesh(MESH)
    now = [0.0]
    model = ServedModel(mesh, mesh_version(mesh), snapshot_of, Registry(), clock=lambda: now[0])
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()  # a stream's
    model.hub.subscribe(inbox)
    pushed = [0]

    def pushes() -> int:  # the stream reading its inbox
        while not inbox.empty():
            inbox.get()
            model.hub.take(inbox)
            pushed[0] += 1
        return pushed[0]

    node = _vm_node()
    assert model.connect("c1", node, proxy_info(node), SA) is None
    for i in range(101):  # a VM flipping its health on every request
        now[0] += 0.001
        model.report_health("c1", i % 2 == 0, "flapping")
    assert pushes() == 1  # the registration; the flips held back
    model.expire()  # the command's tick, within the interval: still held
    assert pushes() == 1
    now[0] = 1.0
    model.expire()
    assert pushes() == 2
    [entry] = model.registry.entries(mesh.workload_groups)
    assert entry.health is Health.HEALTHY  # the last report (i = 100: healthy) is what is served
    assert model.set_mesh(mesh, "v2", "file change") == 1  # a reloaded file goes out at once
    assert pushes() == 3


def test_the_mesh_version_follows_groups_and_selectors_not_their_key_order() -> None:
    reordered = MESH.replace("{app: vm, tier: backend}", "{tier: backend, app: vm}").replace(
        "{periodSeconds: 1, httpGet: {path: /ready, port: 8080}}", "{httpGet: {port: 8080, path: /ready}, periodSeconds: 1}")
    assert reordered != MESH and mesh_version(parse_mesh(reordered)) == mesh_version(parse_mesh(MESH))
    assert mesh_version(parse_mesh(MESH.replace("port: 8080}}", "port: 8081}}"))) != mesh_version(parse_mesh(MESH))
    assert mesh_version(parse_mesh(MESH.replace("selector: {app: vm}\n  - name: vm\n",
                                                "selector: {app: other}\n  - name: vm\n"))) != mesh_version(
        parse_mesh(MESH))
