"""istiod's `BuildNameTable`: the DNS NameTable (NDS) one proxy is sent, from services and endpoints.

The agent answers DNS from this table alone, so every rule here decides whether a name resolves
in the pod or goes upstream. The rules are istiod's (docs/istio-compat.md
"istiod: NDS generation", pinned down by the `name_table_build` vectors), including the ones that
look odd, because an agent fed by pilotfish must resolve exactly what it would resolve when fed by
istiod:

- a service's addresses are the proxy's cluster's VIPs, else the auto-allocated ServiceEntry
  addresses (only for proxies that capture DNS), filtered to the proxy's IP families unless
  dual-stack is on and the proxy is dual-stack; else the default address;
- `0.0.0.0` marks a headless service. Only a Passthrough one (Kubernetes `clusterIP: None`,
  ServiceEntry `resolution: NONE` without addresses) gets an entry, made of its endpoints' IPs,
  plus one per-pod name for endpoints with a subdomain. Other headless services (DNS
  ServiceEntries left without an address, ExternalName) get none: their names go upstream;
- a Kubernetes service replaces a ServiceEntry of the same hostname, ServiceEntries of one
  hostname add up, and anything after a Kubernetes service of that hostname is ignored.

Pure: no I/O, no clock, no randomness. The same input gives the same table. Its map has no
order (protobuf's Python runtime iterates it in a per-process random order, as Go does), so
whoever needs stable bytes, for a version or a comparison, serializes with `deterministic=True`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

UNSPECIFIED_IP = "0.0.0.0"  # istiod's marker for "no VIP": a headless service
_CLUSTERSET_SUFFIX = ".clusterset.local"  # Multi-Cluster Services hosts get no short names


class Registry(StrEnum):
    """Where a service comes from; the agent generates Kubernetes aliases only for `Kubernetes`."""

    KUBERNETES = "Kubernetes"
    EXTERNAL = "External"  # ServiceEntries


class Resolution(StrEnum):
    """istiod's model resolution (not the ServiceEntry enum): only Passthrough matters for DNS."""

    CLIENT_SIDE_LB = "ClientSideLB"  # Kubernetes ClusterIP services, ServiceEntry STATIC
    DNS_LB = "DNSLB"  # ServiceEntry DNS
    DNS_ROUND_ROBIN_LB = "DNSRoundRobinLB"  # ServiceEntry DNS_ROUND_ROBIN
    PASSTHROUGH = "Passthrough"  # headless Kubernetes services, ServiceEntry NONE
    ALIAS = "Alias"  # Kubernetes ExternalName


class Health(StrEnum):
    """An endpoint's state; anything but HEALTHY is left out unless publishNotReadyAddresses."""

    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    TERMINATING = "TERMINATING"


class ServicePort(NamedTuple):
    """A service port as the sidecar config needs it: Istio's protocol (from `appProtocol` or
    the port's name, docs/istio-compat.md "istiod: sidecar service config") and the pods' port."""

    port: int
    protocol: str  # "HTTP", "HTTP2" (gRPC too) or "TCP"
    target_port: int
    name: str = ""  # a WorkloadEntry's port of this name is its target port (docs/controlplane.md)


