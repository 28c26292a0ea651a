"""The ADS stream state machine: subscriptions, ACK, NACK, Istio's empty-response rule."""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf.any_pb2 import Any
from google.protobuf.message import DecodeError

from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.stream import AdsStream, ResourceError, TypeState, first_value

NDS = "type.googleapis.com/istio.networking.nds.v1.NameTable"


def _table(host: str = "a.ns.svc.cluster.local") -> Any:
    table = NameTable()
    table.table[host].ips.append("10.0.0.1")
    packed = Any()
    packed.Pack(table)
    return packed


def _stream(seen: list[NameTable]) -> AdsStream:
    def handler(version: str, resources: list[Any]) -> None:
        try:
            seen.append(NameTable.FromString(first_value(resources, NDS)))
        except DecodeError as err:
            raise ResourceError(f"cannot decode {NDS}: {err}") from None

    return AdsStream(Node(id="sidecar~10.0.0.9~p.ns~ns.svc.cluster.local"), {NDS: handler})


def test_initial_request_subscribes_with_the_node() -> None:
    stream = _stream([])
    (first,) = stream.initial_requests()
    assert first.type_url == NDS and first.node.id.startswith("sidecar~") and not first.response_nonce
    assert not first.resource_names and not first.version_info


def test_response_is_acked_with_version_and_nonce() -> None:
    seen: list[NameTable] = []
    stream = _stream(seen)
    stream.initial_requests()
    ack = stream.on_response(DiscoveryResponse(type_url=NDS, version_info="v1", nonce="n1", resources=[_table()]))
    assert ack is not None and (ack.version_info, ack.response_nonce) == ("v1", "n1")
    assert not ack.HasField("error_detail") and not ack.HasField("node")
    assert list(seen[0].table) == ["a.ns.svc.cluster.local"]
    assert stream.types[NDS].version == "v1" and stream.types[NDS].accepted == 1


def test_undecodable_resource_is_nacked_and_keeps_the_version() -> None:
    seen: list[NameTable] = []
    stream = _stream(seen)
    stream.initial_requests()
    stream.on_response(DiscoveryResponse(type_url=NDS, version_info="v1", nonce="n1", resources=[_table()]))
    garbage = Any(type_url=NDS, value=b"\x0a\xff\xff\xff\xff\x0f")
    nack = stream.on_response(DiscoveryResponse(type_url=NDS, version_info="v2", nonce="n2", resources=[garbage]))
    assert nack is not None and nack.response_nonce == "n2" and nack.version_info == "v1"
    assert nack.error_detail.code == 13 and "cannot decode" in nack.error_detail.message
    assert len(seen) == 1 and stream.types[NDS].rejected == 1


def test_wrong_type_inside_the_response_is_nacked() -> None:
    stream = _stream([])
    stream.initial_requests()
    wrong = Any(type_url="type.googleapis.com/google.protobuf.Empty", value=b"")
    nack = stream.on_response(DiscoveryResponse(type_url=NDS, version_info="v1", nonce="n1", resources=[wrong]))
    assert nack is not None and "want" in nack.error_detail.message


def test_empty_response_is_ignored_without_ack() -> None:
    stream = _stream([])
    stream.initial_requests()
    assert stream.on_response(DiscoveryResponse(type_url=NDS, version_info="v1", nonce="n1")) is None
    assert stream.types[NDS].nonce == "n1" and stream.types[NDS].version == ""


def test_unsubscribed_type_is_ignored() -> None:
    stream = _stream([])
    assert stream.on_response(DiscoveryResponse(type_url="type.googleapis.com/other", nonce="x", resources=[_table()])) is None


def test_a_new_stream_resumes_from_the_accepted_version_and_counts() -> None:
    known = {NDS: TypeState(version="v7", nonce="old", accepted=3, rejected=1)}
    stream = AdsStream(Node(id="n"), {NDS: lambda v, r: None}, known)
    first = stream.initial_requests()[0]
    assert first.version_info == "v7" and not first.response_nonce
    assert (stream.types[NDS].accepted, stream.types[NDS].rejected) == (3, 1)


def test_handler_errors_become_nacks() -> None:
    def reject(version: str, resources: list[Any]) -> None:
        raise ResourceError("table has no entries for my namespace")

    stream = AdsStream(Node(id="n"), {NDS: reject})
    stream.initial_requests()
    nack = stream.on_response(DiscoveryResponse(type_url=NDS, version_info="v1", nonce="n1", resources=[_table()]))
    assert nack is not None and nack.error_detail.message == "table has no entries for my namespace"

