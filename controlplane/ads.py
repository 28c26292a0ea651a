"""ADS as istiod speaks it: state-of-the-world `StreamAggregatedResources`, serving the NameTable.

Two halves. `StreamState` is the protocol of one stream without I/O: requests and mesh snapshots
go in, responses and events come out, so every rule below is tested without gRPC. `AdsServicer`
is the thin gRPC shell around it: authentication, one queue per stream, log lines and counters.

The rules are istiod's (docs/istio-compat.md "ADS stream to istiod", "istiod: NDS generation"):
- the first request carries the node; its id (`sidecar~10.1.1.5~pod.ns~ns.svc.cluster.local`) and
  metadata say who the proxy is, and the table is computed for that proxy;
- a request for a served type without a nonce, or with a nonce this stream never sent (a client
  that reconnected from another control plane), gets the current resource with a fresh nonce;
- a request echoing the last nonce is an ACK, or a NACK if it carries `error_detail`; neither is
  answered, and a NACK keeps the stream open (the client keeps its last good table);
- a request echoing an older nonce of this stream is stale and ignored: answering it would make a
  client that is one response behind ping-pong with the server forever;
- types not served here are ignored, as istiod ignores types it has no generator for;
- a new mesh version is pushed to every stream that subscribed.
"""

from __future__ import annotations

import hmac
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.protobuf import any_pb2
from pilotfish.common.ratelog import RateLimitedLog
from pilotfish.common.tokens import TokenFileError, read_token_file
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.inbox import CLOSED, open_inbox
from pilotfish.xds_client.nds import TYPE_URL as NAME_TABLE_TYPE

from .nametable import ProxyInfo, is_ip

log = logging.getLogger("pilotfish.controlplane")

NODE_TYPES = ("sidecar", "router", "waypoint", "ztunnel")  # istiod's valid node types
TRUE_STRINGS = ("1", "t", "true")  # Go's strconv.ParseBool, lower-cased

# Each open stream holds one of grpcio's worker threads for its whole life (the sync server has
# no other way to wait for both requests and pushes); beyond this, new streams are refused with
# RESOURCE_EXHAUSTED instead of queueing silently.
MAX_STREAMS = 1000
# An agent opens one ADS stream per connection; more than a few on one connection is a client
# taking the slots (RPCs) of every other agent. HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS.
MAX_STREAMS_PER_CONNECTION = 8


