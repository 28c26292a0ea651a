"""build_name_table against Istio's own expectations (the `name_table_build` vectors, transcribed
from Istio's name_table_test.go: docs/istio-compat.md "istiod: NDS generation"), plus the
address rules no vector covers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from pilotfish.controlplane.nametable import (
    Endpoint,
    Health,
    ProxyInfo,
    Registry,
    Resolution,
    Service,
    build_name_table,
)

CASES = Path(__file__).resolve().parents[1] / "dns" / "data" / "cases.json"
VECTORS = [c for c in json.loads(CASES.read_text()) if c["kind"] == "name_table_build"]


def _service(s: dict[str, Any]) -> Service:
    return Service(
        hostname=s["hostname"],
        registry=Registry(s["registry"]),
        name=s["name"],
        namespace=s["namespace"],
        resolution=Resolution(s["resolution"].split()[0]),  # "Passthrough (ClusterIP: None)"
        default_address=s["address"],
        cluster_vips={c: tuple(v) for c, v in s.get("cluster_vips", {}).items()},
        ports=tuple(s["ports"]),
        publish_not_ready_addresses=s.get("publish_not_ready_addresses", False),
    )


def _endpoint(e: dict[str, Any]) -> Endpoint:
    return Endpoint(
        addresses=tuple(e["addresses"]),
        hostname=e.get("hostname", ""),
        subdomain=e.get("subdomain", ""),
        network=e.get("network", ""),
        cluster=e.get("cluster", ""),
        health=Health(e["health"]),
        ports=tuple(e.get("ports", ())),
    )


def _proxy(cfg: dict[str, Any]) -> ProxyInfo:
    p = cfg["proxy"]
    defaults = ProxyInfo()
    return ProxyInfo(
        ips=tuple(p["ips"]),
        network=p["network"],
        cluster=p["cluster"],
        dns_domain=p["dns_domain"],
        multicluster_headless_enabled=cfg.get("multicluster_headless_enabled", defaults.multicluster_headless_enabled),
        dual_stack_enabled=cfg.get("dual_stack_enabled", defaults.dual_stack_enabled),
    )


def _table(services: list[Service], endpoints: dict[str, list[Endpoint]], proxy: ProxyInfo) -> dict[str, Any]:
    return MessageToDict(build_name_table(services, endpoints, proxy), preserving_proto_field_name=True).get("table", {})


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_name_table_build_vector(vector: dict[str, Any]) -> None:
    services = [_service(s) for s in vector["input"]["services"]]
    endpoints = {h: [_endpoint(e) for e in eps] for h, eps in vector["input"]["endpoints"].items()}
    table = _table(services, endpoints, _proxy(vector["proxy_config"]))
    expect = vector["expect"]
    if "name_table" in expect:
        assert table == expect["name_table"]
    if "keys_present" in expect:
        assert set(expect["keys_present"]) <= set(table)
    if "entry" in expect:
        assert table[expect["entry"]]["ips"] == expect["ips"]


def test_vectors_are_all_checked() -> None:
    assert len(VECTORS) == 21
    assert all({"name_table", "keys_present", "entry"} & set(v["expect"]) for v in VECTORS)


def _k8s(hostname: str, resolution: Resolution = Resolution.CLIENT_SIDE_LB, **fields: Any) -> Service:
    return Service(hostname=hostname, registry=Registry.KUBERNETES, name="svc", namespace="ns", resolution=resolution, **fields)


DUAL_VIPS = _k8s("svc.ns.svc.cluster.local", default_address="10.0.0.1", cluster_vips={"c1": ("10.0.0.1", "fd00::1")})


@pytest.mark.parametrize(
    ("ips", "dual_stack", "expected"),
    [
        (("10.1.0.1",), False, ["10.0.0.1"]),
        (("fd01::1",), False, ["fd00::1"]),
        (("10.1.0.1", "fd01::1"), False, ["10.0.0.1"]),  # dual proxy, flag off: first VIP's family
        (("10.1.0.1", "fd01::1"), True, ["10.0.0.1", "fd00::1"]),
        (("fd01::1",), True, ["fd00::1"]),  # the flag only matters for dual-stack proxies
        ((), False, ["10.0.0.1"]),  # no IPs known: treated as IPv4
    ],
)
def test_cluster_vips_filtered_to_proxy_families(ips: tuple[str, ...], dual_stack: bool, expected: list[str]) -> None:
    proxy = ProxyInfo(ips=ips, cluster="c1", dual_stack_enabled=dual_stack)
    assert _table([DUAL_VIPS], {}, proxy)["svc.ns.svc.cluster.local"]["ips"] == expected


def test_other_cluster_gets_default_address_only() -> None:
    proxy = ProxyInfo(ips=("10.1.0.1", "fd01::1"), cluster="c2", dual_stack_enabled=True)
    assert _table([DUAL_VIPS], {}, proxy)["svc.ns.svc.cluster.local"]["ips"] == ["10.0.0.1"]
    v6_only = ProxyInfo(ips=("fd01::1",), cluster="c2")
    assert _table([DUAL_VIPS], {}, v6_only) == {}  # default filtered out: the service has VIPs


AUTO = Service(
    hostname="api.example.com",
    registry=Registry.EXTERNAL,
    name="api",
    namespace="ns",
    resolution=Resolution.DNS_LB,
    ports=(443,),
    auto_allocated_ipv4="240.240.1.2",
    auto_allocated_ipv6="2001:2::1:2",
)


def test_auto_allocated_addresses_only_for_dns_capture() -> None:
    assert _table([AUTO], {}, ProxyInfo(ips=("10.1.0.1",))) == {}  # headless DNS: forwarded
    captured = _table([AUTO], {}, ProxyInfo(ips=("10.1.0.1",), dns_capture=True))
    assert captured == {"api.example.com": {"ips": ["240.240.1.2"], "registry": "External"}}
    dual = _table([AUTO], {}, ProxyInfo(ips=("10.1.0.1", "fd01::1"), dns_capture=True, dual_stack_enabled=True))
    assert dual["api.example.com"]["ips"] == ["240.240.1.2", "2001:2::1:2"]


def test_external_name_gets_no_entry() -> None:
    external_name = _k8s("db.ns.svc.cluster.local", Resolution.ALIAS, ports=(5432,))
    endpoints = {"db.ns.svc.cluster.local": [Endpoint(addresses=("10.0.0.9",))]}
    assert _table([external_name], endpoints, ProxyInfo()) == {}


def test_headless_without_ports_gets_no_entry() -> None:
    endpoints = {"h.ns.svc.cluster.local": [Endpoint(addresses=("10.0.0.9",))]}
    assert _table([_k8s("h.ns.svc.cluster.local", Resolution.PASSTHROUGH)], endpoints, ProxyInfo()) == {}
    with_port = _k8s("h.ns.svc.cluster.local", Resolution.PASSTHROUGH, ports=(80,))
    assert _table([with_port], endpoints, ProxyInfo())["h.ns.svc.cluster.local"]["ips"] == ["10.0.0.9"]


def test_clusterset_host_has_no_short_name() -> None:
    svc = _k8s("svc.ns.svc.clusterset.local", default_address="10.0.0.1")
    assert _table([svc], {}, ProxyInfo()) == {"svc.ns.svc.clusterset.local": {"ips": ["10.0.0.1"], "registry": "Kubernetes"}}


def test_deterministic_bytes_do_not_depend_on_unrelated_service_order() -> None:
    services = [_k8s(f"s{i}.x", default_address=f"10.0.0.{i}") for i in range(1, 50)]
    forward = build_name_table(services, {}, ProxyInfo()).SerializeToString(deterministic=True)
    backward = build_name_table(services[::-1], {}, ProxyInfo()).SerializeToString(deterministic=True)
    assert forward == backward
