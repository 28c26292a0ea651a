"""The delta ADS stream protocol (controlplane/delta.py) without gRPC: subscriptions, wildcard,
initial versions, per-resource versions, removals, ACK and NACK, and pushes of only what changed.

The stand-in mesh (streams.py) has one table whose host is named after the version, and the real
Envoy config, which does not change with the version.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DeltaDiscoveryResponse
from google.rpc.status_pb2 import Status

from pilotfish.controlplane.delta import MAX_NAMES, DeltaStreamState
from pilotfish.controlplane.envoyconfig import SidecarConfig
from pilotfish.controlplane.served import NAME_TABLE_TYPE
from pilotfish.controlplane.stream import Acked, Connected, Ignored, Nacked, Sent, Stale, StreamError
from pilotfish.xds_client.core import Accepted, DeltaCore
from pilotfish.xds_client.nds import NameTableType
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from streams import CLUSTER_TYPE, ROUTE_TYPE, LISTENER_TYPE, NODE_ID, node, snapshot

CLUSTERS = ["PassthroughCluster", "InboundPassthroughCluster", "BlackHoleCluster"]


def request(type_url: str = CLUSTER_TYPE, first: bool = False, nonce: str = "", subscribe: tuple[str, ...] = (),
            unsubscribe: tuple[str, ...] = (), initial: dict[str, str] | None = None,
            error: str | None = None) -> DeltaDiscoveryRequest:
    req = DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names_subscribe=subscribe,
                                resource_names_unsubscribe=unsubscribe, initial_resource_versions=initial or {})
    if first:
        req.node.CopyFrom(node())
    if error is not None:
        req.error_detail.CopyFrom(Status(code=13, message=error))
    return req


def names(response: DeltaDiscoveryResponse) -> list[str]:
    return [r.name for r in response.resources]


def opened(type_url: str = CLUSTER_TYPE, **fields: object) -> tuple[DeltaStreamState, DeltaDiscoveryResponse]:
    """A stream that opened `type_url` with one request (`fields` as `request` takes them)."""
    state = DeltaStreamState("s1")
    (response,) = state.on_request(request(type_url, first=True, **fields), snapshot("v1")).responses  # type: ignore[arg-type]
    return state, response


def test_an_empty_first_request_is_a_wildcard_subscription() -> None:
    state = DeltaStreamState("s1")
    outcome = state.on_request(request(first=True), snapshot("v1"))
    (response,) = outcome.responses
    assert names(response) == CLUSTERS
    assert (response.type_url, response.system_version_info, list(response.removed_resources)) == (CLUSTER_TYPE, "v1", [])
    assert all(r.version for r in response.resources)
    cluster = Cluster()
    assert response.resources[0].resource.Unpack(cluster) and cluster.name == "PassthroughCluster"
    connected, sent = outcome.events
    assert isinstance(connected, Connected) and connected.node_id == NODE_ID
    assert sent == Sent(CLUSTER_TYPE, "v1", response.nonce, 3)


def test_star_is_a_wildcard_subscription_too() -> None:
    _, response = opened(LISTENER_TYPE, subscribe=("*",))
    assert names(response) == ["virtualOutbound", "virtualInbound"]


def test_the_name_table_is_one_resource_without_a_name_as_istiod_sends_it() -> None:
    _, response = opened(NAME_TABLE_TYPE)
    (resource,) = response.resources
    table = NameTable()
    assert resource.name == "" and resource.resource.Unpack(table)
    assert list(table.table) == ["v1.example.com"]


def test_the_first_request_must_carry_the_node() -> None:
    with pytest.raises(StreamError, match="missing node information"):
        DeltaStreamState("s1").on_request(request(), snapshot("v1"))


def test_subscribing_by_name_sends_those_and_says_which_do_not_exist() -> None:
    state, response = opened(subscribe=("BlackHoleCluster", "outbound|80||nope.svc"))
    assert names(response) == ["BlackHoleCluster"]
    assert list(response.removed_resources) == ["outbound|80||nope.svc"]
    (more,) = state.on_request(request(subscribe=("PassthroughCluster",)), snapshot("v1")).responses
    assert names(more) == ["PassthroughCluster"] and list(more.removed_resources) == []
    # the version changed, nothing this client wants did: silence, and the missing name is not
    # announced missing again
    assert state.on_snapshot(snapshot("v2")).responses == ()


def test_subscribing_to_what_the_client_has_is_not_answered() -> None:
    state, _ = opened(subscribe=("BlackHoleCluster",))
    assert state.on_request(request(subscribe=("BlackHoleCluster",)), snapshot("v1")).responses == ()


def test_unsubscribing_is_not_answered_and_a_resubscription_sends_it_again() -> None:
    state, _ = opened(subscribe=("BlackHoleCluster", "PassthroughCluster"))
    assert state.on_request(request(unsubscribe=("BlackHoleCluster",)), snapshot("v1")).responses == ()
    (again,) = state.on_request(request(subscribe=("BlackHoleCluster",)), snapshot("v1")).responses
    assert names(again) == ["BlackHoleCluster"]


def test_leaving_the_wildcard_keeps_the_names_subscribed() -> None:
    state, _ = opened(subscribe=("*", "BlackHoleCluster"))
    assert state.on_request(request(unsubscribe=("*",)), snapshot("v1")).responses == ()
    (back,) = state.on_request(request(subscribe=("*",)), snapshot("v1")).responses
    assert names(back) == ["PassthroughCluster", "InboundPassthroughCluster"]


def test_initial_versions_the_client_holds_are_not_sent_again() -> None:
    _, first = opened()
    held = {r.name: r.version for r in first.resources}
    held["BlackHoleCluster"] = "an-older-version"
    held["outbound|80||gone.svc"] = "v0"
    state = DeltaStreamState("s2")  # the client reconnected
    (response,) = state.on_request(request(first=True, initial=held), snapshot("v1")).responses
    assert names(response) == ["BlackHoleCluster"]
    assert list(response.removed_resources) == ["outbound|80||gone.svc"]


def test_a_reconnect_holding_everything_still_gets_an_answer() -> None:
    """Envoy's initial fetch of a type ends with the first response, even an empty one."""
    _, first = opened()
    state = DeltaStreamState("s2")
    (response,) = state.on_request(
        request(first=True, initial={r.name: r.version for r in first.resources}), snapshot("v1")).responses
    assert (names(response), list(response.removed_resources)) == ([], [])