@dataclass(frozen=True, slots=True)
class Service:
    """One istiod service: a Kubernetes Service, or one (host, address) pair of a ServiceEntry.

    istiod turns a ServiceEntry with hosts H and addresses A into |H|×|A| services (|H| when A
    is empty), which is how several addresses of one host end up appended in one entry.
    """

    hostname: str
    registry: Registry
    name: str  # Kubernetes name: the entry's shortname
    namespace: str
    resolution: Resolution
    default_address: str = UNSPECIFIED_IP
    cluster_vips: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # cluster -> VIPs
    ports: tuple[int, ...] = ()
    publish_not_ready_addresses: bool = False
    auto_allocated_ipv4: str = ""  # ServiceEntries without addresses, resolution not NONE
    auto_allocated_ipv6: str = ""
    port_specs: tuple[ServicePort, ...] = ()  # `ports` with protocol and target port (Envoy config)
    selector: Mapping[str, str] = field(default_factory=dict)  # Kubernetes: the WorkloadEntries it selects


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a service (a pod, or a ServiceEntry endpoint)."""

    addresses: tuple[str, ...]
    hostname: str = ""  # pod spec hostname: with subdomain, gives the per-pod DNS name
    subdomain: str = ""
    network: str = ""  # empty matches every network
    cluster: str = ""  # empty matches every cluster
    health: Health = Health.HEALTHY
    ports: tuple[int, ...] = ()  # the service ports it serves; empty means all of them
    service_account: str = ""  # the pod's; its SPIFFE identity is what a client verifies
    # (service port, this endpoint's port) where it is not the service's targetPort: a
    # WorkloadEntry's named ports
    target_ports: tuple[tuple[int, int], ...] = ()

    def target_port(self, spec: ServicePort) -> int:
        """The port this endpoint serves `spec` on."""
        for port, target in self.target_ports:
            if port == spec.port:
                return target
        return spec.target_port


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What istiod knows of the proxy the table is for (its node metadata and istiod's flags)."""

    ips: tuple[str, ...] = ()  # INSTANCE_IPS: their families decide the address filtering
    network: str = ""  # NETWORK; empty matches every network
    cluster: str = ""  # CLUSTER_ID; selects the per-cluster VIPs, empty matches every cluster
    # DNS_DOMAIN. The table does not depend on it (istiod's builder ignores it too); the
    # agent uses it to expand short names. Kept so one value describes the proxy everywhere.
    dns_domain: str = ""
    dns_capture: bool = False  # DNS_CAPTURE: only such proxies are given auto-allocated IPs
    multicluster_headless_enabled: bool = True  # ENABLE_MULTICLUSTER_HEADLESS (istiod default)
    dual_stack_enabled: bool = False  # ISTIO_DUAL_STACK (istiod default off)


@dataclass(slots=True)
class _Entry:
    ips: list[str]
    registry: str
    shortname: str = ""
    namespace: str = ""


def build_name_table(
    services: Iterable[Service], endpoints_by_hostname: Mapping[str, Sequence[Endpoint]], proxy: ProxyInfo
) -> NameTable:
    """The NameTable istiod would send `proxy`, given every service visible to it, in order.

    Order matters only where istiod's does: IPs of ServiceEntries sharing a hostname are
    appended in service order.
    """
    v4, v6 = proxy_families(proxy.ips)
    entries: dict[str, _Entry] = {}
    for svc in services:
        ips: list[str] = []
        headless = False
        for address in _addresses_for_proxy(svc, proxy, v4, v6):
            if address == UNSPECIFIED_IP:
                headless = True
                break
            if is_ip(address):  # CIDRs are valid ServiceEntry addresses but no DNS answer
                ips.append(address)
        if headless and svc.resolution is Resolution.PASSTHROUGH and svc.ports:
            ips += _headless_ips(svc, endpoints_by_hostname.get(svc.hostname, ()), proxy, entries)
        if ips:
            _merge(entries, svc, ips)
    return NameTable(
        table={
            host: NameTable.NameInfo(ips=e.ips, registry=e.registry, shortname=e.shortname, namespace=e.namespace)
            for host, e in entries.items()
        }
    )


def _addresses_for_proxy(svc: Service, proxy: ProxyInfo, v4: bool, v6: bool) -> list[str]:
    """istiod's GetAllAddressesForProxy: cluster VIPs, else auto-allocated, else the default."""
    addresses = list(svc.cluster_vips.get(proxy.cluster, ())) if proxy.cluster else []
    if not addresses and proxy.dns_capture:
        addresses = [a for a in (svc.auto_allocated_ipv4, svc.auto_allocated_ipv6) if a]
    if not (proxy.dual_stack_enabled and v4 and v6):
        addresses = _filter_families(addresses, v4, v6)
    if addresses:
        return addresses
    if not svc.default_address:
        return []
    if svc.cluster_vips:
        return _filter_families([svc.default_address], v4, v6)
    return [svc.default_address]


def _filter_families(addresses: list[str], v4: bool, v6: bool) -> list[str]:
    """Keep the proxy's families; a dual-stack proxy keeps the family of the first address."""
    if not addresses:
        return []
    fours = [a for a in addresses if v4 and _family(a) == 4]
    sixes = [a for a in addresses if v6 and _family(a) == 6]
    if v4 and v6:
        first = _family(addresses[0])
        if first == 4:
            return fours
        if first == 6:
            return sixes
    return fours or sixes


