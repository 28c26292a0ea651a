"""The mesh's services in a sidecar's Envoy config: what istiod adds to the capture listeners so
that captured traffic goes to the service's pods over mTLS (docs/istio-compat.md "istiod:
sidecar service config"). Pure.

Outbound, for every Kubernetes Service with a cluster IP (and every ServiceEntry with an address
resolved STATIC or DNS: plain text, its endpoints by EDS or by Envoy's DNS), per port:
- a cluster `outbound|<port>||<host>` of type EDS (its endpoints over ADS: the service's ready
  pods on the target port), originating mTLS with the SDS `default` certificate and trusting
  `ROOTCA`, verifying that the server's SPIFFE ID is one of the service's pods' service
  accounts; HTTP/2 upstream for HTTP2 (gRPC) ports. A namespace whose mode is DISABLE is dialled
  in plaintext;
- a chain of `virtualOutbound` matching the cluster IP and port: HTTP routing (HTTP, HTTP2)
  or TCP proxying to that cluster.

Inbound, for the proxy's own pod (an endpoint whose address is one of the proxy's INSTANCE_IPS),
per target port of the services it serves, chains of `virtualInbound` by the namespace's
PeerAuthentication mode: a TLS chain (STRICT, PERMISSIVE) that requires a client certificate of
the mesh and, for HTTP, sets `x-forwarded-client-cert` to the caller's identity; a plaintext chain
(PERMISSIVE, DISABLE). In STRICT a plaintext connection to the port matches no chain and is
closed. Both go to the pod from 127.0.0.6 (InboundPassthroughCluster).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.config.core.v3.base_pb2 import TransportSocket
from envoy.config.core.v3.config_source_pb2 import AggregatedConfigSource, ApiConfigSource, ApiVersion, ConfigSource
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.core.v3.protocol_pb2 import Http2ProtocolOptions
from envoy.config.endpoint.v3.endpoint_components_pb2 import Endpoint as EnvoyEndpoint
from envoy.config.endpoint.v3.endpoint_components_pb2 import LbEndpoint, LocalityLbEndpoints
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_components_pb2 import Filter, FilterChain, FilterChainMatch
from envoy.config.route.v3.route_components_pb2 import Route, RouteAction, RouteMatch, VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import (
    CertificateValidationContext,
    SubjectAltNameMatcher,
    TlsParameters,
)
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import SdsSecretConfig
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue, UInt32Value

from .mesh import Mesh
from .nametable import (
    UNSPECIFIED_IP,
    Endpoint,
    Health,
    ProxyInfo,
    Registry,
    Resolution,
    Service,
    ServicePort,
    proxy_families,
)

CONNECT_TIMEOUT = Duration(seconds=10)
SDS_CLUSTER = "sds-grpc"  # the bootstrap's cluster to the agent's SDS socket
DEFAULT_SECRET = "default"
ROOT_SECRET = "ROOTCA"
ISTIO_ALPN = ("istio-peer-exchange", "istio")  # what istiod's clients offer inside the mesh
HTTP_PROTOCOLS = ("HTTP", "HTTP2")
HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"


@dataclass(frozen=True)
class ServiceConfig:
    """What the mesh's services add for one proxy."""

    clusters: tuple[Cluster, ...]
    assignments: tuple[ClusterLoadAssignment, ...]  # EDS, one per cluster
    outbound_chains: tuple[FilterChain, ...]  # for virtualOutbound, before its catch-all
    inbound_chains: tuple[FilterChain, ...]  # for virtualInbound, before its catch-all


def cluster_name(port: int, host: str) -> str:
    return f"outbound|{port}||{host}"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def service_config(mesh: Mesh, proxy: ProxyInfo, trust_domain: str) -> ServiceConfig:
    clusters: list[Cluster] = []
    assignments: list[ClusterLoadAssignment] = []
    chains: list[FilterChain] = []
    taken: set[tuple[str, int]] = set()  # (address, port): two chains with one match would make Envoy refuse LDS
    for svc, vips in _routable(mesh, proxy):
        endpoints = [e for e in mesh.endpoints.get(svc.hostname, ()) if e.health is Health.HEALTHY]
        external = svc.registry is Registry.EXTERNAL
        mtls = not external and mesh.mtls_mode(svc.namespace) != "DISABLE"
        identities = sorted({spiffe_id(trust_domain, svc.namespace, e.service_account or "default")
                             for e in endpoints})
        for spec in svc.port_specs:
            free = tuple(vip for vip in vips if (vip, spec.port) not in taken)
            if not free:
                continue  # an earlier service has these addresses on this port (istiod: the first wins)
            taken.update((vip, spec.port) for vip in free)
            name = cluster_name(spec.port, svc.hostname)
            if svc.resolution in (Resolution.DNS_LB, Resolution.DNS_ROUND_ROBIN_LB):
                clusters.append(_dns_cluster(name, svc, endpoints, spec))
            else:
                clusters.append(_outbound_cluster(name, spec, identities if mtls else None))
                assignments.append(_assignment(name, endpoints, spec))
            chains.append(_outbound_chain(name, free, spec))
    return ServiceConfig(tuple(clusters), tuple(assignments), tuple(chains), tuple(_inbound_chains(mesh, proxy)))


