"""The Envoy configuration of a sidecar: the clusters (CDS) and listeners (LDS) istiod sends every
sidecar whatever the mesh holds, so that captured traffic flows in plaintext.

A pure function of the mesh and the proxy. What it builds is the minimum of istiod's sidecar
config that makes capture work (docs/istio-compat.md "istiod: sidecar capture listeners and
clusters"), with istiod's names:

- `virtualOutbound` on 0.0.0.0:15001, where istio-iptables redirects the pod's outbound TCP:
  `use_original_dst`, a chain that drops connections made to 15001 itself (a loop), and a
  catch-all chain proxying to `PassthroughCluster` (ORIGINAL_DST: the address the app dialled);
- `virtualInbound` on 0.0.0.0:15006, where inbound TCP is redirected: the `original_dst`
  listener filter, the same loop guard, and a catch-all chain to `InboundPassthroughCluster`,
  which dials the original destination from 127.0.0.6 (::6), the source the capture rules let
  through instead of redirecting it back to 15006;
- `BlackHoleCluster`, STATIC with no endpoints, where the loop guards send what they catch.

The mesh's services (outbound clusters with mTLS, their endpoints, the chains matching cluster
IPs, the pod's inbound mTLS chains) come from controlplane/services.py and are placed before
these catch-all chains.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, BindConfig, ExtraSourceAddress, SocketAddress
from envoy.config.core.v3.base_pb2 import TrafficDirection
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_components_pb2 import (
    Filter,
    FilterChain,
    FilterChainMatch,
    ListenerFilter,
    ListenerFilterChainMatchPredicate,
)
from envoy.config.listener.v3.listener_pb2 import AdditionalAddress, Listener
from envoy.extensions.filters.listener.original_dst.v3.original_dst_pb2 import OriginalDst
from envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2 import TlsInspector
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from envoy.type.v3.range_pb2 import Int32Range
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue, UInt32Value

from .mesh import Mesh
from .nametable import ProxyInfo, proxy_families
from .services import service_config

# istiod's names (docs/istio-compat.md "istiod: sidecar capture listeners and clusters")
PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
OUTBOUND_BLACKHOLE_CHAIN = "virtualOutbound-blackhole"
OUTBOUND_CATCHALL_CHAIN = "virtualOutbound-catchall-tcp"
INBOUND_BLACKHOLE_CHAIN = "virtualInbound-blackhole"
INBOUND_CATCHALL_CHAIN = "virtualInbound"  # istiod names the plaintext passthrough chain so

# mesh config's proxyListenPort and proxyInboundListenPort, istio-iptables' -p and -z
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
CONNECT_TIMEOUT = Duration(seconds=10)  # mesh config's connectTimeout default
INBOUND_BIND_V4 = "127.0.0.6"
INBOUND_BIND_V6 = "::6"
WILDCARD_V4 = "0.0.0.0"
WILDCARD_V6 = "::"

TCP_PROXY = "envoy.filters.network.tcp_proxy"
ORIGINAL_DST = "envoy.filters.listener.original_dst"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"


@dataclass(frozen=True)
class SidecarConfig:
    """What one sidecar is sent: its clusters (CDS), listeners (LDS) and the clusters'
    endpoints (EDS), each named."""

    clusters: tuple[Cluster, ...]
    listeners: tuple[Listener, ...]
    endpoints: tuple[ClusterLoadAssignment, ...] = ()


def sidecar_config(mesh: Mesh, proxy: ProxyInfo, trust_domain: str = "cluster.local") -> SidecarConfig:
    """The CDS and LDS resources istiod's capture needs for `proxy`.

    The address families come from the proxy's INSTANCE_IPS as istiod reads them: IPv4 only, IPv6
    only, or both. A dual-stack proxy's listeners get the IPv6 wildcard as an additional address
    only with dual-stack support on (istiod's ISTIO_DUAL_STACK, `proxy.dual_stack_enabled`); its
    inbound passthrough has both bind addresses either way, as istiod gives them.
    """
    services = service_config(mesh, proxy, trust_domain)
    v4, v6 = proxy_families(proxy.ips)
    wildcards = [WILDCARD_V4] if v4 else []
    if v6:
        wildcards.append(WILDCARD_V6)
    if not proxy.dual_stack_enabled:
        wildcards = wildcards[:1]
    return SidecarConfig(
        clusters=(_passthrough(), _inbound_passthrough(v4, v6), _blackhole(), *services.clusters),
        listeners=(_virtual_outbound(wildcards, services.outbound_chains),
                   _virtual_inbound(wildcards, services.inbound_chains)),
        endpoints=services.assignments,
    )


def _passthrough() -> Cluster:
    return Cluster(name=PASSTHROUGH_CLUSTER, type=Cluster.ORIGINAL_DST, connect_timeout=CONNECT_TIMEOUT,
                   lb_policy=Cluster.CLUSTER_PROVIDED)


def _inbound_passthrough(v4: bool, v6: bool) -> Cluster:
    """PassthroughCluster dialling from 127.0.0.6 (or ::6): the capture rules return traffic from
    that source on lo instead of redirecting it to 15006 again (docs/istio-compat.md "istio-iptables
    rules"). Envoy picks the bind address of the destination's family from the extra one."""
    cluster = _passthrough()
    cluster.name = INBOUND_PASSTHROUGH_CLUSTER
    cluster.upstream_bind_config.CopyFrom(BindConfig(source_address=_socket(INBOUND_BIND_V4 if v4 else INBOUND_BIND_V6, 0)))
    if v4 and v6:
        cluster.upstream_bind_config.extra_source_addresses.append(
            ExtraSourceAddress(address=_socket(INBOUND_BIND_V6, 0)))
    return cluster


def _blackhole() -> Cluster:
    return Cluster(name=BLACKHOLE_CLUSTER, type=Cluster.STATIC, connect_timeout=CONNECT_TIMEOUT,
                   lb_policy=Cluster.ROUND_ROBIN)


def _virtual_outbound(wildcards: list[str], services: tuple[FilterChain, ...]) -> Listener:
    listener = _listener(VIRTUAL_OUTBOUND, wildcards, OUTBOUND_PORT, TrafficDirection.OUTBOUND, [
        *services,
        _chain(OUTBOUND_BLACKHOLE_CHAIN, BLACKHOLE_CLUSTER, OUTBOUND_PORT),
        _chain(OUTBOUND_CATCHALL_CHAIN, PASSTHROUGH_CLUSTER),
    ])
    # hand a redirected connection to the listener of its original destination (none yet), else
    # serve it here
    listener.use_original_dst.CopyFrom(BoolValue(value=True))
    return listener


def _virtual_inbound(wildcards: list[str], services: tuple[FilterChain, ...]) -> Listener:
    listener = _listener(VIRTUAL_INBOUND, wildcards, INBOUND_PORT, TrafficDirection.INBOUND, [
        *services,
        _chain(INBOUND_BLACKHOLE_CHAIN, BLACKHOLE_CLUSTER, INBOUND_PORT),
        _chain(INBOUND_CATCHALL_CHAIN, INBOUND_PASSTHROUGH_CLUSTER),
    ])
    listener.continue_on_listener_filters_timeout = True
    listener.listener_filters.append(ListenerFilter(name=ORIGINAL_DST, typed_config=_pack(OriginalDst())))
    ports = sorted({c.filter_chain_match.destination_port.value for c in services})
    if ports:  # the pod's ports are told apart by TLS or not (mTLS from the mesh, plaintext)
        inspector = ListenerFilter(name=TLS_INSPECTOR, typed_config=_pack(TlsInspector()))
        # only on those ports: it waits for the client's first bytes, which a server-first
        # protocol on another port (passed through) would never send, until its 15 s timeout
        rules = [ListenerFilterChainMatchPredicate(destination_port_range=Int32Range(start=port, end=port + 1))
                 for port in ports]
        if len(rules) == 1:  # Envoy wants two rules or more in a set
            inspector.filter_disabled.not_match.CopyFrom(rules[0])
        else:
            inspector.filter_disabled.not_match.or_match.rules.extend(rules)
        listener.listener_filters.append(inspector)
    return listener


def _listener(name: str, wildcards: list[str], port: int, direction: int, chains: list[FilterChain]) -> Listener:
    listener = Listener(name=name, address=Address(socket_address=_socket(wildcards[0], port)),
                        traffic_direction=direction, filter_chains=chains)
    for extra in wildcards[1:]:
        listener.additional_addresses.append(AdditionalAddress(address=Address(socket_address=_socket(extra, port))))
    return listener


def _chain(name: str, cluster: str, only_port: int | None = None) -> FilterChain:
    """A chain proxying TCP to `cluster`; with `only_port`, for connections whose (original)
    destination port is that one."""
    chain = FilterChain(name=name, filters=[
        Filter(name=TCP_PROXY, typed_config=_pack(TcpProxy(stat_prefix=cluster, cluster=cluster)))])
    if only_port is not None:
        chain.filter_chain_match.CopyFrom(FilterChainMatch(destination_port=UInt32Value(value=only_port)))
    return chain


def _socket(address: str, port: int) -> SocketAddress:
    return SocketAddress(address=address, port_value=port)


def _pack(message: Message) -> Any:
    packed = Any()
    packed.Pack(message)
    return packed
