"""The mesh's services in a sidecar's Envoy config (controlplane/services.py): outbound EDS
clusters with mTLS and SPIFFE verification, their endpoints, the chains matching cluster IPs,
the pod's inbound chains by PeerAuthentication mode; the whole config accepted by the real
Envoy (`--mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from envoy_proc import ENVOY, available
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import DownstreamTlsContext, UpstreamTlsContext
from google.protobuf.json_format import MessageToDict

from pilotfish.controlplane.envoyconfig import SidecarConfig, sidecar_config
from pilotfish.controlplane.mesh import parse_mesh
from pilotfish.controlplane.nametable import ProxyInfo
from pilotfish.controlplane.services import service_config

MESH = """\
services:
  - name: reviews
    namespace: bookinfo
    clusterIP: 10.96.0.21
    ports: [{port: 9080, name: http, targetPort: 8080}, {port: 9090, name: grpc}, {port: 5432, name: db}]
    endpoints:
      - {addresses: [10.244.1.7], serviceAccount: reviews}
      - {addresses: [10.244.1.8], serviceAccount: reviews-v2}
      - {addresses: [10.244.1.9], ready: false}
  - name: legacy
    namespace: old
    clusterIP: 10.96.0.30
    ports: [{port: 80, name: http}]
    endpoints: [{addresses: [10.244.2.1]}]
  - name: db
    namespace: data
    clusterIP: None
    ports: [5432]
serviceEntries:
  - {name: api, namespace: bookinfo, hosts: [api.example], addresses: [240.240.0.9], ports: [443]}
peerAuthentications:
  - {name: default, namespace: old, mtls: {mode: DISABLE}}
  - {name: default, namespace: bookinfo, mtls: {mode: STRICT}}
