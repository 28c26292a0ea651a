"""What running Envoy depends on, from the agent's sources (ProxyConfig, the environment, the
`proxy` flags), checked before anything starts: the bootstrap's inputs (`bootstrap_params`,
pure), and with them the command line (argv.py) and the drain settings (`envoy_settings`).
A bad value is a ConfigError naming the field, variable or annotation and the value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pilotfish.common.settings import ConfigError, parse_duration

from ..meshconfig import proxy_metadata
from .argv import PROXY_UID, bootstrap_override, concurrency, envoy_argv, envoy_binary, launcher, log_levels
from .bootstrap import SDS_SOCKET, UNLIMITED_CONNECTIONS, BootstrapParams, StatsInclusion, addresses
from .readers import env_bool, env_int, pc_bool, pc_duration, pc_int

CONFIG_FILE = "envoy-rev.json"  # in ProxyConfig.configPath (./etc/istio/proxy)
XDS_FILE = "XDS"  # the agent's xDS socket, in ProxyConfig.configPath too (Istio's XdsUdsPath)
ANNOTATION = "sidecar.istio.io/"  # the prefix of the pod annotations the bootstrap reads


@dataclass(frozen=True)
class DrainSettings:
    """How the agent stops Envoy (docs/envoy.md "Supervision and drain")."""

    termination_drain: float  # ProxyConfig.terminationDrainDuration: the wait after draining
    exit_on_zero_active: bool  # EXIT_ON_ZERO_ACTIVE_CONNECTIONS
    minimum_drain: float  # MINIMUM_DRAIN_DURATION: the wait before counting connections
    inbound_only: bool  # sidecars drain inbound listeners only; gateways all


@dataclass(frozen=True)
class EnvoySettings:
    argv: tuple[str, ...]
    config_path: str  # where the bootstrap is written, the `-c` of argv
    admin: tuple[str, int]  # Envoy's admin address
    known_listeners: frozenset[str]  # stats of listeners a drain does not wait for
    drain: DrainSettings
    params: BootstrapParams
    launcher: tuple[str, ...] = ()  # what execs Envoy: setpriv with the parent-death signal (supervisor.py)


def _strings(pc: Mapping[str, object], name: str) -> tuple[str, ...]:
    matcher = pc.get("proxyStatsMatcher")
    values = matcher.get(name, ()) if isinstance(matcher, dict) else ()
    return tuple(str(v) for v in values)


def pod_annotations(metadata: Mapping[str, object]) -> Mapping[str, str]:
    """The pod's annotations as the node metadata carries them (`ANNOTATIONS`), where Istio's
    bootstrap reads the sidecar.istio.io/stats* ones."""
    found = metadata.get("ANNOTATIONS")
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, Mapping) else {}


def _listed(text: str) -> tuple[str, ...]:
    return tuple(item for item in text.split(",") if item)


def histogram_buckets(text: str) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """sidecar.istio.io/statsHistogramBuckets: `{"<stat prefix>": [bound, ...]}`, by prefix."""
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{ANNOTATION}statsHistogramBuckets: not JSON: {err}: {text[:200]!r}") from None
    if not isinstance(raw, dict) or not all(
            isinstance(bounds, list) and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            for bounds in raw.values()):
        raise ConfigError(f"{ANNOTATION}statsHistogramBuckets: want {{\"prefix\": [numbers]}}, got {text[:200]!r}")
    return tuple((prefix, tuple(float(b) for b in raw[prefix])) for prefix in sorted(raw))


def stats_inclusion(pc: Mapping[str, object], annotations: Mapping[str, str]) -> StatsInclusion:
    """As Istio's bootstrap: each sidecar.istio.io/statsInclusion* annotation replaces (does not
    extend) ProxyConfig.proxyStatsMatcher's list of its kind; extra tags are
    ProxyConfig.extraStatTags then the annotation's (comma separated)."""
    def inclusions(kind: str) -> tuple[str, ...]:
        text = annotations.get(f"{ANNOTATION}statsInclusion{kind}", "")
        return _listed(text) if text else _strings(pc, f"inclusion{kind}")
    tags = pc.get("extraStatTags")
    configured = tuple(str(t) for t in tags if t) if isinstance(tags, list) else ()
    buckets = annotations.get(f"{ANNOTATION}statsHistogramBuckets")
    return StatsInclusion(inclusions("Prefixes"), inclusions("Suffixes"), inclusions("Regexps"),
                          (*configured, *_listed(annotations.get(f"{ANNOTATION}extraStatTags", ""))),
                          histogram_buckets(buckets) if buckets is not None else ())


