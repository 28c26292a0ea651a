"""Envoy's bootstrap, as pilot-agent writes it to ./etc/istio/proxy/envoy-rev.json: a pure
function of `BootstrapParams` to the JSON document, and an atomic write.

What is in it and why is in docs/envoy.md "The bootstrap"; the names, ports and values are
Istio's template's (docs/istio-compat.md "Envoy bootstrap"). Envoy gets everything else over
ADS from the agent's xDS socket: the bootstrap only says where that socket and the SDS socket
are, who this proxy is (the node), which stats exist, and the two listeners that must work
before any xDS arrives (15021 for kubelet's probes, 15090 for Prometheus).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pilotfish.common.atomic import write_atomic

CONFIG_PATH = "./etc/istio/proxy/envoy-rev.json"
XDS_SOCKET = "./etc/istio/proxy/XDS"
SDS_SOCKET = "./var/run/secrets/workload-spiffe-uds/socket"
PROFILE_PATH = "/var/lib/istio/data/envoy.prof"
UNLIMITED_CONNECTIONS = 2**31 - 1  # Go's math.MaxInt32: Istio's "no limit" for the overload manager

# Stats the agent itself reads (readiness, drain) must exist whatever the user's matcher says.
REQUIRED_PREFIXES = ("cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm")
RBAC_SUFFIXES = ("rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied")
DRAIN_SUFFIX = "downstream_cx_active"  # EXIT_ON_ZERO_ACTIVE_CONNECTIONS counts connections with it
REQUIRED_REGEXPS = (r"vhost\..*\.route\..*",)

TEXT_LOG_FORMAT = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"
JSON_LOG_FORMAT = {"time": "%Y-%m-%dT%T.%fZ", "level": "%l", "scope": "envoy %n", "msg": "%j",
                   "caller": "%g:%#", "thread": "%t"}

# Runtime flags Istio sets on every proxy; ProxyConfig.runtimeValues add to them, "" removes one.
DEFAULT_RUNTIME: Mapping[str, object] = {
    "re2.max_program_size.error_level": "32768",
    "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": True,
    "envoy.reloadable_features.http_reject_path_with_fragment": False,
    "envoy.reloadable_features.fixed_heap_use_allocated": True,
    "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update": False,
}

# Istio's tag extraction: the stat names Envoy produces become Prometheus labels.
STATS_TAGS: tuple[tuple[str, str], ...] = (
    ("cluster_name", r"^cluster(\.(.+);)"),
    ("http_conn_manager_prefix", r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)"),
    ("thread_name", r"^server(\.(.+))\.watchdog"),
    ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    ("response_code", r"_rq(_(\d{3}))$"),
    ("response_code_class", r"_rq(_(\dxx))$"),
    ("http_conn_manager_listener_prefix", r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
    ("listener_address", r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
    ("mongo_prefix", r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"),
)
STATS_TAGS_AFTER_EXTRA: tuple[tuple[str, str], ...] = (
    ("cache", r"(cache\.(.+?)\.)"),
    ("component", r"(component\.(.+?)\.)"),
    ("tag", r"(tag\.(.+?);\.)"),
    ("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
    ("authz_enforce_result", r"rbac(\.(allowed|denied))"),
    ("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
    ("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
)

_HTTP2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}
_ROUTER: dict[str, object] = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# 15090's answers compressed as Prometheus asks (Accept-Encoding), in Istio's order of preference.
COMPRESSORS = (("brotli", "envoy.extensions.compression.brotli.compressor.v3.Brotli"),
               ("zstd", "envoy.extensions.compression.zstd.compressor.v3.Zstd"),
               ("gzip", "envoy.extensions.compression.gzip.compressor.v3.Gzip"))
STATS_CONTENT_TYPES = ("text/plain", "application/vnd.google.protobuf", "application/openmetrics-text",
                       "application/openmetrics-protobuf")


@dataclass(frozen=True)
class StatsInclusion:
    """The user's additions to the stats Envoy keeps (ProxyConfig.proxyStatsMatcher or the
    sidecar.istio.io/stats* annotations), extra tags (ProxyConfig.extraStatTags and the
    sidecar.istio.io/extraStatTags annotation) and histogram buckets per stat prefix (the
    sidecar.istio.io/statsHistogramBuckets annotation); the required inclusions are always
    added. `{pod_ip}` in a pattern stands for each instance IP."""

    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    regexps: tuple[str, ...] = ()
    extra_tags: tuple[str, ...] = ()
    histogram_buckets: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (prefix, bucket bounds), by prefix


@dataclass(frozen=True)
class BootstrapParams:
    """Everything the bootstrap depends on; the integrator builds the node's metadata."""

    node_id: str
    node_cluster: str
    node_metadata: Mapping[str, object]  # JSON values
    instance_ips: tuple[str, ...]  # decides IPv4, IPv6 or dual stack
    admin_port: int = 15000  # proxyAdminPort; 0: Envoy picks (tests; see EnvoyPart)
    status_port: int = 15020  # the agent's status server, behind Envoy's 15021
    envoy_status_port: int = 15021  # ENVOY_STATUS_PORT
    envoy_prometheus_port: int = 15090  # ENVOY_PROMETHEUS_PORT
    xds_socket: str = XDS_SOCKET
    sds_socket: str = SDS_SOCKET
    delta_xds: bool = True  # ISTIO_DELTA_XDS
    dual_stack: bool = False  # ISTIO_DUAL_STACK
    log_as_json: bool = False  # --log_as_json
    exit_on_zero_active_connections: bool = False  # keeps the downstream_cx_active stats the drain counts
    metrics_localhost_only: bool = False  # METRICS_LOCALHOST_ACCESS_ONLY: 15090 on localhost only
    runtime_values: Mapping[str, str] = field(default_factory=dict)  # ProxyConfig.runtimeValues
    stats: StatsInclusion = StatsInclusion()
    max_downstream_connections: int = UNLIMITED_CONNECTIONS
    locality: Mapping[str, str] = field(default_factory=dict)  # region, zone, sub_zone
    stats_flush_interval: float | None = None  # seconds; sidecar.istio.io/statsFlushInterval (Envoy's 5 s)
    stats_eviction_interval: int | None = None  # seconds; sidecar.istio.io/statsEvictionInterval (none)
    stats_compression: bool = True  # ProxyConfig.statsCompression: 15090 compresses its answers
    status_proxy_protocol: bool = False  # ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL: 15021 behind a PROXY-protocol LB
    fips_140_2: bool = False  # COMPLIANCE_POLICY=fips-140-2
    strip_fragment: bool = True  # HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED
    outlier_log_path: str = ""  # node metadata OUTLIER_LOG_PATH (--outlierLogPath): outlier ejection events


