"""What both variants of ADS share, state of the world (controlplane/ads.py) and delta
(controlplane/delta.py): who the proxy is, read from the first request's node; the stream's
nonces; the events a stream reports and the outcome of one step.

No I/O, no clock, no randomness: the gRPC shell (ads.AdsServicer) draws each stream's nonce prefix
and logs the events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from pilotfish.xds_client.health import HEALTH_TYPE

from .nametable import ProxyInfo, is_ip
from .served import NAME_TABLE_TYPE, SERVED_TYPES

NODE_TYPES = ("sidecar", "router", "waypoint", "ztunnel")  # istiod's valid node types
TRUE_STRINGS = ("1", "t", "true")  # Go's strconv.ParseBool, lower-cased


class StreamError(ValueError):
    """The stream must end: the message is what the client is told (INVALID_ARGUMENT)."""


def short_type(type_url: str) -> str:
    """The type as istiod's logs name it: NDS, CDS, LDS."""
    if type_url == NAME_TABLE_TYPE:
        return "NDS"
    return {"Cluster": "CDS", "Listener": "LDS"}.get(type_url.rpartition(".")[2], type_url)


def _metadata_strings(node: Node) -> dict[str, str]:
    """String (and bool) metadata values; istiod reads the rest as typed fields we don't need."""
    out: dict[str, str] = {}
    for key, value in node.metadata.fields.items():
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            out[key] = value.string_value
        elif kind == "bool_value":
            out[key] = "true" if value.bool_value else "false"
    return out


def proxy_info(node: Node) -> ProxyInfo:
    """Who the proxy is, read as istiod's ParseServiceNodeWithMetadata reads it.

    IPs come from metadata INSTANCE_IPS when every entry is an IP, else from the node id; the DNS
    domain is the id's last field. Errors carry istiod's wording.
    """
    if not node.id:
        raise StreamError("missing node information")
    parts = node.id.split("~")
    if len(parts) != 4:
        raise StreamError(f"missing parts in the service node {node.id!r}")
    if parts[0] not in NODE_TYPES:
        raise StreamError(
            f"invalid node type (valid types: {', '.join(NODE_TYPES)}) in the service node {node.id!r}"
        )
    meta = _metadata_strings(node)
    ips = tuple(ip.strip() for ip in meta.get("INSTANCE_IPS", "").split(",") if ip.strip())
    if not ips or not all(is_ip(ip) for ip in ips):
        ips = (parts[1],) if is_ip(parts[1]) else ()
    if not ips:
        raise StreamError("no valid IP address in the service node id or metadata")
    return ProxyInfo(
        ips=ips,
        network=meta.get("NETWORK", ""),
        cluster=meta.get("CLUSTER_ID", ""),
        dns_domain=parts[3],
        dns_capture=meta.get("DNS_CAPTURE", "").lower() in TRUE_STRINGS,
    )


# What happened on a stream, for the shell to log and count.


@dataclass(frozen=True)
class Connected:
    node_id: str
    proxy: ProxyInfo
    node: Node = field(default_factory=Node, compare=False, repr=False)  # for auto-registration


@dataclass(frozen=True)
class HealthReported:
    """A HealthInformation request: the agent's probe of its workload (VMs), healthy without
    `error_detail`, else not and why (controlplane/autoregister.py)."""

    healthy: bool
    detail: str = ""


@dataclass(frozen=True)
class Sent:
    type_url: str
    version: str
    nonce: str
    entries: int  # hosts in a table, else resources sent
    removed: int = 0  # delta: names in removed_resources


@dataclass(frozen=True)
class Acked:
    type_url: str
    version: str
    nonce: str


@dataclass(frozen=True)
class Nacked:
    type_url: str
    version: str  # the version the client still has
    nonce: str
    detail: str


@dataclass(frozen=True)
class Stale:
    type_url: str
    nonce: str


@dataclass(frozen=True)
class Ignored:
    type_url: str


Event = Connected | Sent | Acked | Nacked | Stale | Ignored | HealthReported

R = TypeVar("R", covariant=True)


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """The responses to send, in order, and what to log."""

    responses: tuple[R, ...] = ()
    events: tuple[Event, ...] = field(default=())


W = TypeVar("W")


class StreamBase(Generic[W]):
    """The node, the nonces and the subscribed types (a `W` each) of one stream, either variant.

    `nonce_prefix` must differ between streams (the shell draws it at random): it is how a nonce
    from an earlier connection, or another control plane, is told apart from a stale one of ours.
    """

    def __init__(self, nonce_prefix: str) -> None:
        self._prefix = nonce_prefix + "-"
        self._counter = 0
        self.node_id: str | None = None
        self.proxy: ProxyInfo | None = None
        self._watches: dict[str, W] = {}

    def _start(self, request: DiscoveryRequest | DeltaDiscoveryRequest) -> tuple[list[Event], bool]:
        """On every request: what to report so far, and whether its type is served (one that
        is not is ignored, as istiod ignores types it has no generator for; a health report is
        reported, never answered). The first request must carry the node (StreamError if it
        does not name a proxy istiod would accept); later ones need not, and their node is not
        read."""
        events: list[Event] = []
        node, type_url = request.node, request.type_url
        if self.proxy is None:
            self.proxy = proxy_info(node)
            self.node_id = node.id
            events.append(Connected(self.node_id, self.proxy, node))
        if type_url in SERVED_TYPES:
            return events, True
        if type_url == HEALTH_TYPE:
            healthy = not request.HasField("error_detail")
            events.append(HealthReported(healthy, "" if healthy else request.error_detail.message[:500]))
        else:
            events.append(Ignored(type_url))
        return events, False

    def _proxy(self) -> ProxyInfo:
        assert self.proxy is not None  # _connect sets it before any type is subscribed
        return self.proxy

    def _next_nonce(self) -> str:
        self._counter += 1
        return f"{self._prefix}{self._counter}"

    def _is_ours(self, nonce: str) -> bool:
        return nonce.startswith(self._prefix) and nonce[len(self._prefix):].isdigit()