"""
REVIEWS_POD = ProxyInfo(ips=("10.244.1.7",), cluster="Kubernetes")
LEGACY_POD = ProxyInfo(ips=("10.244.2.1",), cluster="Kubernetes")


def test_outbound_clusters_endpoints_and_chains() -> None:
    config = service_config(parse_mesh(MESH), LEGACY_POD, "cluster.local")
    names = [c.name for c in config.clusters]
    assert names == ["outbound|9080||reviews.bookinfo.svc.cluster.local", "outbound|9090||reviews.bookinfo.svc.cluster.local",
                     "outbound|5432||reviews.bookinfo.svc.cluster.local", "outbound|80||legacy.old.svc.cluster.local"]
    http = config.clusters[0]
    tls = UpstreamTlsContext()
    http.transport_socket.typed_config.Unpack(tls)
    sans = [m.matcher.exact for m in tls.common_tls_context.combined_validation_context.default_validation_context
            .match_typed_subject_alt_names]
    assert sans == ["spiffe://cluster.local/ns/bookinfo/sa/reviews", "spiffe://cluster.local/ns/bookinfo/sa/reviews-v2"]
    assert tls.common_tls_context.tls_certificate_sds_secret_configs[0].name == "default"
    assert tls.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
    assert tls.sni == "outbound_.9080_._.reviews.bookinfo.svc.cluster.local"
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in config.clusters[1].typed_extension_protocol_options
    assert not config.clusters[3].HasField("transport_socket")  # DISABLE: plaintext
    endpoints = MessageToDict(config.assignments[0])["endpoints"][0]["lbEndpoints"]
    assert [e["endpoint"]["address"]["socketAddress"] for e in endpoints] == [
        {"address": "10.244.1.7", "portValue": 8080}, {"address": "10.244.1.8", "portValue": 8080}]  # not the unready
    match = config.outbound_chains[0].filter_chain_match
    assert (match.destination_port.value, match.prefix_ranges[0].address_prefix) == (9080, "10.96.0.21")
    assert config.outbound_chains[0].filters[0].name == "envoy.filters.network.http_connection_manager"
    assert config.outbound_chains[2].filters[0].name == "envoy.filters.network.tcp_proxy"


def _chains(proxy: ProxyInfo) -> dict[str, object]:
    return {c.name: c for c in service_config(parse_mesh(MESH), proxy, "cluster.local").inbound_chains}


def test_inbound_by_mode() -> None:
    strict = _chains(REVIEWS_POD)
    assert sorted(strict) == ["inbound|5432||-mtls", "inbound|8080||-mtls", "inbound|9090||-mtls"]  # no plaintext
    chain = strict["inbound|8080||-mtls"]
    tls = DownstreamTlsContext()
    chain.transport_socket.typed_config.Unpack(tls)  # type: ignore[attr-defined]
    assert tls.require_client_certificate.value
    manager = HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(manager)  # type: ignore[attr-defined]
    assert manager.forward_client_cert_details == HttpConnectionManager.SANITIZE_SET
    assert manager.set_current_client_cert_details.uri
    assert sorted(_chains(LEGACY_POD)) == ["inbound|80||-plaintext"]  # DISABLE
    permissive = parse_mesh(MESH.replace("mode: STRICT", "mode: PERMISSIVE"))
    names = sorted(c.name for c in service_config(permissive, REVIEWS_POD, "cluster.local").inbound_chains)
    assert "inbound|8080||-mtls" in names and "inbound|8080||-plaintext" in names
    assert service_config(parse_mesh(MESH), ProxyInfo(ips=("10.9.9.9",)), "cluster.local").inbound_chains == ()


@pytest.mark.skipif(available() is not None, reason=str(available()))
@pytest.mark.parametrize("proxy", [REVIEWS_POD, LEGACY_POD], ids=["strict", "disable"])
def test_envoy_accepts_the_whole_config(tmp_path: Path, proxy: ProxyInfo) -> None:
    _validate(tmp_path, sidecar_config(parse_mesh(MESH), proxy), proxy.ips[0])


def _validate(tmp_path: Path, config: SidecarConfig, ip: str) -> None:
    """The config as static resources of a bootstrap with the agent's ADS and SDS clusters."""
    pipe = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}, "type": "STATIC", "connect_timeout": "1s"}
    doc = {
        "node": {"id": f"sidecar~{ip}~p.ns~ns.svc.cluster.local", "cluster": "p.ns"},
        "dynamic_resources": {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                                             "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}},
        "static_resources": {
            "clusters": [*(MessageToDict(c) for c in config.clusters),
                         {"name": "sds-grpc", **pipe, "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [
                             {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": "/tmp/sds"}}}}]}]}},
                         {"name": "xds-grpc", **pipe, "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [
                             {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": "/tmp/xds"}}}}]}]}}],
            "listeners": [MessageToDict(listener) for listener in config.listeners]},
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


ENTRIES = """\
services:
  - {name: reviews, namespace: bookinfo, clusterIP: 10.96.0.21, ports: [{port: 9080, name: http}],
     endpoints: [{addresses: [10.244.1.7]}]}
serviceEntries:
  - {name: static, namespace: bookinfo, hosts: [db.partner.example], addresses: [240.240.1.1], resolution: STATIC,
     ports: [{number: 5432, name: tcp}], endpoints: [{address: 203.0.113.5}, {address: 203.0.113.6}]}
  - {name: dns, namespace: bookinfo, hosts: [api.partner.example], resolution: DNS, ports: [{number: 80, name: http}]}
  - {name: range, namespace: bookinfo, hosts: [legacy.example], addresses: [192.0.2.0/24], resolution: STATIC,
     ports: [{number: 8080, name: tcp}], endpoints: [{address: 192.0.2.10}]}
  - {name: none, namespace: bookinfo, hosts: [any.example], addresses: [198.51.100.1], ports: [443]}
  - {name: again, namespace: bookinfo, hosts: [other.example], addresses: [240.240.1.1], resolution: STATIC,
     ports: [{number: 5432, name: tcp}], endpoints: [{address: 203.0.113.7}]}
"""


def test_service_entries_with_addresses_are_routed_in_plain_text() -> None:
    mesh = parse_mesh(ENTRIES)
    config = service_config(mesh, ProxyInfo(ips=("10.244.1.8",), dns_capture=True), "cluster.local")
    clusters = {c.name: c for c in config.clusters}
    static = clusters["outbound|5432||db.partner.example"]
    assert static.type == static.EDS and not static.HasField("transport_socket")  # external: no mesh mTLS
    lb = MessageToDict(next(a for a in config.assignments if a.cluster_name == static.name))
    assert [e["endpoint"]["address"]["socketAddress"]["address"] for e in lb["endpoints"][0]["lbEndpoints"]] == [
        "203.0.113.5", "203.0.113.6"]
    dns = clusters["outbound|80||api.partner.example"]
    assert dns.type == dns.STRICT_DNS
    assert dns.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address == \
        "api.partner.example"
    chains = {c.name: c.filter_chain_match for c in config.outbound_chains}
    auto = mesh.services[2].auto_allocated_ipv4  # the DNS entry had no address: the allocated one, with DNS capture
    assert [r.address_prefix for r in chains["outbound|80||api.partner.example"].prefix_ranges] == [auto]
    assert [(r.address_prefix, r.prefix_len.value) for r in chains["outbound|8080||legacy.example"].prefix_ranges] \
        == [("192.0.2.0", 24)]
    assert "outbound|443||any.example" not in clusters  # resolution NONE: the passthrough dials it
    assert "outbound|5432||other.example" not in clusters  # same address and port as an earlier entry: the first wins
    without = service_config(mesh, ProxyInfo(ips=("10.244.1.8",)), "cluster.local")
    assert "outbound|80||api.partner.example" not in {c.name for c in without.clusters}  # no DNS capture: no address


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_envoy_accepts_service_entries(tmp_path: Path) -> None:
    _validate(tmp_path, sidecar_config(parse_mesh(ENTRIES), ProxyInfo(ips=("10.244.1.8",), dns_capture=True)),
              "10.244.1.8")


def test_tls_inspector_only_on_the_pods_declared_ports() -> None:
    """The inspector waits for a client's first bytes: on a port passed through, a server-first
    protocol would stall until its timeout."""
    inbound = sidecar_config(parse_mesh(MESH), REVIEWS_POD).listeners[1]
    inspector = next(f for f in inbound.listener_filters if f.name == "envoy.filters.listener.tls_inspector")
    ranges = [(r.destination_port_range.start, r.destination_port_range.end)
              for r in inspector.filter_disabled.not_match.or_match.rules]
    assert ranges == [(5432, 5433), (8080, 8081), (9090, 9091)]
    legacy = sidecar_config(parse_mesh(MESH), LEGACY_POD).listeners[1]
    one = next(f for f in legacy.listener_filters if f.name == "envoy.filters.listener.tls_inspector")
    assert one.filter_disabled.not_match.destination_port_range.start == 80
