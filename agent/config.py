"""The agent's configuration from pilot-agent's environment, PROXY_CONFIG and flags. Pure: the
environment and the checks of the files it names (root certificate, saved-table path) are passed in.

Names and defaults are pilot-agent's (docs/istio-compat.md "Agent settings and defaults"). Unlike
pilot-agent, a value that does not parse is an error naming the variable (Istio falls back to
the default with a warning, which hides typos).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pilotfish.common.settings import ConfigError, parse_bool, split_host_port

from .files import MISSING, root_cert_problem, saved_table_problem
from .meshconfig import MESH_CONFIG, ConfigSources, effective_proxy_config, with_defaults
from .nodemeta import NodeInputs, node_facts

DEFAULT_DISCOVERY = "istiod.istio-system.svc:15012"
DEFAULT_SERVER_NAME = "istiod.istio-system.svc"
DEFAULT_ROOT_CERT = "./var/run/secrets/istio/root-cert.pem"
LEGACY_ROOT_CERT = "./etc/certs/root-cert.pem"
TOKEN_FILE = "./var/run/secrets/tokens/istio-token"
DEFAULT_NAMETABLE_CACHE = "./var/lib/istio/data/nametable.pb"  # an emptyDir in the template: the root is read-only
PROXY_TYPES = ("sidecar", "router", "waypoint")


@dataclass(frozen=True)
class AgentConfig:
    """Who the proxy is and how it reaches the control plane."""

    proxy_type: str
    pod_name: str
    pod_namespace: str
    instance_ips: tuple[str, ...]
    service_account: str
    domain: str
    discovery_address: str
    server_name: str
    root_cert: str | None  # a PEM file, "SYSTEM", or None for plaintext (controlPlaneAuthPolicy NONE)
    token_file: str
    cluster_id: str
    xds_headers: tuple[tuple[str, str], ...]
    dns_enabled: bool
    status: tuple[str, int] | None  # (host, port) the status server listens on, "" every interface; None: off
    nametable_cache: str  # "" turns persistence off
    proxy_config: dict[str, object] = field(default_factory=dict)  # the fields the sources set (meshconfig.py)
    cluster: str = "istio-proxy"  # node.cluster
    locality: tuple[str, str, str] = ("", "", "")
    metadata: dict[str, object] = field(default_factory=dict)
    xds_client_cert: tuple[str, str] = ("", "")  # (key, chain) presented to the control plane if usable

    @property
    def node_id(self) -> str:
        """`<type>~<first IP>~<pod>.<namespace>~<domain>`, as pilot-agent builds it."""
        ip = self.instance_ips[0] if self.instance_ips else ""
        return f"{self.proxy_type}~{ip}~{self.pod_name}.{self.pod_namespace}~{self.domain}"


def _bool_env(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name, "")
    return parse_bool(value, name) if value else default


def discovery_address(flag: str | None, env: Mapping[str, str], pc: Mapping[str, object]) -> tuple[str, str]:
    """(address, which setting gave it): the flag, PILOT_DISCOVERY_ADDRESS, PROXY_CONFIG's
    discoveryAddress, or istiod's default. Validated as host:port."""
    for value, setting in ((flag, "--discovery-address"), (env.get("PILOT_DISCOVERY_ADDRESS"), "PILOT_DISCOVERY_ADDRESS"),
                           (pc.get("discoveryAddress"), "PROXY_CONFIG discoveryAddress")):
        if value:
            split_host_port(str(value), setting)
            return str(value), setting
    return DEFAULT_DISCOVERY, "default"


def server_name(address: str, env: Mapping[str, str]) -> str:
    """The name istiod's certificate must carry: ISTIOD_SAN, else the address's host, with
    localhost meaning istiod (a port-forward or a local control plane)."""
    if env.get("ISTIOD_SAN"):
        return env["ISTIOD_SAN"]
    host = split_host_port(address, "discovery address")[0]
    return DEFAULT_SERVER_NAME if "localhost" in host or not host else host


