"""The node the proxy presents to the control plane: id, cluster, locality and metadata, as
pilot-agent's `GetNodeMetaData` builds them (docs/istio-compat.md "Node metadata"). Pure.

istiod reads the metadata for identity checks (NAMESPACE, SERVICE_ACCOUNT), for the workload's
labels (LABELS: VMs, locality, telemetry), for listener generation (ENVOY_STATUS_PORT,
ENVOY_PROMETHEUS_PORT, INTERCEPTION_MODE) and for the effective ProxyConfig (PROXY_CONFIG).
Envoy sends the same node on its own streams (its bootstrap carries it, agent/envoy/bootstrap.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .meshconfig import proxy_metadata

log = logging.getLogger("pilotfish.agent")

META_PREFIX = "ISTIO_META_"
METAJSON_PREFIX = "ISTIO_METAJSON_"
POD_TEMPLATE_HASH = "pod-template-hash"  # a Deployment's label: not part of the workload's identity
LOCALITY_LABELS = ("topology.istio.io/locality", "istio-locality")
APP_LABELS = ("app", "app.kubernetes.io/name", "service.istio.io/canonical-name")  # labels.GetApp's order
MAX_METAJSON = 64 * 1024  # bytes of one ISTIO_METAJSON_* value (an env var; Istio sets no bound)


@dataclass(frozen=True)
class NodeInputs:
    """What the metadata is made of, read by the caller (environment, downward API files)."""

    env: Mapping[str, str]
    proxy_config: Mapping[str, object]  # the effective ProxyConfig with Istio's defaults (meshconfig.py)
    instance_ips: Sequence[str]
    pilot_san: str
    labels: Mapping[str, str] | None = None  # None: no labels file
    annotations: Mapping[str, str] | None = None
    envoy_status_port: int = 15021
    envoy_prometheus_port: int = 15090
    extra: Mapping[str, object] = field(default_factory=dict)  # pilotfish's own (DNS_CAPTURE, ...)


@dataclass(frozen=True)
class NodeFacts:
    cluster: str
    locality: tuple[str, str, str]  # region, zone, subzone ("" where unknown)
    metadata: dict[str, object]


def _metajson(env: Mapping[str, str]) -> tuple[dict[str, object], dict[str, str]]:
    """ISTIO_METAJSON_* objects merged into the top level (Go unmarshals each into the whole map),
    and ISTIO_METAJSON_LABELS as the static labels; one that does not parse is skipped with a
    warning, as Istio's."""
    merged: dict[str, object] = {}
    static: dict[str, str] = {}
    for name in sorted(env):
        if not name.startswith(METAJSON_PREFIX):
            continue
        value = env[name]
        try:
            if len(value) > MAX_METAJSON:
                raise ValueError(f"over {MAX_METAJSON} bytes")
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError(f"want a JSON object, got {type(parsed).__name__}")
        except (ValueError, RecursionError) as err:
            log.warning("agent: %s: not used: %s", name, " ".join(str(err).split())[:200])
            continue
        merged.update(parsed)
        if name == METAJSON_PREFIX + "LABELS":
            static = {str(k): str(v) for k, v in parsed.items() if isinstance(v, (str, int, float))}
    return merged, static


def sanitize_locality(label: str) -> str:
    """`region.zone.subzone` (a label cannot hold `/`) as `region/zone/subzone`."""
    return label if "/" in label else label.replace(".", "/")


def split_locality(locality: str) -> tuple[str, str, str]:
    parts = locality.split("/", 2) + ["", ""]
    return parts[0], parts[1], parts[2]


def service_cluster(pc: Mapping[str, object], labels: Mapping[str, str], workload: str, namespace: str) -> str:
    """node.cluster (Istio's getServiceCluster for a serviceCluster, the default): the
    configured name unless it is `istio-proxy`, else `<app>.<namespace>` from the app label,
    `<workload>.<namespace>`, `istio-proxy.<namespace>`."""
    name = str(pc.get("serviceCluster", "istio-proxy") or "")
    if name and name != "istio-proxy":
        return name
    for label in APP_LABELS:
        if labels.get(label):
            return f"{labels[label]}.{namespace}"
    if workload:
        return f"{workload}.{namespace}"
    return f"istio-proxy.{namespace}" if namespace else "istio-proxy"


def node_facts(inputs: NodeInputs) -> NodeFacts:
    env, pc = inputs.env, inputs.proxy_config
    meta: dict[str, object] = {}
    for source in (proxy_metadata(pc), env):  # the environment wins
        for name, value in source.items():
            if name.startswith(META_PREFIX):
                meta[name[len(META_PREFIX):]] = value
    metajson, static_labels = _metajson(env)
    meta.update(metajson)
    if env.get("DNS_PROXY_ADDR"):
        meta["DNS_PROXY_ADDR"] = env["DNS_PROXY_ADDR"]
    meta.update(inputs.extra)
    meta["INSTANCE_IPS"] = ",".join(dict.fromkeys(inputs.instance_ips))
    meta["ENVOY_STATUS_PORT"] = inputs.envoy_status_port
    meta["ENVOY_PROMETHEUS_PORT"] = inputs.envoy_prometheus_port
    for flag in ("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "ENVOY_SKIP_DEPRECATED_LOGS"):
        if env.get(flag, "").lower() in ("1", "t", "true"):
            meta[flag] = "true"
    if env.get("WORKLOAD_IDENTITY_SOCKET_FILE"):
        meta["WORKLOAD_IDENTITY_SOCKET_FILE"] = env["WORKLOAD_IDENTITY_SOCKET_FILE"]
    meta["PROXY_CONFIG"] = dict(pc)
    for name, variable in (("NAME", "POD_NAME"), ("NAMESPACE", "POD_NAMESPACE"), ("SERVICE_ACCOUNT", "SERVICE_ACCOUNT")):
        if env.get(variable):
            meta[name] = env[variable]
    labels: dict[str, str] = dict(static_labels)
    if static_labels:
        meta["STATIC_LABELS"] = static_labels
    if inputs.labels is not None:
        labels.update({k: v for k, v in inputs.labels.items() if k != POD_TEMPLATE_HASH})
    locality = ""
    for label in LOCALITY_LABELS:
        if labels.get(label):
            locality = sanitize_locality(labels[label])
            labels["istio-locality"] = locality  # Istio writes the sanitised value back under its own label
            break
    if labels or inputs.labels is not None:
        meta["LABELS"] = labels
    if inputs.annotations is not None:
        meta["ANNOTATIONS"] = dict(inputs.annotations)
    meta["PILOT_SAN"] = [inputs.pilot_san]
    namespace = env.get("POD_NAMESPACE", "")
    workload = str(meta.get("WORKLOAD_NAME", ""))
    return NodeFacts(service_cluster(pc, labels, workload, namespace), split_locality(locality), meta)