@dataclass(frozen=True)
class Keepalive:
    """The server's keepalive and its policy for the clients' pings: istiod's.

    istiod (docs/istio-compat.md "istiod: TLS and keepalive") pings a connection idle for 30 s
    (GRPC_KEEPALIVE_INTERVAL) and closes it when the ping is not answered within 10 s
    (GRPC_KEEPALIVE_TIMEOUT); it lets clients ping every 15 s (EnforcementPolicy.MinTime =
    Time / 2) while they have a stream, and no more than once in 2 hours without one
    (PermitWithoutStream false). A third ping too early (grpc-go's maxPingStrikes, 2) gets GOAWAY
    ENHANCE_YOUR_CALM "too_many_pings" and the connection is closed. pilot-agent, and this
    project's agent, ping every 30 s. Tests shorten the periods; the defaults are istiod's.
    """

    time_ms: int = 30_000
    timeout_ms: int = 10_000
    min_ping_interval_ms: int = 15_000
    max_ping_strikes: int = 2

    def options(self) -> list[tuple[str, int]]:
        """As grpcio's channel arguments. Before, this server set the client ping interval under
        a name grpc does not know (`min_recv_ping_interval_...`), so grpc's default of 5 minutes
        applied and idle agents were sent too_many_pings every 3-3.5 minutes."""
        return [
            ("grpc.keepalive_time_ms", self.time_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.keepalive_permit_without_calls", 0),  # without a stream: one ping in 2 hours
            # grpc core stops its own keepalive pings after two without data in between (its
            # default); grpc-go's server, istiod's, keeps pinging an idle connection.
            ("grpc.http2.max_pings_without_data", 0),
        ]


ISTIOD_KEEPALIVE = Keepalive()


class StreamError(ValueError):
    """The client broke the protocol; the stream ends with INVALID_ARGUMENT and this message."""


@dataclass(frozen=True)
class Snapshot:
    """What the control plane serves right now: a mesh version and the table for any proxy."""

    version: str
    table_for: Callable[[ProxyInfo], NameTable]
    hosts: int  # for log lines only


def short_type(type_url: str) -> str:
    return "NDS" if type_url == NAME_TABLE_TYPE else type_url


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


@dataclass(frozen=True)
class Sent:
    type_url: str
    version: str
    nonce: str
    entries: int  # hosts in the table this proxy got


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


Event = Connected | Sent | Acked | Nacked | Stale | Ignored


@dataclass(frozen=True)
class Outcome:
    responses: tuple[DiscoveryResponse, ...] = ()
    events: tuple[Event, ...] = ()


@dataclass
class _Watch:
    """One subscribed type: what was last sent and what the client last accepted."""

    version_sent: str
    nonce_sent: str
    version_acked: str | None = None


class StreamState:
    """The server side of one SotW ADS stream; no I/O, no clock, no randomness.

    `nonce_prefix` must differ between streams (the shell draws it at random): it is how a nonce
    from an earlier connection, or another control plane, is told apart from a stale one of ours.
    """

    def __init__(self, nonce_prefix: str) -> None:
        self._prefix = nonce_prefix + "-"
        self._counter = 0
        self._watches: dict[str, _Watch] = {}
        self.node_id: str | None = None
        self.proxy: ProxyInfo | None = None

    def acked_version(self, type_url: str) -> str | None:
        watch = self._watches.get(type_url)
        return watch.version_acked if watch else None

    def on_request(self, request: DiscoveryRequest, snapshot: Snapshot) -> Outcome:
        """Answer one request given what is served now. StreamError if the stream must end."""
        events: list[Event] = []
        if self.proxy is None:
            self.proxy = proxy_info(request.node)
            self.node_id = request.node.id
            events.append(Connected(self.node_id, self.proxy))
        type_url = request.type_url
        if type_url != NAME_TABLE_TYPE:
            return Outcome(events=(*events, Ignored(type_url)))
        watch = self._watches.get(type_url)
        nonce = request.response_nonce
        if watch is not None and nonce and nonce == watch.nonce_sent:
            if request.HasField("error_detail"):
                events.append(Nacked(type_url, request.version_info, nonce, request.error_detail.message))
            else:
                watch.version_acked = request.version_info
                events.append(Acked(type_url, request.version_info, nonce))
            return Outcome(events=tuple(events))
        if watch is not None and self._is_ours(nonce):
            return Outcome(events=(*events, Stale(type_url, nonce)))
        response, sent = self._respond(type_url, snapshot)
        return Outcome((response,), (*events, sent))

    def on_snapshot(self, snapshot: Snapshot) -> Outcome:
        """Push a new mesh version to this stream if it subscribed and has not got it yet."""
        watch = self._watches.get(NAME_TABLE_TYPE)
        if watch is None or watch.version_sent == snapshot.version:
            return Outcome()
        response, sent = self._respond(NAME_TABLE_TYPE, snapshot)
        return Outcome((response,), (sent,))

    def _is_ours(self, nonce: str) -> bool:
        return nonce.startswith(self._prefix) and nonce[len(self._prefix):].isdigit()

    def _respond(self, type_url: str, snapshot: Snapshot) -> tuple[DiscoveryResponse, Sent]:
        assert self.proxy is not None  # on_request sets it before any response
        table = snapshot.table_for(self.proxy)
        resource = any_pb2.Any()
        resource.Pack(table)
        self._counter += 1
        nonce = f"{self._prefix}{self._counter}"
        previous = self._watches.get(type_url)
        self._watches[type_url] = _Watch(snapshot.version, nonce, previous.version_acked if previous else None)
        response = DiscoveryResponse(
            version_info=snapshot.version, resources=[resource], type_url=type_url, nonce=nonce
        )
        return response, Sent(type_url, snapshot.version, nonce, len(table.table))


def check_bearer(header: str | None, token: str) -> str | None:
    """Why the `authorization` header does not carry `Bearer <token>`, or None if it does."""
    if not header:
        return "missing bearer token"
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "missing bearer token"
    if not token or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return "bearer token rejected"
    return None


class MeshHub:
    """The snapshot being served and the streams to tell when it changes; thread-safe."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._lock = threading.Lock()
        self._current = snapshot
        self._inboxes: set[queue.SimpleQueue[object]] = set()

    @property
    def current(self) -> Snapshot:
        with self._lock:
            return self._current

    def publish(self, snapshot: Snapshot) -> int:
        """Serve `snapshot` from now on; returns how many open streams were told."""
        with self._lock:
            self._current = snapshot
            inboxes = list(self._inboxes)
        for inbox in inboxes:
            inbox.put(snapshot)
        return len(inboxes)

    def subscribe(self, inbox: queue.SimpleQueue[object]) -> None:
        with self._lock:
            self._inboxes.add(inbox)

    def unsubscribe(self, inbox: queue.SimpleQueue[object]) -> None:
        with self._lock:
            self._inboxes.discard(inbox)


@dataclass
class Counters:
    """Totals since start, for logs and tests."""

    streams: int = 0
    pushes: int = 0
    acks: int = 0
    nacks: int = 0


def read_token(path: str, report: RateLimitedLog) -> str:
    """The expected token, trimmed; '' if the file cannot be read or is empty (then every stream
    is refused: an empty expected token must not let an empty bearer in)."""
    try:
        token = read_token_file(path)
    except TokenFileError as err:
        report(logging.ERROR, "controlplane: cannot read token file %s: %s; refusing streams", path, err)
        return ""
    if not token:
        report(logging.ERROR, "controlplane: token file %s is empty; refusing streams", path)
    return token


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """The gRPC shell: authenticates a stream, then runs its StreamState until either side ends it."""

    def __init__(self, hub: MeshHub, token_file: str | None = None) -> None:
        self.hub = hub
        self.token_file = token_file
        self.counters = Counters()
        self._lock = threading.Lock()
        # Streams come from whoever can reach the port: an unauthenticated flood is one line per
        # interval saying how many were left out, not a line each (common/ratelog.py).
        self._refusal_log = RateLimitedLog(log)
        self._token_file_log = RateLimitedLog(log)

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        if self.token_file is None:
            return
        header = dict(context.invocation_metadata()).get("authorization")
        problem = check_bearer(header if isinstance(header, str) else None, read_token(self.token_file, self._token_file_log))
        if problem is not None:
            self._refusal_log(logging.WARNING, "controlplane: refused stream from %s: %s", context.peer(), problem)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    def StreamAggregatedResources(
        self, request_iterator: Iterator[DiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[DiscoveryResponse]:
        self._authenticate(context)
        peer = context.peer()
        state = StreamState(secrets.token_hex(4))
        inbox = open_inbox(request_iterator, context, "ads-requests", f"controlplane: the stream from {peer}")
        self.hub.subscribe(inbox)
        with self._lock:
            self.counters.streams += 1
        try:
            while (item := inbox.get()) is not CLOSED:
                try:
                    if isinstance(item, DiscoveryRequest):
                        outcome = state.on_request(item, self.hub.current)
                    else:
                        assert isinstance(item, Snapshot)
                        outcome = state.on_snapshot(item)
                except StreamError as err:
                    log.warning("controlplane: closing stream from %s: %s", peer, err)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                for event in outcome.events:
                    self._record(peer, state.node_id or "?", event)
                yield from outcome.responses
        finally:
            self.hub.unsubscribe(inbox)
            log.info("controlplane: stream from %s closed (node %s)", peer, state.node_id or "unknown")

    def DeltaAggregatedResources(
        self, request_iterator: Iterator[DeltaDiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[DeltaDiscoveryResponse]:
        self._refusal_log(logging.INFO, "controlplane: refused delta xDS stream from %s", context.peer())
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("delta xDS is not supported; use state-of-the-world "
                            "StreamAggregatedResources (Istio: ISTIO_DELTA_XDS=false)")
        return iter(())

    def _record(self, peer: str, node: str, event: Event) -> None:
        match event:
            case Connected(node_id=node_id, proxy=proxy):
                log.info("controlplane: stream from %s: node %s (ips %s, cluster %r, network %r)",
                         peer, node_id, ",".join(proxy.ips), proxy.cluster, proxy.network)
            case Sent(type_url=type_url, version=version, nonce=nonce, entries=entries):
                with self._lock:
                    self.counters.pushes += 1
                log.info("controlplane: sent %s version %s to %s (%d hosts, nonce %s)",
                         short_type(type_url), version, node, entries, nonce)
            case Acked(type_url=type_url, version=version):
                with self._lock:
                    self.counters.acks += 1
                log.info("controlplane: %s accepted %s version %s", node, short_type(type_url), version)
            case Nacked(type_url=type_url, version=version, nonce=nonce, detail=detail):
                with self._lock:
                    self.counters.nacks += 1
                log.warning("controlplane: %s rejected %s (nonce %s; keeps version %r): %s",
                            node, short_type(type_url), nonce, version, detail)
            case Stale(type_url=type_url, nonce=nonce):
                log.debug("controlplane: %s answered an old %s nonce %s; ignored",
                          node, short_type(type_url), nonce)
            case Ignored(type_url=type_url):
                log.debug("controlplane: %s asked for %s, which is not served here; ignored",
                          node, type_url or "an empty type")


def start_server(servicer: AdsServicer, listen: str, credentials: grpc.ServerCredentials | None,
                 keepalive: Keepalive = ISTIOD_KEEPALIVE,
                 handlers: Sequence[grpc.GenericRpcHandler] = ()) -> tuple[grpc.Server, int]:
    """Bind `listen` (host:port, port 0 for any) with TLS, or in plaintext behind the control
    plane's own TLS (`credentials` None: controlplane/tlsfront.py), and start; returns the server
    and port. `handlers` serve more services on the same port (the certificate service, as
    istiod's 15012).

    OSError if the address cannot be bound (in use, not local, no permission).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 8, thread_name_prefix="ads"),
        # Without SO_REUSEPORT: two control planes on one port would each get half the connections.
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            *keepalive.options(),
        ],
        maximum_concurrent_rpcs=MAX_STREAMS,
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(tuple(handlers))
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as err:  # grpcio >= 1.60 raises instead of returning 0
        raise OSError(f"cannot listen on {listen}: {err}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server, port