def xds_root(env: Mapping[str, str], pc: Mapping[str, object],
             problem: Callable[[str], str | None] = root_cert_problem) -> str | None:
    """The root certificate for the control-plane connection, in Istio's order (docs/istio-compat.md
    "Agent settings and defaults").

    Where Istio requires the file to exist, it must also be usable (`problem` says why not):
    a directory, an empty file or one without a PEM certificate would otherwise fail every TLS
    handshake, retried forever. `<PROV_CERT>/root-cert.pem` may be missing, as in Istio."""
    if str(pc.get("controlPlaneAuthPolicy", "MUTUAL_TLS")).upper() == "NONE":
        return None
    root = env.get("XDS_ROOT_CA", "")
    if root == "SYSTEM":
        return "SYSTEM"
    if root:
        return _usable(root, "XDS_ROOT_CA", problem(root))
    legacy = problem(LEGACY_ROOT_CERT)
    if legacy != MISSING:
        return _usable(LEGACY_ROOT_CERT, "legacy mounted root", legacy)
    if env.get("PROV_CERT"):
        prov = os.path.join(env["PROV_CERT"], "root-cert.pem")
        why = problem(prov)
        return prov if why == MISSING else _usable(prov, "PROV_CERT", why)
    if _bool_env(env, "FILE_MOUNTED_CERTS"):
        metadata = _metadata_of(pc)
        path = env.get("ISTIO_META_TLS_CLIENT_ROOT_CERT") or metadata.get("ISTIO_META_TLS_CLIENT_ROOT_CERT")
        if not path:
            raise ConfigError("FILE_MOUNTED_CERTS: ISTIO_META_TLS_CLIENT_ROOT_CERT is not set")
        return _usable(str(path), "ISTIO_META_TLS_CLIENT_ROOT_CERT", problem(str(path)))
    if env.get("PILOT_CERT_PROVIDER") == "none":
        raise ConfigError("PILOT_CERT_PROVIDER=none: no root certificate for the control plane (set XDS_ROOT_CA)")
    return _usable(DEFAULT_ROOT_CERT, "XDS_ROOT_CA (unset: the default)", problem(DEFAULT_ROOT_CERT))


def xds_client_cert(env: Mapping[str, str], pc: Mapping[str, object]) -> tuple[str, str]:
    """(key, chain) files of the client certificate for the control-plane connection, as Istio's
    GetKeyCertsForXDS names them: PROV_CERT's (where the agent keeps the certificate it is issued,
    OUTPUT_CERTS on a VM), or FILE_MOUNTED_CERTS' client certificate; ("", "") for none. Read at
    each connection, used only when valid (xds_client/clientcert.py)."""
    if str(pc.get("controlPlaneAuthPolicy", "MUTUAL_TLS")).upper() == "NONE":
        return "", ""
    if env.get("PROV_CERT"):
        return os.path.join(env["PROV_CERT"], "key.pem"), os.path.join(env["PROV_CERT"], "cert-chain.pem")
    if _bool_env(env, "FILE_MOUNTED_CERTS"):
        metadata = _metadata_of(pc)
        key = env.get("ISTIO_META_TLS_CLIENT_KEY") or metadata.get("ISTIO_META_TLS_CLIENT_KEY") or ""
        chain = env.get("ISTIO_META_TLS_CLIENT_CERT_CHAIN") or metadata.get("ISTIO_META_TLS_CLIENT_CERT_CHAIN") or ""
        return str(key), str(chain)
    return "", ""


def _usable(path: str, setting: str, problem: str | None) -> str:
    if problem is not None:
        raise ConfigError(f"{setting}: root CA file for XDS {problem}: {path}")
    return path


