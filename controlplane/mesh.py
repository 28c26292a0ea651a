"""The mesh file: the Kubernetes Services and Istio ServiceEntries `pilotfish controlplane` serves.

A demo user writes it by hand (format in docs/controlplane.md, "The mesh file"), so the field
names are the ones they already know from Kubernetes and Istio, and every mistake is reported as
`FILE: services[2].clusterIPs[0]: '10.96.0.300' is not an IP address` rather than a traceback or,
worse, a name that silently does not resolve. The file is turned into istiod's model
(controlplane/nametable.py) once, when it is loaded; each proxy's NameTable is then built from
that model.

ServiceEntries without addresses get auto-allocated ones, as istiod does for DNS capture
(240.240.0.0/16 and 2001:2::/48). istiod's first allocator numbered the entries in order, so
adding or removing one renumbered the others and live connections went to the wrong host
(istio#44837). Here an address is derived from a hash of namespace/name/host, so it does not
depend on the rest of the file: a host can only move when a newly added host collides with it
(for IPv4 about 1 in 65,000 per addition, for IPv6 practically never).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml
from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.controlplane.document import load_document
from pilotfish.controlplane.nametable import (
    UNSPECIFIED_IP,
    Endpoint,
    Health,
    ProxyInfo,
    Registry,
    Resolution,
    Service,
    ServicePort,
    build_name_table,
    ip_version,
)
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

from .workloads import WorkloadEntry, WorkloadGroup

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_NAME = "Kubernetes"  # Istio's default CLUSTER_ID

_TOP_KEYS = ("clusterDomain", "clusterName", "services", "serviceEntries", "peerAuthentications", "workloadGroups")
_PEER_AUTHENTICATION_KEYS = ("name", "namespace", "mtls")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
ROOT_NAMESPACE = "istio-system"  # a PeerAuthentication here applies to the whole mesh (Istio's root namespace)
_SERVICE_KEYS = (
    "name",
    "namespace",
    "clusterIP",
    "clusterIPs",
    "headless",
    "externalName",
    "ports",
    "publishNotReadyAddresses",
    "endpoints",
    "selector",
)
_GROUP_KEYS = ("name", "namespace", "labels", "serviceAccount", "network", "ports", "probe")
# Istio's WorkloadGroup spec.probe (ReadinessProbe): timings and one check
_PROBE_TIMINGS = ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold")
_PROBE_CHECKS = ("httpGet", "tcpSocket", "exec", "grpc")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_SERVICE_ENTRY_KEYS = ("name", "namespace", "hosts", "addresses", "resolution", "ports", "endpoints")
_ENDPOINT_KEYS = ("addresses", "address", "hostname", "subdomain", "ready", "network", "cluster", "serviceAccount")
_PORT_KEYS = ("name", "protocol", "appProtocol", "targetPort")

# ServiceEntry resolution (Istio's enum) -> istiod's model resolution.
_RESOLUTIONS = {
    "NONE": Resolution.PASSTHROUGH,
    "STATIC": Resolution.CLIENT_SIDE_LB,
    "DNS": Resolution.DNS_LB,
    "DNS_ROUND_ROBIN": Resolution.DNS_ROUND_ROBIN_LB,
}

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"  # RFC 1123 label, as Kubernetes checks it
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # Service names
_DNS1123_LABEL = re.compile(_LABEL)
_DNS1123_SUBDOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_HOST_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(\.{_HOST_LABEL})*")
_HOST_PATTERN = re.compile(rf"(?=.{{1,253}}$)(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*")

# Auto-allocation ranges. IPv4 skips .0 and .255 in every /24, which some stacks refuse.
_V4_BASE = int(ipaddress.IPv4Address("240.240.0.0"))
_V4_SLOTS = 256 * 254
_V6_BASE = int(ipaddress.IPv6Address("2001:2::"))
_V6_SLOTS = 2**80 - 1  # the /48 without its network address


class MeshError(ValueError):
    """The mesh file cannot be used; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Mesh:
    """The mesh file in istiod's model: services in file order (Kubernetes Services first, then
    ServiceEntries) and their endpoints by hostname."""

    services: tuple[Service, ...]
    endpoints: Mapping[str, tuple[Endpoint, ...]]
    peer_authentication: Mapping[str, str] = field(default_factory=dict)  # namespace -> mode; "" mesh-wide
    workload_groups: Mapping[tuple[str, str], WorkloadGroup] = field(default_factory=dict)  # (ns, name)

    def mtls_mode(self, namespace: str) -> str:
        """Istio's PeerAuthentication without selectors: the namespace's mode, else the mesh's
        (the root namespace's), else PERMISSIVE; UNSET defers to the next level."""
        for key in (namespace, ""):
            mode = self.peer_authentication.get(key, "UNSET")
            if mode != "UNSET":
                return mode
        return "PERMISSIVE"

    def with_entries(self, entries: tuple[WorkloadEntry, ...]) -> Mesh:
        """This mesh with `entries` (auto-registered VMs) as endpoints of the Services whose
        selector matches their labels (Kubernetes' rule: same namespace, every selector label);
        each serves a port on its own port of the same name, else on the targetPort."""
        if not entries:
            return self
        endpoints = dict(self.endpoints)
        for svc in self.services:
            if not svc.selector:
                continue
            for entry in entries:
                if entry.selected_by(svc.namespace, svc.selector):
                    remap = tuple((spec.port, entry.ports[spec.name]) for spec in svc.port_specs
                                  if spec.name and spec.name in entry.ports)
                    endpoint = Endpoint(addresses=(entry.address,), network=entry.network, health=entry.health,
                                        service_account=entry.service_account, target_ports=remap)
                    endpoints[svc.hostname] = (*endpoints.get(svc.hostname, ()), endpoint)
        return replace(self, endpoints=endpoints)

    def name_table(self, proxy: ProxyInfo) -> NameTable:
        """The NameTable istiod would send `proxy` for this mesh."""
        return build_name_table(self.services, self.endpoints, proxy)