def _routable(mesh: Mesh, proxy: ProxyInfo) -> Iterator[tuple[Service, tuple[str, ...]]]:
    """Kubernetes Services with cluster IPs of the proxy's cluster, and ServiceEntries with
    addresses (written, or auto-allocated for a proxy that captures DNS) resolved STATIC or DNS.
    Headless services and ServiceEntries with resolution NONE keep the passthrough, which dials
    the address the application dialled, as istiod's config for them does."""
    for svc in mesh.services:
        if svc.registry is Registry.KUBERNETES:
            if svc.resolution is Resolution.CLIENT_SIDE_LB:
                vips = svc.cluster_vips.get(proxy.cluster) or next(iter(svc.cluster_vips.values()), ())
                if vips:
                    yield svc, tuple(vips)
            continue
        if svc.resolution not in (Resolution.CLIENT_SIDE_LB, Resolution.DNS_LB, Resolution.DNS_ROUND_ROBIN_LB):
            continue
        if svc.default_address != UNSPECIFIED_IP:
            yield svc, (svc.default_address,)
        elif proxy.dns_capture:  # the addresses its DNS proxy answers with, of the proxy's families
            v4, v6 = proxy_families(proxy.ips)
            allocated = tuple(a for a, wanted in ((svc.auto_allocated_ipv4, v4), (svc.auto_allocated_ipv6, v6))
                              if a and wanted)
            if allocated:
                yield svc, allocated


def _dns_cluster(name: str, svc: Service, endpoints: list[Endpoint], spec: ServicePort) -> Cluster:
    """A ServiceEntry resolved by DNS: Envoy resolves its endpoints' names (the host itself when
    it lists none) and dials them in plain text (TLS to an external service is the application's)."""
    kind = Cluster.STRICT_DNS if svc.resolution is Resolution.DNS_LB else Cluster.LOGICAL_DNS
    cluster = Cluster(name=name, type=kind, connect_timeout=CONNECT_TIMEOUT, lb_policy=Cluster.ROUND_ROBIN)
    hosts = [a for e in endpoints for a in e.addresses[:1]] or [svc.hostname]
    if kind == Cluster.LOGICAL_DNS:
        hosts = hosts[:1]  # Envoy allows one address in a LOGICAL_DNS cluster
    cluster.load_assignment.CopyFrom(ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(
        lb_endpoints=[LbEndpoint(endpoint=EnvoyEndpoint(address=Address(socket_address=SocketAddress(
            address=host, port_value=spec.target_port)))) for host in hosts])]))
    return cluster


def _sds(name: str) -> SdsSecretConfig:
    source = ConfigSource(resource_api_version=ApiVersion.V3, api_config_source=ApiConfigSource(
        api_type=ApiConfigSource.GRPC, transport_api_version=ApiVersion.V3, set_node_on_first_message_only=True,
        grpc_services=[GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER))]))
    return SdsSecretConfig(name=name, sds_config=source)


def _common_tls(alpn: Iterable[str], peer_identities: Iterable[str] | None) -> CommonTlsContext:
    """The workload certificate and the mesh's roots, both over SDS; with `peer_identities`,
    the peer must present one of those SPIFFE IDs."""
    validation = CertificateValidationContext()
    for identity in peer_identities or ():
        validation.match_typed_subject_alt_names.append(SubjectAltNameMatcher(
            san_type=SubjectAltNameMatcher.URI, matcher=StringMatcher(exact=identity)))
    return CommonTlsContext(
        tls_params=TlsParameters(tls_minimum_protocol_version=TlsParameters.TLSv1_2),
        alpn_protocols=list(alpn),
        tls_certificate_sds_secret_configs=[_sds(DEFAULT_SECRET)],
        combined_validation_context=CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=validation, validation_context_sds_secret_config=_sds(ROOT_SECRET)))


def _outbound_cluster(name: str, spec: ServicePort, identities: list[str] | None) -> Cluster:
    cluster = Cluster(name=name, type=Cluster.EDS, connect_timeout=CONNECT_TIMEOUT, lb_policy=Cluster.ROUND_ROBIN)
    cluster.eds_cluster_config.service_name = name
    cluster.eds_cluster_config.eds_config.CopyFrom(ConfigSource(ads=AggregatedConfigSource(),
                                                                resource_api_version=ApiVersion.V3))
    if spec.protocol == "HTTP2":
        options = HttpProtocolOptions(explicit_http_config=HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions()))
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(_pack(options))
    if identities is not None:
        tls = UpstreamTlsContext(common_tls_context=_common_tls(ISTIO_ALPN, identities),
                                 sni=f"outbound_.{spec.port}_._.{name.rsplit('|', 1)[1]}")
        cluster.transport_socket.CopyFrom(TransportSocket(name="envoy.transport_sockets.tls",
                                                          typed_config=_pack(tls)))
    return cluster


