"""The gRPC shell over both protocols against a scripted control plane (istiod cannot run here):
a good table is swapped in, saved and ACKed; a poisoned one is NACKed with its reason while the
good one serves and stays saved."""

from __future__ import annotations

import queue
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trio
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryResponse,
    DiscoveryResponse,
    Resource,
)
from google.protobuf.any_pb2 import Any

from pilotfish.xds_client.core import Request
from pilotfish.xds_client.nds import TYPE_URL as NDS
from pilotfish.xds_client.nds import BuiltTable, NameTableType
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.transport import XdsClient, XdsSettings


def packed(ip: str) -> Any:
    table = NameTable()
    table.table["a.ns.svc.cluster.local"].ips.append(ip)
    out = Any()
    out.Pack(table)
    return out


def build(serialized: bytes) -> list[str]:
    ips = [ip for info in NameTable.FromString(serialized).table.values() for ip in info.ips]
    for ip in ips:
        socket.inet_pton(socket.AF_INET, ip)
    return ips


class Scripted(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Sends a good table, then a poisoned one, each after the client's previous request; records
    every request."""

    def __init__(self) -> None:
        self.requests: queue.SimpleQueue[Request] = queue.SimpleQueue()

    def _script(self, requests: Iterator[Request], responses: list[object]) -> Iterator[object]:
        for response in responses:
            self.requests.put(next(requests))
            yield response
        for request in requests:
            self.requests.put(request)

    def StreamAggregatedResources(self, requests, context):  # type: ignore[no-untyped-def]
        yield from self._script(requests, [
            DiscoveryResponse(type_url=NDS, version_info="v1", nonce="n1", resources=[packed("10.0.0.1")]),
            DiscoveryResponse(type_url=NDS, version_info="v2", nonce="n2", resources=[packed("10.0.0.2\x00")]),
        ])

    def DeltaAggregatedResources(self, requests, context):  # type: ignore[no-untyped-def]
        yield from self._script(requests, [
            DeltaDiscoveryResponse(type_url=NDS, system_version_info="v1", nonce="n1",
                                   resources=[Resource(name="t", version="1", resource=packed("10.0.0.1"))]),
            DeltaDiscoveryResponse(type_url=NDS, system_version_info="v2", nonce="n2",
                                   resources=[Resource(name="t", version="2", resource=packed("10.0.0.2\x00"))]),
        ])


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_good_table_serves_and_a_poisoned_one_is_nacked(tmp_path: Path, delta: bool) -> None:
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    nds = NameTableType(build)
    cache, saved = ResourceCache(), tmp_path / "nametable.pb"
    client = XdsClient(XdsSettings(f"127.0.0.1:{port}", "x", None, "/nonexistent", delta=delta),
                       Node(id="n"), cache, [SavedCopy(nds, str(saved))])

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                while servicer.requests.qsize() < 3:  # the subscription, the ACK, the NACK
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        server.stop(0)
    subscribe, ack, nack = (servicer.requests.get_nowait() for _ in range(3))
    assert subscribe.type_url == NDS and subscribe.node.id == "n"
    assert ack.response_nonce == "n1" and not ack.HasField("error_detail")
    assert nack.response_nonce == "n2" and "embedded null character" in nack.error_detail.message
    served = cache.get(nds)
    assert served is not None and served.version == "v1"
    assert isinstance(served.value, BuiltTable) and served.value.built == ["10.0.0.1"]
    assert NameTable.FromString(saved.read_bytes()) == NameTable.FromString(packed("10.0.0.1").value)
    state = client.state.types[NDS]
    assert (state.version, state.accepted, state.rejected) == ("v1", 1, 1)