# A mesh of 100,000 services is ~20 MB of YAML or JSON (bench/controlplane_bench.py); 64 MiB
# leaves three times that. Not more: libyaml scans one scalar, and json.loads a whole file, in
# one C call that holds the GIL, so SIGTERM waits for it (a 300 MB JSON file: 15 s; a 600 MB
# scalar: 5.7 s); at 64 MiB the worst is about a second (docs/controlplane.md).
MESH_FILE_LIMIT = 64 << 20


def load_mesh(path: str | Path) -> Mesh:
    """Read and parse a mesh file; MeshError (naming the file) if it cannot be read or used."""
    try:
        text = read_regular_file(str(path), MESH_FILE_LIMIT).decode("utf-8")
    except (UnreadableFile, UnicodeDecodeError) as e:
        raise MeshError(f"{path}: cannot read: {e}") from None
    return parse_mesh(text, source=str(path))


def parse_mesh(text: str, source: str = "<mesh>") -> Mesh:
    """Parse mesh-file text; `source` names it in error messages."""
    try:
        document = load_document(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise MeshError(f"{source}: {where}not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise MeshError(f"{source}: not valid YAML: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure to read the file is a rejected file
        raise MeshError(f"{source}: cannot read: {_short(e)}") from None
    try:
        return _mesh(document)
    except _Invalid as e:
        raise MeshError(f"{source}: {e.path}: {e.message}" if e.path else f"{source}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - a value the model cannot take is a rejected file
        raise MeshError(f"{source}: cannot use: {_short(e)}") from None


def _short(err: Exception) -> str:
    """An error's kind and the start of its message: a scalar's constructor (an impossible date,
    `!!int abc`, a 5,000-digit integer) fails with ValueError and the like, and a running control
    plane must reject that file, not die of it (PyYAML's own messages can quote the whole
    scalar, so they are cut)."""
    text = str(err) if not isinstance(err, MemoryError) else "out of memory"
    return f"{type(err).__name__}: {text[:200]}"


def mesh_version(mesh: Mesh) -> str:
    """A short digest of the model: the same mesh gives the same version in every process and
    on every reload (comments and layout do not count), usable as the xDS version_info.

    The model's fields as JSON (json's C encoder; the dataclasses' repr took 1.1 s for 100,000
    services). The enums are str subclasses and encode as their values."""
    content = json.dumps(
        [[_SERVICE_FIELDS(s) for s in mesh.services],
         [(host, [_ENDPOINT_FIELDS(e) for e in eps]) for host, eps in sorted(mesh.endpoints.items())],
         sorted(mesh.peer_authentication.items()),
         [_group_fields(g) for _, g in sorted(mesh.workload_groups.items())]],
        separators=(",", ":"),
    )
    return hashlib.sha256(content.encode()).hexdigest()[:16]


_SERVICE_FIELDS = attrgetter(*Service.__slots__)


def _group_fields(group: WorkloadGroup) -> list[object]:
    return [group.name, group.namespace, sorted(group.labels.items()), group.service_account, group.network,
            sorted(group.ports.items()), json.dumps(group.probe, sort_keys=True)]
_ENDPOINT_FIELDS = attrgetter(*Endpoint.__slots__)


class _Invalid(Exception):
    """A fault at `path` (like `services[2].clusterIPs[0]`); parse_mesh adds the file name."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message


def _mesh(document: Any) -> Mesh:
    if document is None:  # an empty file: an empty mesh
        document = {}
    top = _mapping(document, "", _TOP_KEYS)
    domain = _string(top, "clusterDomain", "", default=DEFAULT_CLUSTER_DOMAIN)
    if not _HOSTNAME.fullmatch(domain):
        raise _Invalid("clusterDomain", f"{domain!r} is not a DNS domain")
    cluster = _string(top, "clusterName", "", default=DEFAULT_CLUSTER_NAME)
    if not cluster:
        raise _Invalid("clusterName", "must not be empty")

    services: list[Service] = []
    endpoints: dict[str, list[Endpoint]] = {}
    seen: dict[tuple[str, str], str] = {}
    for path, item in _items(top, "services", ""):
        svc, eps = _service(item, path, domain, cluster)
        _unique(seen, (svc.namespace, svc.name), path, "service")
        services.append(svc)
        endpoints.setdefault(svc.hostname, []).extend(eps)

    seen = {}
    for path, item in _items(top, "serviceEntries", ""):
        name, namespace, se_services, eps = _service_entry(item, path, cluster)
        _unique(seen, (namespace, name), path, "serviceEntry")
        services += se_services
        for hostname in dict.fromkeys(svc.hostname for svc in se_services):
            # once per host: a host has a Service per address, its endpoints are the entry's
            endpoints.setdefault(hostname, []).extend(eps)
    modes: dict[str, str] = {}
    for path, item in _items(top, "peerAuthentications", ""):
        namespace, mode = _peer_authentication(item, path)
        key = "" if namespace == ROOT_NAMESPACE else namespace
        if key in modes:
            raise _Invalid(path, f"a second PeerAuthentication for namespace {namespace!r} (one per namespace)")
        modes[key] = mode
    groups: dict[tuple[str, str], WorkloadGroup] = {}
    seen = {}
    for path, item in _items(top, "workloadGroups", ""):
        group = _workload_group(item, path)
        _unique(seen, (group.namespace, group.name), path, "workloadGroup")
        groups[(group.namespace, group.name)] = group
    return Mesh(tuple(_auto_allocate(services)), {h: tuple(eps) for h, eps in endpoints.items()}, modes, groups)


def _workload_group(data: Any, path: str) -> WorkloadGroup:
    """An Istio WorkloadGroup, flattened: its metadata labels, its template's service account,
    network and named ports, and its readiness probe (docs/controlplane.md "Auto-registration")."""
    item = _mapping(data, path, _GROUP_KEYS)
    # the entry's name is `<group>-<ip>[-network]`, a DNS-1123 subdomain of at most 253
    name = _name(item, "name", path, _DNS1123_SUBDOMAIN, "a resource name (a lower-case RFC 1123 subdomain)")
    namespace = _name(item, "namespace", path, _DNS1123_LABEL, "a namespace (a lower-case RFC 1123 label)")
    ports: dict[str, int] = {}
    raw_ports = item.get("ports")
    if raw_ports is not None:
        if not isinstance(raw_ports, dict):
            raise _Invalid(_at(path, "ports"), f"must be a mapping of port name to number, not {_show(raw_ports)}")
        for key, value in raw_ports.items():
            if not isinstance(key, str) or not _DNS1123_LABEL.fullmatch(key):
                raise _Invalid(_at(path, "ports"), f"{_show(key)} is not a port name (a lower-case RFC 1123 label)")
            ports[key] = _port_number(value, _at(_at(path, "ports"), key))
    probe = item.get("probe")
    return WorkloadGroup(
        name=name,
        namespace=namespace,
        labels=_labels(item, "labels", path),
        service_account=_service_account(item, path),
        network=_string(item, "network", path),
        ports=ports,
        probe=None if probe is None else _probe_spec(probe, _at(path, "probe")),
    )


def _labels(item: dict[str, Any], key: str, path: str) -> dict[str, str]:
    """A label map (Kubernetes' key and value syntax), for a group's labels or a selector."""
    value = item.get(key)
    if value is None:
        return {}
    at = _at(path, key)
    if not isinstance(value, dict):
        raise _Invalid(at, f"must be a mapping of label to value, not {_show(value)}")
    out: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or len(name) > 316 or not _LABEL_KEY.fullmatch(name):
            raise _Invalid(at, f"{_show(name)} is not a label name")
        if not isinstance(text, str) or not _LABEL_VALUE.fullmatch(text):
            raise _Invalid(_at(at, name), f"{_show(text)} is not a label value (a string of up to 63 "
                           "letters, digits, '-', '_', '.')")
        out[name] = text
    return dict(sorted(out.items()))  # the same labels in another order: the same mesh version


def _probe_spec(data: Any, path: str) -> dict[str, object]:
    """Istio's ReadinessProbe: the timings (whole numbers, 0 or more) and exactly one check."""
    item = _mapping(data, path, (*_PROBE_TIMINGS, *_PROBE_CHECKS))
    for key in _PROBE_TIMINGS:
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise _Invalid(_at(path, key), f"{_show(value)} is not a whole number of 0 or more")
    checks = [key for key in _PROBE_CHECKS if item.get(key) is not None]
    if len(checks) != 1:
        raise _Invalid(path, f"needs exactly one of {', '.join(_PROBE_CHECKS)}"
                       + (f" (has {', '.join(checks)})" if checks else ""))
    check, at = checks[0], _at(path, checks[0])
    if check == "exec":
        spec = _mapping(item[check], at, ("command",))
        command = [_string_value(v, p) for p, v in _items(spec, "command", at)]
        if not command or not command[0]:
            raise _Invalid(_at(at, "command"), "needs the command to run (a non-empty list)")
    else:
        keys = {"httpGet": ("path", "port", "host", "scheme", "httpHeaders"), "tcpSocket": ("port", "host"),
                "grpc": ("port", "service")}[check]
        spec = _mapping(item[check], at, keys)
        if spec.get("port") is None:
            raise _Invalid(at, "'port' is required")
        _port_number(spec["port"], _at(at, "port"))
        for key in ("path", "host", "service"):
            _string(spec, key, at)
        scheme = _string(spec, "scheme", at, default="HTTP")
        if scheme.upper() not in ("HTTP", "HTTPS"):
            raise _Invalid(_at(at, "scheme"), f"{scheme!r} is not HTTP or HTTPS")
        for p, header in _items(spec, "httpHeaders", at):
            fields = _mapping(header, p, ("name", "value"))
            if not _string(fields, "name", p):
                raise _Invalid(p, "'name' is required")
            _string(fields, "value", p)
    return dict(item)


def _peer_authentication(data: Any, path: str) -> tuple[str, str]:
    """(namespace, mode) of an Istio PeerAuthentication without a selector."""
    item = _mapping(data, path, _PEER_AUTHENTICATION_KEYS)
    namespace = _name(item, "namespace", path, _DNS1123_LABEL, "a namespace (a lower-case RFC 1123 label)")
    mtls = _mapping(item.get("mtls") or {}, _at(path, "mtls"), ("mode",))
    mode = _string(mtls, "mode", _at(path, "mtls"), default="UNSET")
    if mode not in MTLS_MODES:
        raise _Invalid(_at(_at(path, "mtls"), "mode"), f"unknown mode {mode!r} (expected one of {', '.join(MTLS_MODES)})")
    return namespace, mode


def _service(data: Any, path: str, domain: str, cluster: str) -> tuple[Service, list[Endpoint]]:
    """A Kubernetes Service: ClusterIP, headless or ExternalName."""
    item = _mapping(data, path, _SERVICE_KEYS)
    name = _name(item, "name", path, _DNS1035_LABEL, "a Service name (a lower-case RFC 1035 label)")
    namespace = _name(item, "namespace", path, _DNS1123_LABEL, "a namespace (a lower-case RFC 1123 label)")
    vips, headless = _cluster_ips(item, path)
    external = _string(item, "externalName", path)
    specs = _ports(item, path, "port")
    ports = tuple(spec.port for spec in specs)
    publish_not_ready = _bool(item, "publishNotReadyAddresses", path)
    selector = _labels(item, "selector", path)

    def service(resolution: Resolution, vips: tuple[str, ...] = ()) -> Service:
        return Service(
            hostname=f"{name}.{namespace}.svc.{domain}",
            registry=Registry.KUBERNETES,
            name=name,
            namespace=namespace,
            resolution=resolution,
            default_address=vips[0] if vips else UNSPECIFIED_IP,
            cluster_vips={cluster: vips} if vips else {},
            ports=ports,
            publish_not_ready_addresses=publish_not_ready,
            port_specs=specs,
            selector=selector,
        )

    if external:
        if not _HOSTNAME.fullmatch(external):
            raise _Invalid(_at(path, "externalName"), f"{external!r} is not a DNS name")
        for key in ("clusterIP", "clusterIPs", "headless", "endpoints", "selector"):
            if item.get(key) is not None:
                raise _Invalid(_at(path, key), "not allowed with externalName (an ExternalName service has no IPs)")
        # No NameTable entry, as in istiod: the name goes to kube-dns, which answers the CNAME.
        return service(Resolution.ALIAS), []
    if not headless and not vips:
        raise _Invalid(path, "needs clusterIPs (or clusterIP: None for a headless service, or externalName)")
    eps = [_endpoint(e, p, cluster, hostnames_ok=False) for p, e in _items(item, "endpoints", path)]
    if not ports:  # as Kubernetes; istiod would give a headless service without ports no entry
        raise _Invalid(path, "'ports' is required (at least one port)")
    if headless:
        return service(Resolution.PASSTHROUGH), eps
    return service(Resolution.CLIENT_SIDE_LB, vips), eps


def _cluster_ips(item: dict[str, Any], path: str) -> tuple[tuple[str, ...], bool]:
    """(VIPs, headless) from clusterIP / clusterIPs / headless, with Kubernetes' consistency rules."""
    single = _string(item, "clusterIP", path)
    plural = [(p, _string_value(v, p)) for p, v in _items(item, "clusterIPs", path)]
    headless = _bool(item, "headless", path)
    if single and plural and plural[0][1] != single:
        raise _Invalid(_at(path, "clusterIP"), f"{single!r} differs from clusterIPs[0] {plural[0][1]!r}")
    listed = plural or ([(_at(path, "clusterIP"), single)] if single else [])
    if any(value == "None" for _, value in listed):
        if len(listed) > 1:
            raise _Invalid(_at(path, "clusterIPs"), "'None' (headless) must be the only cluster IP")
        return (), True
    vips: list[str] = []
    for p, value in listed:
        vips.append(_ip(value, p))
    if len(vips) > 2 or len({ip_version(v) for v in vips}) < len(vips):
        raise _Invalid(_at(path, "clusterIPs"), "at most two cluster IPs, one IPv4 and one IPv6")
    if headless and vips:
        raise _Invalid(_at(path, "headless"), "a headless service has no cluster IPs")
    return tuple(vips), headless


def _service_entry(data: Any, path: str, cluster: str) -> tuple[str, str, list[Service], list[Endpoint]]:
    """An Istio ServiceEntry: one istiod service per host and address (per host without addresses)."""
    item = _mapping(data, path, _SERVICE_ENTRY_KEYS)
    name = _name(item, "name", path, _DNS1123_SUBDOMAIN, "a resource name (a lower-case RFC 1123 subdomain)")
    namespace = _name(item, "namespace", path, _DNS1123_LABEL, "a namespace (a lower-case RFC 1123 label)")
    hosts = [_host(_string_value(v, p), p) for p, v in _items(item, "hosts", path)]
    if not hosts:
        raise _Invalid(path, "'hosts' is required (at least one host)")
    addresses = [_ip_or_cidr(_string_value(v, p), p) for p, v in _items(item, "addresses", path)]
    resolution_name = _string(item, "resolution", path, default="NONE")
    if resolution_name not in _RESOLUTIONS:
        raise _Invalid(
            _at(path, "resolution"), f"unknown resolution {resolution_name!r} (expected one of {', '.join(_RESOLUTIONS)})"
        )
    resolution = _RESOLUTIONS[resolution_name]
    specs = _ports(item, path, "number")
    ports = tuple(spec.port for spec in specs)
    by_dns = resolution in (Resolution.DNS_LB, Resolution.DNS_ROUND_ROBIN_LB)
    eps = [_endpoint(e, p, cluster, hostnames_ok=by_dns) for p, e in _items(item, "endpoints", path)]
    if not ports:  # as Istio; istiod would give a NONE entry without addresses no DNS entry
        raise _Invalid(path, "'ports' is required (at least one port)")
    services = [
        Service(
            hostname=host,
            registry=Registry.EXTERNAL,
            name=name,
            namespace=namespace,
            resolution=resolution,
            default_address=address,
            ports=ports,
            port_specs=specs,
        )
        for host in hosts
        for address in (addresses or [UNSPECIFIED_IP])
    ]
    return name, namespace, services, eps


def _endpoint(data: Any, path: str, cluster: str, hostnames_ok: bool) -> Endpoint:
    """A pod or ServiceEntry endpoint. `cluster` defaults to the mesh's, as istiod's registries do."""
    item = _mapping(data, path, _ENDPOINT_KEYS)
    if "address" in item and "addresses" in item:
        raise _Invalid(_at(path, "address"), "give either address or addresses, not both")
    if "address" in item:
        raw = [(_at(path, "address"), _string_value(item["address"], _at(path, "address")))]
    else:
        raw = [(p, _string_value(v, p)) for p, v in _items(item, "addresses", path)]
        if not raw:
            raise _Invalid(path, "'addresses' is required")
    addresses = tuple(_address(v, p, hostnames_ok) for p, v in raw)
    hostname = _string(item, "hostname", path)
    subdomain = _string(item, "subdomain", path)
    for key, value in (("hostname", hostname), ("subdomain", subdomain)):
        if value and not _DNS1123_LABEL.fullmatch(value):
            raise _Invalid(_at(path, key), f"{value!r} is not a lower-case RFC 1123 label")
    if subdomain and not hostname:
        raise _Invalid(_at(path, "subdomain"), "needs a hostname too (the pod's name is <hostname>.<subdomain>)")
    return Endpoint(
        addresses=addresses,
        hostname=hostname,
        subdomain=subdomain,
        network=_string(item, "network", path),
        cluster=_string(item, "cluster", path, default=cluster),
        health=Health.HEALTHY if _bool(item, "ready", path, default=True) else Health.UNHEALTHY,
        service_account=_service_account(item, path),
    )


def _service_account(item: dict[str, Any], path: str) -> str:
    """The pod's service account (Kubernetes' default: `default`): its identity in the mesh."""
    account = _string(item, "serviceAccount", path, default="default")
    if not _DNS1123_SUBDOMAIN.fullmatch(account):
        raise _Invalid(_at(path, "serviceAccount"), f"{account!r} is not a service account name")
    return account


def _ports(item: dict[str, Any], path: str, number_key: str) -> tuple[ServicePort, ...]:
    """Ports as numbers, or as mappings the way the manifest spells them (`port` for a Service,
    `number` for a ServiceEntry), with Istio's protocol and the target port."""
    ports = []
    for p, value in _items(item, "ports", path):
        name, app_protocol, protocol, target = "", "", "", None
        if isinstance(value, dict):
            other = "number" if number_key == "port" else "port"
            if other in value:  # the other manifest kind's spelling
                raise _Invalid(_at(p, other), f"the port number is {number_key!r} here")
            port = _mapping(value, p, (number_key, *_PORT_KEYS))
            if port.get(number_key) is None:
                raise _Invalid(p, f"{number_key!r} is required")
            name = _string(port, "name", p)
            app_protocol = _string(port, "appProtocol", p)
            protocol = _string(port, "protocol", p)
            target = port.get("targetPort")
            at, value = _at(p, number_key), port[number_key]
        else:
            at = p
        number = _port_number(value, at)
        target_port = number if target is None else _port_number(target, _at(p, "targetPort"))
        # a Service's `protocol` is L4 (TCP, UDP); a ServiceEntry's is Istio's (HTTP, TCP, ...)
        istio = protocol if number_key == "number" else ""
        ports.append(ServicePort(number, istio_protocol(name, app_protocol or istio), target_port, name))
    return tuple(ports)


def _port_number(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _Invalid(path, f"{_show(value)} is not a port number (1-65535)")
    return value


# Istio's protocols by name (docs/istio-compat.md "istiod: sidecar service config"), as the
# sidecar config treats them here.
_HTTP_PROTOCOLS = {"http": "HTTP", "http2": "HTTP2", "grpc": "HTTP2", "grpc-web": "HTTP2",
                   "kubernetes.io/h2c": "HTTP2", "kubernetes.io/ws": "HTTP"}


def istio_protocol(name: str, app_protocol: str) -> str:
    """HTTP, HTTP2 or TCP: `appProtocol` when given, else the port name's prefix before `-`
    (`http-web`, `grpc`), as Istio's port naming; anything else is plain TCP (Istio would sniff
    an unnamed port; pilotfish does not)."""
    if app_protocol:
        return _HTTP_PROTOCOLS.get(app_protocol.lower(), "TCP")
    return _HTTP_PROTOCOLS.get(name.lower().split("-", 1)[0], "TCP")


def _auto_allocate(services: list[Service]) -> list[Service]:
    """The services with their auto-allocated addresses set, avoiding the addresses the file gives."""
    written = [
        a
        for s in services
        for a in (s.default_address, *(v for vips in s.cluster_vips.values() for v in vips))
        if "/" not in a  # CIDRs
    ]
    allocated = _allocate([_allocation_key(s) for s in services if _needs_address(s)], written)
    out = []
    for svc in services:
        if _needs_address(svc):
            v4, v6 = allocated[_allocation_key(svc)]
            svc = replace(svc, auto_allocated_ipv4=v4, auto_allocated_ipv6=v6)
        out.append(svc)
    return out


def _needs_address(svc: Service) -> bool:
    """istiod allocates for ServiceEntry hosts without addresses, except with resolution NONE (the
    original destination is kept, so an invented one would lead nowhere) and for wildcard hosts
    (no single name resolves to them)."""
    return (
        svc.registry is Registry.EXTERNAL
        and svc.default_address == UNSPECIFIED_IP
        and svc.resolution is not Resolution.PASSTHROUGH
        and not svc.hostname.startswith("*")
    )


def _allocation_key(svc: Service) -> str:
    return f"{svc.namespace}/{svc.name}/{svc.hostname}"


def _allocate(keys: list[str], written: list[str]) -> dict[str, tuple[str, str]]:
    """Stable addresses: key -> (IPv4, IPv6), none of them an address `written` in the file.

    Each key starts at the slot its hash picks and takes the next free one on a collision; keys
    are placed in sorted order, so the result depends only on the set of keys, and a key moves
    only when a newly added one (or a newly written address) collides with it.
    """
    taken4: set[int] = set()
    taken6: set[int] = set()
    for a in written:
        if ip_version(a) == 4:
            slot = _v4_slot(int.from_bytes(socket.inet_pton(socket.AF_INET, a), "big"))
            if slot is not None:
                taken4.add(slot)
        elif 0 <= (offset := int(ipaddress.IPv6Address(a)) - _V6_BASE - 1) < _V6_SLOTS:
            taken6.add(offset)
    out = {}
    for key in sorted(set(keys)):
        digest = hashlib.sha256(key.encode()).digest()
        slot4 = _probe(int.from_bytes(digest[:8], "big") % _V4_SLOTS, _V4_SLOTS, taken4)
        slot6 = _probe(int.from_bytes(digest[8:18], "big") % _V6_SLOTS, _V6_SLOTS, taken6)
        v4 = "" if slot4 is None else str(ipaddress.IPv4Address(_v4_address(slot4)))
        v6 = "" if slot6 is None else str(ipaddress.IPv6Address(_V6_BASE + 1 + slot6))
        out[key] = (v4, v6)
    return out


def _v4_address(slot: int) -> int:
    """Slot n is the n-th address of 240.240.0.0/16 not ending in .0 or .255."""
    return _V4_BASE + slot // 254 * 256 + slot % 254 + 1


def _v4_slot(address: int) -> int | None:
    """The slot of an IPv4 address (as an int), None if it is no slot."""
    offset = address - _V4_BASE
    if 0 <= offset < 65536 and 0 < offset % 256 < 255:
        return offset // 256 * 254 + offset % 256 - 1
    return None


def _probe(start: int, size: int, taken: set[int]) -> int | None:
    """The first free slot from `start` on (wrapping), or None when the range is full."""
    if len(taken) >= size:
        return None
    slot = start
    while slot in taken:
        slot = (slot + 1) % size
    taken.add(slot)
    return slot


# --- reading YAML values, with the path of each in the errors ---------------------------------


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _mapping(value: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """`value` as a mapping with only `keys`: a misspelt key is an error, not a silent default."""
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping, not {_show(value)}")
    for key in value:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(keys)}"
            raise _Invalid(path, f"unknown key {str(key)!r} ({hint})")
    return value


def _items(item: dict[str, Any], key: str, path: str) -> list[tuple[str, Any]]:
    """The optional list `item[key]` as (path of element, element) pairs."""
    value = item.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(_at(path, key), f"must be a list, not {_show(value)}")
    at = _at(path, key)
    return [(f"{at}[{i}]", v) for i, v in enumerate(value)]


def _string_value(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, f"must be a string, not {_show(value)}")
    return value


def _string(item: dict[str, Any], key: str, path: str, default: str = "") -> str:
    value = item.get(key)
    if value is None:
        return default
    if isinstance(value, str):  # the path is only worked out for an error: 1M strings at 100k services
        return value
    return _string_value(value, _at(path, key))


def _bool(item: dict[str, Any], key: str, path: str, default: bool = False) -> bool:
    value = item.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(_at(path, key), f"must be true or false, not {_show(value)}")
    return value


def _name(item: dict[str, Any], key: str, path: str, pattern: re.Pattern[str], what: str) -> str:
    value = _string(item, key, path)
    if not value:
        raise _Invalid(path, f"{key!r} is required")
    if not pattern.fullmatch(value):
        raise _Invalid(_at(path, key), f"{value!r} is not {what}")
    return value


def _unique(seen: dict[tuple[str, str], str], key: tuple[str, str], path: str, kind: str) -> None:
    if key in seen:
        raise _Invalid(path, f"duplicate {kind} {key[0]}/{key[1]} (also {seen[key]})")
    seen[key] = path


def _host(value: str, path: str) -> str:
    if not _HOST_PATTERN.fullmatch(value):
        raise _Invalid(path, f"{value!r} is not a host name (like api.example.com or *.example.com)")
    return value


def _address(value: str, path: str, hostnames_ok: bool) -> str:
    """An endpoint address: an IP, or for DNS-resolved ServiceEntries also a host name."""
    if hostnames_ok and _HOSTNAME.fullmatch(value):
        return value
    canonical = _canonical_ip(value)
    if canonical is None:
        what = "an IP address or host name" if hostnames_ok else "an IP address"
        raise _Invalid(path, f"{value!r} is not {what}")
    return canonical


def _ip(value: str, path: str) -> str:
    """The address in canonical text form."""
    canonical = _canonical_ip(value)
    if canonical is None:
        raise _Invalid(path, f"{value!r} is not an IP address")
    return canonical


def _ip_or_cidr(value: str, path: str) -> str:
    """ServiceEntry addresses may be CIDRs (for TCP matching); those get no DNS entry."""
    if "/" not in value:
        canonical = _canonical_ip(value)
    else:
        try:
            canonical = str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            canonical = None
    if canonical is None:
        raise _Invalid(path, f"{value!r} is not an IP address or CIDR")
    return canonical


def _canonical_ip(value: str) -> str | None:
    """`value` as an IP address in canonical text (IPv6 compressed, lower case), None if it is
    not one. An IPv4 address inet_pton accepts is already canonical (four parts, no leading
    zeros), so only IPv6 pays for `ipaddress`."""
    version = ip_version(value)
    if version == 4:
        return value
    return None if version is None else str(ipaddress.IPv6Address(value))