@dataclass(frozen=True)
class Addresses:
    """Localhost and wildcard for the proxy's IP family; the additional ones in dual stack."""

    localhost: str
    wildcard: str
    additional_localhost: str | None = None
    additional_wildcard: str | None = None

    @property
    def ip_version(self) -> str:
        """Envoy's --local-address-ip-version."""
        return "v6" if self.localhost == "::1" and self.additional_localhost is None else "v4"


V4 = Addresses("127.0.0.1", "0.0.0.0")
V6 = Addresses("::1", "::")


def addresses(instance_ips: Iterable[str], dual_stack: bool) -> Addresses:
    """IPv4 when every instance IP is IPv4, IPv6 when every one is IPv6, else dual stack if
    ISTIO_DUAL_STACK (the first IP's family first) or IPv4. Unparsable entries are skipped, an
    empty list is IPv4 (docs/istio-compat.md "Envoy bootstrap")."""
    parsed = []
    for ip in instance_ips:
        try:
            parsed.append(ipaddress.ip_address(ip.split("%", 1)[0]))
        except ValueError:
            continue
    if all(a.version == 4 for a in parsed):
        return V4
    if all(a.version == 6 for a in parsed):
        return V6
    if not dual_stack:
        return V4
    first = parsed[0]
    if first.version == 6 and not first.is_link_local:
        return Addresses("::1", "::", "127.0.0.1", "0.0.0.0")
    return Addresses("127.0.0.1", "0.0.0.0", "::1", "::")


def listener_name(address: str, port: int, role: str) -> str:
    """Istio's `<address>_<port>`; with port 0 (Envoy picks, in tests) the role keeps the two
    static listeners' names apart."""
    return f"{address}_{port}" if port else f"{address}_0_{role}"


def runtime_flags(params: BootstrapParams) -> dict[str, object]:
    """Istio's default flags (two more under COMPLIANCE_POLICY=fips-140-2 and
    HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED=false) with ProxyConfig.runtimeValues
    applied: "" removes a flag, "true"/"false" become booleans (Envoy no longer takes booleans
    as strings)."""
    flags = dict(DEFAULT_RUNTIME)
    if params.fips_140_2:  # google_grpc clients (none here: Envoy reaches the agent over envoy_grpc) at TLS 1.2
        flags["envoy.reloadable_features.google_grpc_disable_tls_13"] = True
    if not params.strip_fragment:  # a string, as Istio writes it
        flags["envoy.reloadable_features.http_strip_fragment_from_path_unsafe_if_disabled"] = "false"
    values = params.runtime_values
    for name, value in values.items():
        if value == "":
            flags.pop(name, None)
        else:
            flags[name] = {"true": True, "false": False}.get(value, value)
    return flags