def _assignment(name: str, endpoints: list[Endpoint], spec: ServicePort) -> ClusterLoadAssignment:
    lb = [LbEndpoint(endpoint=EnvoyEndpoint(address=Address(socket_address=SocketAddress(
              address=address, port_value=endpoint.target_port(spec)))))
          for endpoint in endpoints for address in endpoint.addresses[:1]]
    return ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=lb)] if lb else [])


def _outbound_chain(name: str, vips: tuple[str, ...], spec: ServicePort) -> FilterChain:
    match = FilterChainMatch(destination_port=UInt32Value(value=spec.port))
    for vip in vips:  # an address, or a ServiceEntry's CIDR
        address, _, length = vip.partition("/")
        match.prefix_ranges.add(address_prefix=address,
                                prefix_len=UInt32Value(value=int(length) if length else 128 if ":" in address else 32))
    network = _http(name, name, xfcc=False) if spec.protocol in HTTP_PROTOCOLS else _tcp(name, name)
    return FilterChain(name=name, filter_chain_match=match, filters=[network])


def _inbound_chains(mesh: Mesh, proxy: ProxyInfo) -> Iterator[FilterChain]:
    """The proxy's own pod's ports, each once, by its namespace's mTLS mode."""
    mine = set(proxy.ips)
    seen: set[int] = set()
    for svc in mesh.services:
        if svc.registry is not Registry.KUBERNETES:
            continue
        own = next((e for e in mesh.endpoints.get(svc.hostname, ()) if mine.intersection(e.addresses)), None)
        if own is None:
            continue
        mode = mesh.mtls_mode(svc.namespace)
        for spec in svc.port_specs:
            target = own.target_port(spec)  # a WorkloadEntry's named port, else the targetPort
            if target in seen:
                continue
            seen.add(target)
            http = spec.protocol in HTTP_PROTOCOLS
            stat = f"inbound|{target}||"
            if mode in ("STRICT", "PERMISSIVE"):
                tls = DownstreamTlsContext(common_tls_context=_common_tls(("h2", "http/1.1") if http else (), None),
                                           require_client_certificate=BoolValue(value=True))
                yield FilterChain(
                    name=f"{stat}-mtls",
                    filter_chain_match=FilterChainMatch(destination_port=UInt32Value(value=target),
                                                        transport_protocol="tls"),
                    transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(tls)),
                    filters=[_http(stat, INBOUND_PASSTHROUGH_CLUSTER, xfcc=True) if http
                             else _tcp(stat, INBOUND_PASSTHROUGH_CLUSTER)])
            if mode in ("PERMISSIVE", "DISABLE"):
                yield FilterChain(
                    name=f"{stat}-plaintext",
                    filter_chain_match=FilterChainMatch(destination_port=UInt32Value(value=target),
                                                        transport_protocol="raw_buffer"),
                    filters=[_http(stat, INBOUND_PASSTHROUGH_CLUSTER, xfcc=False) if http
                             else _tcp(stat, INBOUND_PASSTHROUGH_CLUSTER)])


def _http(stat: str, cluster: str, xfcc: bool) -> Filter:
    """HTTP routing of every request to `cluster`; with `xfcc`, the caller's certificate's URI
    (its SPIFFE ID) in x-forwarded-client-cert, whatever the caller sent in it."""
    manager = HttpConnectionManager(
        stat_prefix=stat, codec_type=HttpConnectionManager.AUTO,
        route_config=RouteConfiguration(name=stat, virtual_hosts=[VirtualHost(
            name=stat, domains=["*"],
            routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster=cluster, timeout=Duration()))])]),
        http_filters=[HttpFilter(name="envoy.filters.http.router", typed_config=_pack(Router()))])
    manager.forward_client_cert_details = (HttpConnectionManager.SANITIZE_SET if xfcc
                                           else HttpConnectionManager.SANITIZE)
    if xfcc:
        manager.set_current_client_cert_details.uri = True
    return Filter(name=HCM, typed_config=_pack(manager))


def _tcp(stat: str, cluster: str) -> Filter:
    return Filter(name=TCP_PROXY, typed_config=_pack(TcpProxy(stat_prefix=stat, cluster=cluster)))


def _pack(message: Message) -> Any:
    packed = Any()
    packed.Pack(message)
    return packed
