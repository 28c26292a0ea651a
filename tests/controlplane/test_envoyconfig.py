"""A sidecar's Envoy config (controlplane/envoyconfig.py): what istiod's capture needs, per address
family, and every variant accepted by the real Envoy (`envoy --mode validate`, the configuration
put into a static bootstrap)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from google.protobuf import json_format

from envoy_proc import ENVOY, available
from pilotfish.controlplane.envoyconfig import SidecarConfig, sidecar_config
from pilotfish.controlplane.nametable import ProxyInfo
from streams import EMPTY_MESH

V4, V6, DUAL = ("10.1.1.5",), ("fd00::5",), ("10.1.1.5", "fd00::5")
VARIANTS = {  # name: (INSTANCE_IPS, ISTIO_DUAL_STACK)
    "ipv4": (V4, False), "ipv6": (V6, False), "dual": (DUAL, False), "dual-stack": (DUAL, True),
    "dual-v6-first": (tuple(reversed(DUAL)), True),
}


def config(ips: tuple[str, ...], dual_stack: bool = False) -> SidecarConfig:
    return sidecar_config(EMPTY_MESH, ProxyInfo(ips=ips, dual_stack_enabled=dual_stack))


def listener(cfg: SidecarConfig, name: str) -> Listener:
    (found,) = [item for item in cfg.listeners if item.name == name]
    return found


def cluster(cfg: SidecarConfig, name: str) -> Cluster:
    (found,) = [item for item in cfg.clusters if item.name == name]
    return found


def addresses(item: Listener) -> list[tuple[str, int]]:
    every = [item.address, *(extra.address for extra in item.additional_addresses)]
    return [(a.socket_address.address, a.socket_address.port_value) for a in every]


def chains(item: Listener) -> list[tuple[str, int | None, str]]:
    """(name, destination port matched or None, the tcp_proxy's cluster) of each filter chain."""
    out = []
    for chain in item.filter_chains:
        (only,) = chain.filters
        proxy = TcpProxy()
        assert only.name == "envoy.filters.network.tcp_proxy" and only.typed_config.Unpack(proxy)
        port = chain.filter_chain_match.destination_port.value if chain.HasField("filter_chain_match") else None
        out.append((chain.name, port, proxy.cluster))
    return out


def test_istiods_names_and_chains() -> None:
    cfg = config(V4)
    assert [c.name for c in cfg.clusters] == ["PassthroughCluster", "InboundPassthroughCluster", "BlackHoleCluster"]
    outbound, inbound = cfg.listeners
    assert (outbound.name, inbound.name) == ("virtualOutbound", "virtualInbound")
    assert outbound.use_original_dst.value is True
    assert outbound.traffic_direction == 2 and inbound.traffic_direction == 1  # OUTBOUND, INBOUND
    assert chains(outbound) == [("virtualOutbound-blackhole", 15001, "BlackHoleCluster"),
                                ("virtualOutbound-catchall-tcp", None, "PassthroughCluster")]
    assert chains(inbound) == [("virtualInbound-blackhole", 15006, "BlackHoleCluster"),
                               ("virtualInbound", None, "InboundPassthroughCluster")]
    assert [f.name for f in inbound.listener_filters] == ["envoy.filters.listener.original_dst"]
    assert inbound.continue_on_listener_filters_timeout


def test_clusters() -> None:
    cfg = config(V4)
    passthrough = cluster(cfg, "PassthroughCluster")
    assert (passthrough.type, passthrough.lb_policy) == (Cluster.ORIGINAL_DST, Cluster.CLUSTER_PROVIDED)
    assert passthrough.connect_timeout.seconds == 10
    assert not passthrough.HasField("upstream_bind_config")
    blackhole = cluster(cfg, "BlackHoleCluster")
    assert blackhole.type == Cluster.STATIC and not blackhole.HasField("load_assignment")


@pytest.mark.parametrize(("ips", "dual_stack", "bind", "extra"), [
    (V4, False, "127.0.0.6", []),
    (V6, False, "::6", []),
    (DUAL, False, "127.0.0.6", ["::6"]),  # both binds whatever ISTIO_DUAL_STACK says, as istiod
    (DUAL, True, "127.0.0.6", ["::6"]),
])
def test_inbound_passthrough_dials_from_the_address_capture_lets_through(
        ips: tuple[str, ...], dual_stack: bool, bind: str, extra: list[str]) -> None:
    inbound = cluster(config(ips, dual_stack), "InboundPassthroughCluster")
    assert inbound.type == Cluster.ORIGINAL_DST
    bound = inbound.upstream_bind_config
    assert (bound.source_address.address, bound.source_address.port_value) == (bind, 0)
    assert [e.address.address for e in bound.extra_source_addresses] == extra


@pytest.mark.parametrize(("ips", "dual_stack", "wildcards"), [
    (V4, False, ["0.0.0.0"]),
    (V6, False, ["::"]),
    (DUAL, False, ["0.0.0.0"]),  # without ISTIO_DUAL_STACK, one family
    (DUAL, True, ["0.0.0.0", "::"]),
    (tuple(reversed(DUAL)), True, ["0.0.0.0", "::"]),
])
def test_listener_addresses_follow_the_proxys_families(ips: tuple[str, ...], dual_stack: bool,
                                                       wildcards: list[str]) -> None:
    cfg = config(ips, dual_stack)
    assert addresses(listener(cfg, "virtualOutbound")) == [(w, 15001) for w in wildcards]
    assert addresses(listener(cfg, "virtualInbound")) == [(w, 15006) for w in wildcards]


def test_the_same_proxy_gets_the_same_bytes() -> None:
    """Versions are digests of the serialized resources: the config must not vary between builds."""
    first, second = config(DUAL, True), config(DUAL, True)
    assert [c.SerializeToString(deterministic=True) for c in (*first.clusters, *first.listeners)] == \
        [c.SerializeToString(deterministic=True) for c in (*second.clusters, *second.listeners)]


@pytest.mark.skipif(available() is not None, reason=str(available()))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_envoy_accepts_every_variant(tmp_path: Path, variant: str) -> None:
    cfg = config(*VARIANTS[variant])
    bootstrap = {
        "node": {"id": "sidecar~10.1.1.5~app.default~default.svc.cluster.local", "cluster": "app.default"},
        "static_resources": {"clusters": [json_format.MessageToDict(c) for c in cfg.clusters],
                             "listeners": [json_format.MessageToDict(item) for item in cfg.listeners]},
    }
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    done = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "-l", "warning"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