def _with_ips(patterns: Iterable[str], ips: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for pattern in patterns:
        out += [pattern.replace("{pod_ip}", ip) for ip in ips] if "{pod_ip}" in pattern else [pattern]
    return out


def stats_config(params: BootstrapParams) -> dict[str, object]:
    stats = params.stats
    suffixes = (*stats.suffixes, *RBAC_SUFFIXES, *((DRAIN_SUFFIX,) if params.exit_on_zero_active_connections else ()))
    patterns: list[dict[str, object]] = [{"prefix": "reporter="}]
    patterns += [{"prefix": p} for p in _with_ips((*stats.prefixes, *REQUIRED_PREFIXES), params.instance_ips)]
    patterns += [{"suffix": s} for s in _with_ips(suffixes, params.instance_ips)]
    patterns += [{"safe_regex": {"regex": r}} for r in _with_ips((*stats.regexps, *REQUIRED_REGEXPS),
                                                                 params.instance_ips)]
    patterns += [{"prefix": "component"}, {"prefix": "istio"}]
    extra = [(tag, f"({tag}=\\.=(.*?);\\.;)") for tag in dict.fromkeys(t for t in stats.extra_tags if t)]
    tags = [*STATS_TAGS, *extra, *STATS_TAGS_AFTER_EXTRA]
    config: dict[str, object] = {
        "use_all_default_tags": False,
        "stats_tags": [{"tag_name": name, "regex": regex} for name, regex in tags],
    }
    if stats.histogram_buckets:
        config["histogram_bucket_settings"] = [{"match": {"prefix": prefix}, "buckets": list(bounds)}
                                               for prefix, bounds in stats.histogram_buckets]
    config["stats_matcher"] = {"inclusion_list": {"patterns": patterns}}
    return config


def duration(seconds: float) -> str:
    """A protobuf JSON duration (`5s`, `0.25s`): Envoy takes seconds only, not Go's `1m0s`."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _socket(address: str, port: int) -> dict[str, object]:
    return {"socket_address": {"protocol": "TCP", "address": address, "port_value": port}}


def _static_cluster(name: str, address: dict[str, object], connect_timeout: str,
                    **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "alt_stat_name": f"{name};",
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        **extra,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }


def _grpc_pipe_cluster(name: str, path: str, **extra: object) -> dict[str, object]:
    """A gRPC server on a unix socket: STATIC, a plain path, HTTP/2 (without HTTP/2 Envoy
    starts anyway and the stream never works)."""
    return _static_cluster(name, {"pipe": {"path": path}}, "1s", typed_extension_protocol_options=_HTTP2, **extra)


def clusters(params: BootstrapParams, addr: Addresses) -> list[dict[str, object]]:
    xds_limits = {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
    xds_protocol = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        **_HTTP2["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"],
        "common_http_protocol_options": {"max_requests_per_connection": 1}}}
    return [
        _static_cluster("prometheus_stats", _socket(addr.localhost, params.admin_port), "0.250s"),
        _static_cluster("agent", _socket(addr.localhost, params.status_port), "0.250s"),
        _grpc_pipe_cluster("sds-grpc", params.sds_socket),
        _static_cluster(
            "xds-grpc", {"pipe": {"path": params.xds_socket}}, "1s",
            circuit_breakers={"thresholds": [{"priority": "DEFAULT", **xds_limits}, {"priority": "HIGH", **xds_limits}]},
            upstream_connection_options={"tcp_keepalive": {"keepalive_time": 300}},
            typed_extension_protocol_options=xds_protocol,
        ),
    ]


def compressors() -> list[dict[str, object]]:
    """The compressor filters of Istio's 15090 (ProxyConfig.statsCompression, on by default):
    a scrape of a busy proxy's stats is megabytes of text."""
    return [{
        "name": f"envoy.filters.http.compressor.{name}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
            "compressor_library": {"name": f"stats_{name}", "typed_config": {"@type": f"type.googleapis.com/{url}"}},
            "response_direction_config": {"common_config": {"content_type": list(STATS_CONTENT_TYPES)}},
        },
    } for name, url in COMPRESSORS]