def test_a_new_version_pushes_only_what_changed_for_the_proxy() -> None:
    state = DeltaStreamState("s1")
    state.on_request(request(NAME_TABLE_TYPE, first=True), snapshot("v1"))
    state.on_request(request(CLUSTER_TYPE), snapshot("v1"))
    state.on_request(request(LISTENER_TYPE), snapshot("v1"))
    outcome = state.on_snapshot(snapshot("v2"))
    (pushed,) = outcome.responses  # the table changed; clusters and listeners did not
    assert (pushed.type_url, pushed.system_version_info) == (NAME_TABLE_TYPE, "v2")
    assert outcome.events == (Sent(NAME_TABLE_TYPE, "v2", pushed.nonce, 1),)
    # a version whose table is the same as the last one's: nothing
    assert state.on_snapshot(snapshot("v3", host="v2")).responses == ()


def test_a_resource_gone_from_the_snapshot_is_removed() -> None:
    state, _ = opened()
    full = snapshot("v2")
    smaller = replace(full, envoy_for=lambda proxy: SidecarConfig(full.envoy_for(proxy).clusters[:2], ()))
    (pushed,) = state.on_snapshot(smaller).responses
    assert (names(pushed), list(pushed.removed_resources)) == ([], ["BlackHoleCluster"])
    assert pushed.nonce
    (back,) = state.on_snapshot(snapshot("v3")).responses
    assert names(back) == ["BlackHoleCluster"]


def test_ack_is_recorded_and_not_answered() -> None:
    state, response = opened()
    outcome = state.on_request(request(nonce=response.nonce), snapshot("v1"))
    assert outcome == type(outcome)((), (Acked(CLUSTER_TYPE, "v1", response.nonce),))


