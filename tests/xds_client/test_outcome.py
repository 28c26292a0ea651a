"""How streams to the control plane are counted, in Istio's terms: a connection that could not
be made is a connection failure (istio_agent_istiod_connection_failures); a stream that ended
over a connection that was made is a termination, `cancelled` when expected and `error`
otherwise (istio_agent_istiod_connection_terminations{type}). Pure rules, then a real client
against an in-process gRPC server."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
import trio
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.any_pb2 import Any
from prometheus_client import CollectorRegistry, generate_latest

from pilotfish.xds_client.metrics import XdsMetrics
from pilotfish.xds_client.nds import TYPE_URL as NDS
from pilotfish.xds_client.nds import NameTableType
from pilotfish.xds_client.outcome import CANCELLED, ERROR, connection_made, termination
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.transport import ConnectionState, XdsClient, XdsSettings


@pytest.mark.parametrize("code,details,kind", [
    (None, "stream closed by the server", CANCELLED),
    ("CANCELLED", "", CANCELLED),
    ("DEADLINE_EXCEEDED", "", CANCELLED),
    ("UNAVAILABLE", "transport is closing", CANCELLED),
    ("UNAVAILABLE", "error reading from server: EOF", CANCELLED),
    ("INTERNAL", "stream terminated by RST_STREAM with error code: NO_ERROR", CANCELLED),
    ("UNAVAILABLE", "Socket closed", ERROR),
    ("UNAUTHENTICATED", "bearer token rejected", ERROR),
    ("INTERNAL", "boom", ERROR),
])
def test_termination_types_are_istios(code: str | None, details: str, kind: str) -> None:
    assert termination(code, details) == kind


def test_a_connection_was_made_unless_grpc_could_not_connect() -> None:
    assert not connection_made("UNAVAILABLE", answered=False)  # refused, unresolved, handshake failed
    assert connection_made("UNAVAILABLE", answered=True)  # the control plane died mid-stream
    assert connection_made("UNAUTHENTICATED", answered=False)  # the server's answer


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def StreamAggregatedResources(self, requests, context):  # type: ignore[no-untyped-def]
        next(requests)
        if self.behaviour == "reject":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bearer token rejected")
        packed = Any()
        packed.Pack(NameTable())
        yield discovery_pb2.DiscoveryResponse(type_url=NDS, version_info="v1", nonce=uuid.uuid4().hex, resources=[packed])
        next(requests)  # the ACK; then the stream ends cleanly


def run_client(address: str, until: Callable[[ConnectionState], bool]) -> ConnectionState:
    """A client with a quick backoff against `address`, until `until(state)` (within 20 s)."""
    client = XdsClient(XdsSettings(address, "x", None, "/nonexistent", backoff_base=0.01, backoff_cap=0.02),
                       Node(id="n"), ResourceCache(), [SavedCopy(NameTableType(bytes), "")])

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                while not until(client.state):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    trio.run(main)
    return client.state


@pytest.fixture
def server() -> Iterator[Callable[[str], str]]:
    started: list[grpc.Server] = []

    def start(behaviour: str) -> str:
        grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(behaviour), grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        grpc_server.start()
        started.append(grpc_server)
        return f"127.0.0.1:{port}"

    yield start
    for grpc_server in started:
        grpc_server.stop(0)


def test_a_stream_the_control_plane_rejects_is_a_termination_not_a_connection_failure(server: Callable[[str], str]) -> None:
    """Istio counts a stream refused by istiod (UNAUTHENTICATED) in terminations{type="error"};
    its connection was made. (It used to be counted as a connection failure.)"""
    state = run_client(server("reject"), lambda s: s.terminations[ERROR] >= 3)
    assert state.failures == 0 and state.terminations[CANCELLED] == 0


def test_a_stream_that_delivered_and_ended_cleanly_is_a_cancelled_termination(server: Callable[[str], str]) -> None:
    state = run_client(server("deliver"), lambda s: s.terminations[CANCELLED] >= 2)
    assert state.failures == 0 and state.terminations[ERROR] == 0


def test_no_control_plane_is_a_connection_failure() -> None:
    with socket.socket() as nothing:  # bound, not listening: connections to it are refused
        nothing.bind(("127.0.0.1", 0))
        state = run_client(f"127.0.0.1:{nothing.getsockname()[1]}", lambda s: s.failures >= 3)
    assert sum(state.terminations.values()) == 0


def test_metrics_carry_istios_names_and_types() -> None:
    state = ConnectionState(failures=2)
    state.terminations[ERROR] += 3
    registry = CollectorRegistry()
    registry.register(XdsMetrics(lambda: state))
    text = generate_latest(registry).decode()
    assert "istio_agent_istiod_connection_failures_total 2.0" in text
    assert 'istio_agent_istiod_connection_terminations_total{type="error"} 3.0' in text
    assert 'istio_agent_istiod_connection_terminations_total{type="cancelled"} 0.0' in text