def stats_intervals(annotations: Mapping[str, str]) -> tuple[float | None, int | None]:
    """sidecar.istio.io/statsFlushInterval and statsEvictionInterval (whole seconds, a multiple of
    the flush interval, Envoy's 5 s by default), each None when not annotated."""
    flush_text = annotations.get(f"{ANNOTATION}statsFlushInterval")
    flush = None if flush_text is None else parse_duration(flush_text, f"{ANNOTATION}statsFlushInterval")
    if flush is not None and flush < 0.001:
        raise ConfigError(f"{ANNOTATION}statsFlushInterval: want 1ms or more, got {flush_text!r}")
    eviction_text = annotations.get(f"{ANNOTATION}statsEvictionInterval")
    if eviction_text is None:
        return flush, None
    eviction = parse_duration(eviction_text, f"{ANNOTATION}statsEvictionInterval")
    every = flush if flush is not None else 5.0
    if eviction < 1 or eviction != int(eviction) or round(eviction * 1000) % round(every * 1000):
        raise ConfigError(f"{ANNOTATION}statsEvictionInterval: want whole seconds, a multiple of the flush "
                          f"interval ({every:g}s), got {eviction_text!r}")
    return flush, int(eviction)


@dataclass(frozen=True)
class EnvoyInputs:
    """The agent's configuration the settings are made from (agent/config.py's AgentConfig)."""

    proxy_type: str
    node_id: str
    cluster: str
    locality: tuple[str, str, str]
    metadata: Mapping[str, object]
    instance_ips: tuple[str, ...]
    proxy_config: Mapping[str, object]  # the effective ProxyConfig with Istio's defaults
    status_port: int  # the agent's
    sds_socket: str = SDS_SOCKET


def connection_limit(pc: Mapping[str, object], env: Mapping[str, str]) -> int:
    """The overload manager's global downstream connection limit, in Istio's precedence:
    ProxyConfig.connectionSettings.globalDownstreamConnectionLimit when above 0, then
    ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS (ProxyConfig.proxyMetadata, or the environment
    the injector puts it in), then the deprecated runtimeValues
    `overload.global_downstream_max_connections`, else Go's MaxInt32 (no limit)."""
    settings = pc.get("connectionSettings")
    if isinstance(settings, Mapping) and settings.get("globalDownstreamConnectionLimit") is not None:
        field = "connectionSettings.globalDownstreamConnectionLimit"
        limit = pc_int({field: settings["globalDownstreamConnectionLimit"]}, field, 0, 0, UNLIMITED_CONNECTIONS)
        if limit > 0:
            return limit
    name = "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS"
    meta = {**env, **proxy_metadata(pc)}
    if meta.get(name):
        return env_int(meta, name, UNLIMITED_CONNECTIONS, 0, UNLIMITED_CONNECTIONS, "a number")
    runtime = pc.get("runtimeValues")
    flag = "overload.global_downstream_max_connections"
    if isinstance(runtime, Mapping) and runtime.get(flag):
        return pc_int({f"runtimeValues {flag}": runtime[flag]}, f"runtimeValues {flag}", 0, 0, UNLIMITED_CONNECTIONS)
    return UNLIMITED_CONNECTIONS


def config_dir(pc: Mapping[str, object]) -> str:
    """ProxyConfig.configPath: where Istio puts both the bootstrap and the agent's xDS socket."""
    return str(pc.get("configPath") or "./etc/istio/proxy")