def test_nack_is_reported_not_answered_and_not_sent_again() -> None:
    """The client keeps what it had; the same resources would be refused again, so only a change
    is sent."""
    state = DeltaStreamState("s1")
    (table,) = state.on_request(request(NAME_TABLE_TYPE, first=True), snapshot("v1")).responses
    outcome = state.on_request(request(NAME_TABLE_TYPE, nonce=table.nonce, error="bad table"), snapshot("v1"))
    assert outcome.responses == ()
    assert outcome.events == (Nacked(NAME_TABLE_TYPE, "", table.nonce, "bad table"),)
    assert state.on_snapshot(snapshot("v1b", host="v1")).responses == ()
    (fixed,) = state.on_snapshot(snapshot("v2")).responses
    assert fixed.system_version_info == "v2"


def test_an_ack_of_an_earlier_response_is_stale_and_its_subscriptions_still_count() -> None:
    state, first = opened(subscribe=("BlackHoleCluster",))
    (second,) = state.on_request(request(subscribe=("PassthroughCluster",)), snapshot("v1")).responses
    outcome = state.on_request(request(nonce=first.nonce, subscribe=("InboundPassthroughCluster",)), snapshot("v1"))
    assert outcome.events[0] == Stale(CLUSTER_TYPE, first.nonce)
    (third,) = outcome.responses
    assert names(third) == ["InboundPassthroughCluster"]
    assert second.nonce != third.nonce


def test_a_nonce_from_elsewhere_is_a_first_request() -> None:
    """A client that reconnected from another control plane echoes a nonce we never sent."""
    state = DeltaStreamState("s1")
    (response,) = state.on_request(request(first=True, nonce="other-3"), snapshot("v1")).responses
    assert names(response) == CLUSTERS


def test_types_not_served_are_ignored() -> None:
    outcome = DeltaStreamState("s1").on_request(request(ROUTE_TYPE, first=True, subscribe=("a",)), snapshot("v1"))
    assert outcome.responses == () and outcome.events[1:] == (Ignored(ROUTE_TYPE),)


def test_subscriptions_are_bounded() -> None:
    state, _ = opened(subscribe=("BlackHoleCluster",))
    with pytest.raises(StreamError, match=f"more than {MAX_NAMES} resource names"):
        state.on_request(request(subscribe=tuple(f"c{i}" for i in range(MAX_NAMES + 1))), snapshot("v1"))


def test_the_projects_delta_client_core_gets_acks_and_resumes() -> None:
    """xds_client/core.py's DeltaCore (what an agent's delta stream runs) against this server's
    state: the table arrives and is ACKed, a change is pushed, and a client that reconnects with
    the version it holds is sent nothing again but still answered."""
    def table_of(event: object) -> list[str]:
        assert isinstance(event, Accepted), event
        return list(NameTable.FromString(event.value.serialized).table)

    client = DeltaCore(node(), [NameTableType(bytes)], {})
    server = DeltaStreamState("s1")
    (subscribe,) = client.initial_requests()
    (response,) = server.on_request(subscribe, snapshot("v1")).responses
    event = client.on_response(response)
    assert table_of(event) == ["v1.example.com"]
    assert server.on_request(client.ack(event), snapshot("v1")).events == (Acked(NAME_TABLE_TYPE, "v1", response.nonce),)
    (pushed,) = server.on_snapshot(snapshot("v2")).responses
    event = client.on_response(pushed)
    assert table_of(event) == ["v2.example.com"]
    server.on_request(client.ack(event), snapshot("v2"))

    again = DeltaCore(node(), [NameTableType(bytes)], client.states)  # a reconnect
    (resume,) = again.initial_requests()
    assert dict(resume.initial_resource_versions) == {"": pushed.resources[0].version}
    (answer,) = DeltaStreamState("s2").on_request(resume, snapshot("v2")).responses
    assert (list(answer.resources), list(answer.removed_resources)) == ([], [])
    assert table_of(again.on_response(answer)) == ["v2.example.com"]