def _headless_ips(svc: Service, endpoints: Sequence[Endpoint], proxy: ProxyInfo, entries: dict[str, _Entry]) -> list[str]:
    """The service name's IPs from its endpoints; writes the per-pod names into `entries`.

    Endpoints are walked port by port (an endpoint slice may carry only some of the ports) and
    counted once, by first address. Pod names are made for every same-network endpoint, the
    service's IP list only takes same-cluster ones unless multicluster headless is on: a
    passthrough connection to another network cannot go through its gateway.
    """
    rest = svc.hostname.partition(".")[2]
    local: dict[str, list[str]] = {}
    remote: dict[str, list[str]] = {}
    shortnames: dict[str, str] = {}
    ips: list[str] = []
    seen: set[str] = set()
    for port in svc.ports:
        for ep in endpoints:
            if ep.ports and port not in ep.ports:
                continue
            if not ep.addresses or not all(is_ip(a) for a in ep.addresses):
                continue
            if ep.health is not Health.HEALTHY and not svc.publish_not_ready_addresses:
                continue
            if ep.addresses[0] in seen:
                continue
            seen.add(ep.addresses[0])
            same_network = _same_or_empty(proxy.network, ep.network)
            same_cluster = _same_or_empty(proxy.cluster, ep.cluster)
            if ep.subdomain and same_network:
                if not rest:  # a one-label service hostname has no domain to put pods under
                    continue
                shortname = f"{ep.hostname}.{ep.subdomain}"
                host = f"{shortname}.{rest}"
                shortnames[host] = shortname
                (local if same_cluster else remote).setdefault(host, []).extend(ep.addresses)
            if not same_network or not (same_cluster or proxy.multicluster_headless_enabled):
                continue
            ips += ep.addresses
    # A pod name answers with one cluster's pods: the proxy's own when it has that pod.
    for host, addrs in local.items():
        entries[host] = _Entry(addrs, svc.registry, shortnames[host], svc.namespace)
    for host, addrs in remote.items():
        if host not in entries:
            entries[host] = _Entry(addrs, svc.registry, shortnames[host], svc.namespace)
    return ips


def _merge(entries: dict[str, _Entry], svc: Service, ips: list[str]) -> None:
    """Add the service's hostname, or merge it into an entry another service made."""
    short_names = svc.registry is Registry.KUBERNETES and not svc.hostname.endswith(_CLUSTERSET_SUFFIX)
    entry = entries.get(svc.hostname)
    if entry is None:
        entries[svc.hostname] = (
            _Entry(ips, svc.registry, svc.name, svc.namespace) if short_names else _Entry(ips, svc.registry)
        )
    elif entry.registry != Registry.KUBERNETES:
        if svc.registry is Registry.KUBERNETES:  # a ServiceEntry decorating a Kubernetes service
            entry.ips, entry.registry = ips, svc.registry
            if short_names:
                entry.shortname, entry.namespace = svc.name, svc.namespace
        else:  # several ServiceEntries (or addresses) for one host
            entry.ips += ips


def proxy_families(ips: Iterable[str]) -> tuple[bool, bool]:
    """(supports IPv4, supports IPv6) as istiod's IP mode: no parseable IP counts as IPv4."""
    families = {f for f in map(_family, ips) if f}
    if families <= {4}:
        return True, False
    if families == {6}:
        return False, True
    return True, True


def _family(address: str) -> int | None:
    """4 or 6 for an IP or a CIDR (an IPv4-mapped IPv6 address is 6, as in Go), else None."""
    if "/" not in address:
        return ip_version(address)
    try:
        return ipaddress.ip_network(address, strict=False).version
    except ValueError:
        return None


def ip_version(address: str) -> int | None:
    """4 or 6 for an IP literal (not a CIDR, not a name), else None.

    IPv4 goes through inet_pton, which accepts exactly the dotted quads `ipaddress` accepts (no
    leading zeros, four parts) at a tenth of its cost: a mesh of 100,000 services checks a few
    addresses per service, and `ipaddress` alone was 7 s of loading one. IPv6 keeps
    `ipaddress`' rules (scope ids like `fe80::1%eth0`).
    """
    try:
        socket.inet_pton(socket.AF_INET, address)
        return 4
    except (OSError, ValueError):  # ValueError: an embedded NUL
        pass
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return None
    return 6


def is_ip(address: str) -> bool:
    """An IP literal (not a CIDR, not a name)."""
    return ip_version(address) is not None


def _same_or_empty(a: str, b: str) -> bool:
    """istiod's network and cluster match: an empty side matches anything."""
    return not a or not b or a == b