def _http_listener(name: str, address: str, extra: str | None, port: int, stat_prefix: str, prefix: str,
                   cluster: str, filters: list[dict[str, object]] | None = None,
                   proxy_protocol: bool = False) -> dict[str, object]:
    """A listener routing one path prefix to a static cluster; never limited by the overload
    manager or the global connection limit (kubelet's probe and Prometheus must get through)."""
    listener: dict[str, object] = {
        "name": name,
        "address": _socket(address, port),
        "ignore_global_conn_limit": True,
        "bypass_overload_manager": True,
    }
    if extra is not None:
        listener["additional_addresses"] = [{"address": _socket(extra, port)}]
    if proxy_protocol:  # a load balancer's PROXY header is read when there is one, not required
        listener["listener_filters"] = [{"name": "envoy.listener.proxy_protocol", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
            "allow_requests_without_proxy_protocol": True}}]
    listener["filter_chains"] = [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "codec_type": "AUTO",
            "stat_prefix": stat_prefix,
            "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [
                {"match": {"prefix": prefix}, "route": {"cluster": cluster}}]}]},
            "http_filters": [*(filters or []), _ROUTER],
        },
    }]}]
    return listener


def listeners(params: BootstrapParams, addr: Addresses) -> list[dict[str, object]]:
    prom_port, status_port = params.envoy_prometheus_port, params.envoy_status_port
    if params.metrics_localhost_only:
        prom, prom_extra = addr.localhost, addr.additional_localhost
    else:
        prom, prom_extra = addr.wildcard, addr.additional_wildcard
    return [
        _http_listener(listener_name(prom, prom_port, "prometheus"), prom, prom_extra, prom_port, "stats",
                       "/stats/prometheus", "prometheus_stats", compressors() if params.stats_compression else None),
        _http_listener(listener_name(addr.wildcard, status_port, "status"), addr.wildcard, addr.additional_wildcard,
                       status_port, "agent", "/healthz/ready", "agent", proxy_protocol=params.status_proxy_protocol),
    ]


def _ads_source() -> dict[str, object]:
    """LDS and CDS over the ADS stream; wait for them however long it takes (Envoy's default
    15 s would turn it LIVE with no listeners and no clusters)."""
    return {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}


def bootstrap(params: BootstrapParams) -> dict[str, object]:
    """The bootstrap document (docs/envoy.md "The bootstrap")."""
    addr = addresses(params.instance_ips, params.dual_stack)
    # A waypoint always speaks delta (its metadata discovery needs it), as Istio's does.
    delta = params.delta_xds or params.node_id.startswith("waypoint~")
    log_format: dict[str, object] = {"json_format": dict(JSON_LOG_FORMAT)} if params.log_as_json else \
        {"text_format": TEXT_LOG_FORMAT}
    locality = {k: params.locality[k] for k in ("region", "zone", "sub_zone") if params.locality.get(k)}
    return {
        "application_log_config": {"log_format": log_format},
        "node": {"id": params.node_id, "cluster": params.node_cluster, "locality": locality,
                 "metadata": dict(params.node_metadata)},
        "layered_runtime": {"layers": [
            {"name": "global config", "static_layer": runtime_flags(params)},
            {"name": "admin", "admin_layer": {}},
        ]},
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
                "value": {"buffer_size_kb": 64},
            },
        }],
        **({"stats_flush_interval": duration(params.stats_flush_interval)}
           if params.stats_flush_interval is not None else {}),
        **({"stats_eviction_interval": f"{params.stats_eviction_interval}s"}
           if params.stats_eviction_interval is not None else {}),
        "stats_config": stats_config(params),
        "admin": {
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": "/dev/null"}}],
            "profile_path": PROFILE_PATH,
            "address": {"socket_address": {"address": addr.localhost, "port_value": params.admin_port}},
        },
        "dynamic_resources": {
            "lds_config": _ads_source(),
            "cds_config": _ads_source(),
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
        },
        "static_resources": {"clusters": clusters(params, addr), "listeners": listeners(params, addr)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3"
                         ".DownstreamConnectionsConfig",
                "max_active_downstream_connections": params.max_downstream_connections,
            },
        }]},
        **({"cluster_manager": {"outlier_detection": {"event_log_path": params.outlier_log_path},
                                "enable_deferred_cluster_creation": True}} if params.outlier_log_path else {}),
        "deferred_stat_options": {"enable_deferred_creation_stats": True},
    }


def write_bootstrap(path: str, doc: Mapping[str, object]) -> None:
    """Written whole or not at all; 0644 as Istio's (Envoy may run as another user)."""
    write_atomic(path, json.dumps(doc, indent=2).encode(), mode=0o644)