def saved_table(flag: str | None, env: Mapping[str, str], problem: Callable[[str], str | None]) -> str:
    """Where the name table is saved ('' for nowhere): the flag, PILOTFISH_NAMETABLE_CACHE, or
    the default; a path no save can ever use is an error now rather than a warning per table."""
    if flag is not None:
        path, setting = flag, "--nametable-cache"
    elif "PILOTFISH_NAMETABLE_CACHE" in env:
        path, setting = env["PILOTFISH_NAMETABLE_CACHE"], "PILOTFISH_NAMETABLE_CACHE"
    else:
        path, setting = DEFAULT_NAMETABLE_CACHE, "PILOTFISH_NAMETABLE_CACHE (unset: the default)"
    why = problem(path) if path else None
    if why is not None:
        raise ConfigError(f"{setting}: the saved name table's path {why}: {path}")
    return path


def _metadata_of(pc: Mapping[str, object]) -> Mapping[str, str]:
    metadata = pc.get("proxyMetadata")
    return metadata if isinstance(metadata, dict) else {}


_HEADER_NAME = re.compile(r"[0-9a-z_.-]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


def grpc_header_value(value: str, setting: str) -> str:
    """`value` if gRPC can send it as a header value: printable ASCII. gRPC refuses anything
    else at every stream (`INTERNAL: Invalid metadata`, retried forever), or, for bytes the
    environment could not decode, raises in the stream's thread and the agent dies."""
    if not _HEADER_VALUE.fullmatch(value):
        raise ConfigError(f"{setting}: not a valid gRPC header value (printable ASCII): {value!r}")
    return value


def xds_header(variable: str, value: str) -> tuple[str, str]:
    """XDS_HEADER_<NAME>=value as (NAME, value), checked as gRPC checks it: the name lower-cased
    is digits, letters, `-`, `_` and `.`; the value printable ASCII, but for a binary header
    (a name ending in `-bin`), whose bytes go as they are (transport.py), as Go's gRPC sends
    them for Istio's agent."""
    name = variable[len("XDS_HEADER_"):]
    if not _HEADER_NAME.fullmatch(name.lower()):
        raise ConfigError(f"{variable}: not a valid gRPC header name: {name!r}")
    return name, value if name.lower().endswith("-bin") else grpc_header_value(value, variable)


def status_address(listen: str | None, port: int | None, pc: Mapping[str, object]) -> tuple[str, int] | None:
    """Where the status server listens, as (host, port) with "" for every interface; None when
    it is off. `--status-listen [HOST]:PORT` first (port 0: one the kernel picks, which the log
    gives: for tests), else `--status-port` or PROXY_CONFIG's statusPort, 0 meaning off as in
    pilot-agent, default 15020 on every interface."""
    if listen is not None:
        host, number = split_host_port(listen, "--status-listen")
        if host:
            import ipaddress

            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"--status-listen: want an IP address or none, got {host!r}") from None
        return host, number
    value = port if port is not None else pc.get("statusPort", 15020)
    try:
        number = int(str(value))
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"status port: want 0-65535, got {value!r}") from None
    return ("", number) if number else None


def with_vm_defaults(env: Mapping[str, str], hostname: Callable[[], str] = socket.gethostname) -> dict[str, str]:
    """On a VM, Istio's istio-start.sh sets POD_NAME (the short host name), POD_NAMESPACE
    (ISTIO_NAMESPACE) and INSTANCE_IP (ISTIO_SVC_IP, when cluster.env has one) from cluster.env
    before it starts pilot-agent; the agent does the same when they are unset, so that its unit
    (deploy/vm/pilotfish.service) needs nothing beyond Istio's VM files. A pod's environment,
    without ISTIO_NAMESPACE, is left as it is."""
    out = dict(env)
    if not env.get("ISTIO_NAMESPACE"):
        return out
    out.setdefault("POD_NAMESPACE", env["ISTIO_NAMESPACE"])
    out.setdefault("POD_NAME", hostname().split(".", 1)[0])
    if env.get("ISTIO_SVC_IP"):
        out.setdefault("INSTANCE_IP", env["ISTIO_SVC_IP"])
    return out


EXCLUDE_INTERFACES_ANNOTATION = "traffic.sidecar.istio.io/excludeInterfaces"