def bootstrap_params(inputs: EnvoyInputs, env: Mapping[str, str], *, log_as_json: bool = False) -> BootstrapParams:
    """The bootstrap's inputs from the agent's (ProxyConfig, the node, the pod's annotations in
    the node metadata, the environment), each checked: a bad one is a ConfigError naming it."""
    pc = inputs.proxy_config
    runtime = pc.get("runtimeValues")
    region, zone, subzone = inputs.locality
    annotations = pod_annotations(inputs.metadata)
    flush, eviction = stats_intervals(annotations)
    return BootstrapParams(
        node_id=inputs.node_id, node_cluster=inputs.cluster, node_metadata=inputs.metadata,
        instance_ips=inputs.instance_ips, admin_port=pc_int(pc, "proxyAdminPort", 15000, 1, 65535),
        status_port=inputs.status_port,
        envoy_status_port=env_int(env, "ENVOY_STATUS_PORT", 15021, 1, 65535, "a port number"),
        envoy_prometheus_port=env_int(env, "ENVOY_PROMETHEUS_PORT", 15090, 1, 65535, "a port number"),
        xds_socket=os.path.join(config_dir(pc), XDS_FILE), sds_socket=inputs.sds_socket, delta_xds=env_bool(env, "ISTIO_DELTA_XDS", True),
        dual_stack=env_bool(env, "ISTIO_DUAL_STACK", False), log_as_json=log_as_json,
        exit_on_zero_active_connections=env_bool(env, "EXIT_ON_ZERO_ACTIVE_CONNECTIONS", False),
        # Istio reads it from ProxyConfig.proxyMetadata (which the injector also puts in the environment)
        metrics_localhost_only=env_bool({**env, **proxy_metadata(pc)}, "METRICS_LOCALHOST_ACCESS_ONLY", False),
        runtime_values={str(k): str(v) for k, v in runtime.items()} if isinstance(runtime, dict) else {},
        stats=stats_inclusion(pc, annotations),
        max_downstream_connections=connection_limit(pc, env),
        locality={"region": region, "zone": zone, "sub_zone": subzone},
        stats_flush_interval=flush, stats_eviction_interval=eviction,
        stats_compression=pc_bool(pc, "statsCompression", True),
        status_proxy_protocol=env_bool(env, "ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL", False),
        outlier_log_path=str(inputs.metadata.get("OUTLIER_LOG_PATH") or ""),
        fips_140_2=env.get("COMPLIANCE_POLICY", "") == "fips-140-2",
        strip_fragment=env_bool(env, "HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED", True),
    )


def envoy_settings(inputs: EnvoyInputs, env: Mapping[str, str], *, log_level: str = "warning",
                   component_log_level: str = "misc:error", concurrency_flag: int = 0,
                   log_as_json: bool = False, uid: int | None = None) -> EnvoySettings:
    """`uid`: the agent's (os.getuid() by default): an agent running as root to serve DNS on
    port 53 (`DNS_PROXY_ADDR` ending in `:53`, the VM set-up) runs Envoy as 1337, as
    pilot-agent does, so that capture leaves Envoy's own traffic alone."""
    pc = inputs.proxy_config
    params = bootstrap_params(inputs, env, log_as_json=log_as_json)
    addr = addresses(inputs.instance_ips, params.dual_stack)
    config_path = os.path.join(config_dir(pc), CONFIG_FILE)
    argv = envoy_argv(envoy_binary(pc), config_path, drain_duration=pc_duration(pc, "drainDuration", "45s"),
                      ip_version=addr.ip_version, concurrency=concurrency(pc, env, concurrency_flag),
                      log_args=log_levels(log_level, component_log_level), pc=pc, env=env,
                      override=bootstrap_override(env))
    # Envoy names a listener's stats after its address: 0.0.0.0_15021, [__]_15021 for [::]:15021
    known = frozenset({"listener.admin.downstream_cx_active", "listener.admin.main_thread.downstream_cx_active",
                       *(f"listener.{host}_{port}.downstream_cx_active" for host in ("0.0.0.0", "[__]", "127.0.0.1",
                                                                                      "[__1]")
                         for port in (params.envoy_status_port, params.envoy_prometheus_port))})
    drain = DrainSettings(
        termination_drain=pc_duration(pc, "terminationDrainDuration", "5s"),
        exit_on_zero_active=params.exit_on_zero_active_connections,
        minimum_drain=parse_duration(env.get("MINIMUM_DRAIN_DURATION", "5s"), "MINIMUM_DRAIN_DURATION"),
        inbound_only=inputs.proxy_type == "sidecar",
    )
    as_root = (os.getuid() if uid is None else uid) == 0 and env.get("DNS_PROXY_ADDR", "").endswith(":53")
    return EnvoySettings(tuple(argv), config_path, (addr.localhost, params.admin_port), known, drain, params,
                         launcher(PROXY_UID if as_root else None))
