"""A real Envoy whose ADS goes through the xDS proxy, as Istio's bootstrap has it: the `xds-grpc`
cluster is a pipe to the proxy's socket, over Delta (Istio's default) and over SotW. The fake
control plane (tests/fake_ads.py) serves one cluster and one listener, and a name table, which
the agent takes on the same stream: Envoy gets its configuration, the agent its table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from envoy_proc import Envoy, available, pipe_cluster
from fake_ads import FakeAds, start_fake, wait_for
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any

from pilotfish.xds_client.channel import XdsChannel, XdsSettings
from pilotfish.xds_client.nds import TYPE_URL as NDS
from pilotfish.xds_client.nds import NameTableType
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.proxy import LISTENER_TYPE, XdsProxy
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.saved import SavedCopy

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def packed(message: object) -> Any:
    out = Any()
    out.Pack(message)  # type: ignore[arg-type]
    return out


def resources() -> dict[str, list[tuple[str, Any]]]:
    cluster = json_format.ParseDict({
        "name": "backend", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}, Cluster())
    listener = json_format.ParseDict({
        "name": "front", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "front", "cluster": "backend"}}]}]}, Listener())
    table = NameTable()
    table.table["details.default.svc.cluster.local"].ips.append("10.96.0.20")
    assert TcpProxy  # the filter's type is known to json_format through this import
    return {CDS: [("backend", packed(cluster))], LISTENER_TYPE: [("front", packed(listener))],
            NDS: [("table", packed(table))]}


def bootstrap(api_type: str, socket_path: str) -> dict[str, object]:
    """Istio's way to the proxy: ADS over the `xds-grpc` cluster, a pipe to the socket, HTTP/2."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": "sidecar~127.0.0.1~app.default~default.svc.cluster.local", "cluster": "app.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": api_type, "transport_api_version": "V3",
                           "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
            "cds_config": ads, "lds_config": ads},
        "static_resources": {"clusters": [pipe_cluster("xds-grpc", socket_path)]},
    }


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[FakeAds, XdsProxy, ResourceCache, str]]:
    fake = FakeAds(serve=resources())
    server, address = start_fake(fake)
    channel = XdsChannel(XdsSettings(address, "istiod.istio-system.svc", None, "/nonexistent"))
    cache = ResourceCache()
    path = str(tmp_path / "etc" / "istio" / "proxy" / "XDS")
    proxy = XdsProxy(channel, cache, [SavedCopy(NameTableType(bytes), "")], path)
    proxy.start()
    yield fake, proxy, cache, path
    proxy.stop(0)
    channel.close()
    server.stop(0)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
def test_envoy_gets_its_cluster_and_listener_through_the_proxy(
        tmp_path: Path, proxied: tuple[FakeAds, XdsProxy, ResourceCache, str], api_type: str) -> None:
    fake, proxy, cache, path = proxied
    envoy = Envoy(tmp_path / "envoy", "", bootstrap(api_type, path))
    try:
        assert envoy.wait_stat("cluster_manager.cds.update_success", 1) >= 1
        assert envoy.wait_stat("listener_manager.lds.update_success", 1) >= 1
        dump = json.loads(envoy.admin("/config_dump"))
        text = json.dumps(dump)
        assert '"name": "backend"' in text and '"name": "front"' in text
        served = wait_for(lambda: cache.get(NameTableType(bytes)), "the name table in the agent")
        assert NameTable.FromString(served.value.serialized).table  # type: ignore[attr-defined]
        upstream = fake.streams[0]
        assert upstream.delta == (api_type == "DELTA_GRPC")
        assert upstream.received[0].node.id == "sidecar~127.0.0.1~app.default~default.svc.cluster.local"
        wait_for(lambda: any(r.type_url == NDS and r.response_nonce for r in upstream.received), "the NDS ACK")
        assert envoy.stat("cluster_manager.cds.update_rejected") == 0
        assert envoy.stat("listener_manager.lds.update_rejected") == 0
        assert len(fake.streams) == 1  # one Envoy stream, one upstream stream
    finally:
        envoy.stop()
    wait_for(lambda: proxy.counters.streams == 0, "Envoy's stream closed")