def instance_ips(env: Mapping[str, str], interfaces: Sequence[tuple[str, str]],
                 annotations: Mapping[str, str]) -> tuple[str, ...]:
    """INSTANCE_IPS as pilot-agent orders them: INSTANCE_IP first (istiod takes the first as the
    pod's IP), then the interfaces' global addresses but those of the interfaces the pod
    annotation `traffic.sidecar.istio.io/excludeInterfaces` names, or the loopback addresses
    when there is none of either."""
    import ipaddress

    ips: list[str] = []
    instance_ip = env.get("INSTANCE_IP", "")
    if instance_ip:
        try:
            ips.append(str(ipaddress.ip_address(instance_ip)))
        except ValueError:
            raise ConfigError(f"INSTANCE_IP: not an IP address: {instance_ip!r}") from None
    excluded = {name.strip() for name in annotations.get(EXCLUDE_INTERFACES_ANNOTATION, "").split(",")}
    found = [ip for name, ip in interfaces if name not in excluded]
    return tuple(dict.fromkeys(ips + found)) or ("127.0.0.1", "::1")


def agent_config(
    env: Mapping[str, str],
    *,
    proxy_type: str = "sidecar",
    domain: str | None = None,
    discovery: str | None = None,
    status_port: int | None = None,
    status_listen: str | None = None,
    nametable_cache: str | None = None,
    interfaces: Sequence[tuple[str, str]] = (),
    mesh_config: str | None = None,
    mesh_config_path: str = MESH_CONFIG,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    root_problem: Callable[[str], str | None] = root_cert_problem,
    cache_problem: Callable[[str], str | None] = saved_table_problem,
) -> AgentConfig:
    """Validate everything; ConfigError names the variable or flag and the bad value.

    `interfaces` are (name, address) pairs; `mesh_config`, `labels` and `annotations` the
    contents of the files the injection template mounts (None: no file)."""
    if proxy_type not in PROXY_TYPES:
        raise ConfigError(f"proxy type: want one of {', '.join(PROXY_TYPES)}, got {proxy_type!r}")
    pc = effective_proxy_config(ConfigSources(mesh_config, mesh_config_path, env.get("PROXY_CONFIG", ""),
                                              annotations or {}))
    namespace = env.get("POD_NAMESPACE", "")
    pod = env.get("POD_NAME", "")
    ips = instance_ips(env, interfaces, annotations or {})
    address, _ = discovery_address(discovery, env, pc)
    dns_capture = _bool_env(env, "ISTIO_META_DNS_CAPTURE")
    dns_enabled = (dns_capture and proxy_type == "sidecar") or _bool_env(env, "ISTIO_META_ENABLE_DNS_SERVER")
    cluster_id = grpc_header_value(env.get("ISTIO_META_CLUSTER_ID", ""), "ISTIO_META_CLUSTER_ID")
    headers = tuple(sorted(xds_header(k, v) for k, v in env.items() if k.startswith("XDS_HEADER_")))
    cache = saved_table(nametable_cache, env, cache_problem)
    domain = domain or f"{namespace}.svc.cluster.local"
    name = server_name(address, env)
    facts = node_facts(NodeInputs(env, with_defaults({**pc, "discoveryAddress": address}), ips, name, labels,
                                  annotations, extra={"DNS_CAPTURE": "true"} if dns_capture else {}))
    return AgentConfig(
        proxy_type=proxy_type,
        pod_name=pod,
        pod_namespace=namespace,
        instance_ips=ips,
        service_account=env.get("SERVICE_ACCOUNT", ""),
        domain=domain,
        discovery_address=address,
        server_name=name,
        root_cert=xds_root(env, pc, root_problem),
        token_file=TOKEN_FILE,
        cluster_id=cluster_id,
        xds_headers=headers,
        dns_enabled=dns_enabled,
        status=status_address(status_listen, status_port, pc),
        nametable_cache=cache,
        proxy_config=pc,
        cluster=facts.cluster,
        locality=facts.locality,
        metadata=facts.metadata,
        xds_client_cert=xds_client_cert(env, pc),
    )
