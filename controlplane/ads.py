"""ADS as istiod speaks it, both variants: state of the world (`StreamAggregatedResources`, here)
and delta (`DeltaAggregatedResources`, controlplane/delta.py), serving each proxy its NameTable and
Envoy's clusters and listeners (controlplane/served.py).

Two halves. `StreamState` is the protocol of one SotW stream without I/O (delta.DeltaStreamState
the delta one): requests and mesh snapshots go in, responses and events come out, so every rule
below is tested without gRPC. `AdsServicer` is the thin gRPC shell around both: authentication,
the bounds, one queue per stream, log lines and counters.

The SotW rules are istiod's (docs/istio-compat.md "ADS stream to istiod", "istiod: NDS generation"):
- the first request carries the node; its id (`sidecar~10.1.1.5~pod.ns~ns.svc.cluster.local`) and
  metadata say who the proxy is, and the resources are computed for that proxy;
- a request for a served type without a nonce, or with a nonce this stream never sent (a client
  that reconnected from another control plane), gets the current resources with a fresh nonce;
- a request echoing the last nonce is an ACK, or a NACK if it carries `error_detail`; neither is
  answered, and a NACK keeps the stream open (the client keeps its last good resources);
- a request echoing an older nonce of this stream is stale and ignored: answering it would make a
  client that is one response behind ping-pong with the server forever;
- types not served here are ignored, as istiod ignores types it has no generator for;
- a new mesh version is pushed to every stream that subscribed to a type whose resources changed
  for its proxy.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import grpc
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from pilotfish.common.ratelog import RateLimitedLog
from pilotfish.common.tokens import TokenFileError, read_token_file
from pilotfish.xds_client.inbox import CLOSED, open_inbox

from .autoregister import Refused
from .casvc import token_caller
from .tokenreview import ReviewFailed, bearer_token
from .delta import DeltaStreamState
from .nametable import ProxyInfo
from .served import NAME_TABLE_TYPE, Resource, Snapshot
from .stream import (
    Acked,
    Connected,
    Event,
    HealthReported,
    Ignored,
    Nacked,
    Outcome,
    Sent,
    Stale,
    StreamBase,
    StreamError,
    proxy_info,
    short_type,
)

__all__ = ["NAME_TABLE_TYPE", "Acked", "Connected", "Ignored", "Nacked", "Sent", "Snapshot", "Stale",
           "StreamError", "proxy_info"]  # what the tests and the command import from here

log = logging.getLogger("pilotfish.controlplane")

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


@dataclass
class _Watch:
    """One subscribed type: what was last sent and what the client last accepted."""

    version_sent: str
    nonce_sent: str
    content_sent: tuple[tuple[str, str], ...]  # (name, version) of each resource sent
    version_acked: str | None = None


class StreamState(StreamBase[_Watch]):
    """The server side of one SotW ADS stream; no I/O, no clock, no randomness."""

    def acked_version(self, type_url: str) -> str | None:
        watch = self._watches.get(type_url)
        return watch.version_acked if watch else None

    def on_request(self, request: DiscoveryRequest, snapshot: Snapshot) -> Outcome[DiscoveryResponse]:
        """Answer one request given what is served now. StreamError if the stream must end."""
        events, served = self._start(request)
        if not served:
            return Outcome(events=tuple(events))
        type_url = request.type_url
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
        response, sent = self._respond(type_url, snapshot, snapshot.resources(type_url, self._proxy()))
        return Outcome((response,), (*events, sent))

    def on_snapshot(self, snapshot: Snapshot) -> Outcome[DiscoveryResponse]:
        """Push each subscribed type whose resources for this proxy changed (a new mesh version
        that leaves them as they were is not sent again)."""
        responses: list[DiscoveryResponse] = []
        events: list[Event] = []
        for type_url, watch in list(self._watches.items()):
            resources = snapshot.resources(type_url, self._proxy())
            if watch.version_sent == snapshot.version or watch.content_sent == _content(resources):
                continue
            response, sent = self._respond(type_url, snapshot, resources)
            responses.append(response)
            events.append(sent)
        return Outcome(tuple(responses), tuple(events))

    def _respond(self, type_url: str, snapshot: Snapshot,
                 resources: dict[str, Resource]) -> tuple[DiscoveryResponse, Sent]:
        nonce = self._next_nonce()
        previous = self._watches.get(type_url)
        self._watches[type_url] = _Watch(snapshot.version, nonce, _content(resources),
                                         previous.version_acked if previous else None)
        response = DiscoveryResponse(version_info=snapshot.version, type_url=type_url, nonce=nonce,
                                     resources=[r.body for r in resources.values()])
        return response, Sent(type_url, snapshot.version, nonce, sum(r.entries for r in resources.values()))


def _content(resources: dict[str, Resource]) -> tuple[tuple[str, str], ...]:
    return tuple((r.name, r.version) for r in resources.values())


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


CHANGED = object()  # put in a stream's inbox when the served snapshot changed; at most one waits


class MeshHub:
    """The snapshot being served and the streams to tell when it changes; thread-safe.

    A stream is told with one CHANGED, not given the snapshot: one more is not queued while its
    CHANGED waits unread, and it takes the current snapshot when it reads it (`take`). Queued
    snapshots piled up in the inbox of a stream stuck sending to a client that does not read,
    each holding its mesh and the proxies' tables built from it (megabytes each), one per push."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._lock = threading.Lock()
        self._current = snapshot
        self._inboxes: dict[queue.SimpleQueue[object], bool] = {}  # inbox -> a CHANGED waits in it

    @property
    def current(self) -> Snapshot:
        with self._lock:
            return self._current

    def publish(self, snapshot: Snapshot) -> int:
        """Serve `snapshot` from now on; returns how many open streams were told."""
        with self._lock:
            self._current = snapshot
            told = [inbox for inbox, waiting in self._inboxes.items() if not waiting]
            for inbox in told:
                self._inboxes[inbox] = True
            streams = len(self._inboxes)
        for inbox in told:
            inbox.put(CHANGED)
        return streams

    def take(self, inbox: queue.SimpleQueue[object]) -> Snapshot:
        """The snapshot for a stream that read CHANGED from `inbox`; the next publish tells it again."""
        with self._lock:
            if inbox in self._inboxes:
                self._inboxes[inbox] = False
            return self._current

    def subscribe(self, inbox: queue.SimpleQueue[object]) -> None:
        with self._lock:
            self._inboxes[inbox] = False

    def unsubscribe(self, inbox: queue.SimpleQueue[object]) -> None:
        with self._lock:
            self._inboxes.pop(inbox, None)


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


Req = TypeVar("Req", DiscoveryRequest, DeltaDiscoveryRequest)
Resp = TypeVar("Resp", DiscoveryResponse, DeltaDiscoveryResponse)
_Req_contra = TypeVar("_Req_contra", contravariant=True)
_Resp_co = TypeVar("_Resp_co", covariant=True)


class _State(Protocol[_Req_contra, _Resp_co]):
    """A stream's protocol, either variant: StreamState or delta.DeltaStreamState."""

    @property
    def node_id(self) -> str | None: ...

    def on_request(self, request: _Req_contra, snapshot: Snapshot) -> Outcome[_Resp_co]: ...

    def on_snapshot(self, snapshot: Snapshot) -> Outcome[_Resp_co]: ...


class Workloads(Protocol):
    """Where streams register as WorkloadEntries (model.ServedModel): `connection` names a stream."""

    def connect(self, connection: str, node: Node, proxy: ProxyInfo, identity: str | None) -> Refused | None: ...

    def report_health(self, connection: str, healthy: bool, detail: str) -> None: ...

    def disconnect(self, connection: str) -> None: ...


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """The gRPC shell: authenticates a stream, then runs its state (SotW or delta) until either
    side ends it. Both variants share the bounds (MAX_STREAMS in all), the token check and the
    rate-limited log lines."""

    def __init__(self, hub: MeshHub, token_file: str | None = None,
                 identities: Callable[[], Mapping[str, str]] | None = None,
                 workloads: Workloads | None = None, review: Callable[[str], str] | None = None,
                 peer_identity: Callable[[grpc.ServicerContext], str | None] | None = None) -> None:
        """`token_file`: the token every stream must carry; `identities` (the CA's tokens, each a
        workload's: controlplane/casvc.py) are accepted too, as istiod accepts any workload's
        token, and so is a token `review` vouches for (the Kubernetes TokenReview,
        controlplane/tokenreview.py; it raises ReviewFailed otherwise). None of the three: no
        check. When checking, a client certificate this CA issued opens a stream too, whatever
        the token (`peer_identity` gives its SPIFFE ID): as istiod, whose first authenticator is
        the client certificate, so that a VM whose one-hour bootstrap token expired stays
        connected with the certificate it was issued (PROV_CERT, docs/vm.md). `workloads`: where a
        stream whose node asks for auto-registration becomes a WorkloadEntry, and its health
        reports go."""
        self.hub = hub
        self.workloads = workloads
        self._connections = itertools.count(1)
        self.token_file = token_file
        self.identities = identities
        self.review = review
        self.peer_identity = peer_identity
        self.counters = Counters()
        self._lock = threading.Lock()
        # Streams come from whoever can reach the port: an unauthenticated flood is one line per
        # interval saying how many were left out, not a line each (common/ratelog.py).
        self._refusal_log = RateLimitedLog(log)
        self._token_file_log = RateLimitedLog(log)
        self._nack_log = RateLimitedLog(log)

    def _authenticate(self, context: grpc.ServicerContext) -> str | None:
        """The stream's workload identity (a SPIFFE ID) when its token names one (the identities
        file, the review), "" when it authenticated without one (the shared --token-file), None
        when nothing is checked; ends the stream UNAUTHENTICATED otherwise. Auto-registration
        takes the identity (autoregister.identity_problem), as istiod takes the connection's."""
        if self.token_file is None and self.identities is None and self.review is None:
            return None
        if self.peer_identity is not None and (certified := self.peer_identity(context)):
            return certified
        value = dict(context.invocation_metadata()).get("authorization")
        header = value if isinstance(value, str) else None
        if self.identities is not None and (caller := token_caller(header, self._known())) is not None:
            return caller.identity
        problem = "bearer token rejected"
        if self.token_file is not None:
            problem = check_bearer(header, read_token(self.token_file, self._token_file_log)) or ""
        identity = ""
        if problem and self.review is not None:
            identity, problem = self._reviewed(header)
        if problem:
            self._refusal_log(logging.WARNING, "controlplane: refused stream from %s: %s", context.peer(), problem)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        return identity

    def _reviewed(self, header: str | None) -> tuple[str, str]:
        """(the identity the review gives the stream's bearer token, "") or ("", why it gives none)."""
        assert self.review is not None
        token = bearer_token(header)
        if token is None:
            return "", "missing bearer token"
        try:
            return self.review(token), ""
        except ReviewFailed as err:
            return "", f"token review: {err}"

    def _known(self) -> Mapping[str, str]:
        assert self.identities is not None
        try:
            return self.identities()
        except ValueError as err:  # a bad identities file: no workload token is accepted
            self._token_file_log(logging.WARNING, "controlplane: identities file: %s", err)
            return {}

    def StreamAggregatedResources(
        self, request_iterator: Iterator[DiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[DiscoveryResponse]:
        return self._serve(request_iterator, context, StreamState(secrets.token_hex(4)), "stream")

    def DeltaAggregatedResources(
        self, request_iterator: Iterator[DeltaDiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[DeltaDiscoveryResponse]:
        return self._serve(request_iterator, context, DeltaStreamState(secrets.token_hex(4)), "delta stream")

    def _serve(self, requests: Iterator[Req], context: grpc.ServicerContext, state: _State[Req, Resp],
               kind: str) -> Iterator[Resp]:
        """One stream of either variant: its requests and the mesh's new snapshots through
        `state`, until either side ends it."""
        identity = self._authenticate(context)
        peer = context.peer()
        inbox = open_inbox(requests, context, "ads-requests", f"controlplane: the {kind} from {peer}")
        self.hub.subscribe(inbox)
        with self._lock:
            self.counters.streams += 1
        connection = f"{kind} {next(self._connections)}"
        registered = False
        try:
            while (item := inbox.get()) is not CLOSED:
                try:
                    if item is CHANGED:
                        outcome = state.on_snapshot(self.hub.take(inbox))
                    else:
                        outcome = state.on_request(cast(Req, item), self.hub.current)
                except StreamError as err:
                    log.warning("controlplane: closing %s from %s: %s", kind, peer, err)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                for event in outcome.events:
                    self._record(kind, peer, state.node_id or "?", event)
                    registered |= self._workload(connection, event, context, identity)
                yield from outcome.responses
        finally:
            self.hub.unsubscribe(inbox)
            if registered and self.workloads is not None:
                self.workloads.disconnect(connection)
            log.info("controlplane: %s from %s closed (node %s)", kind, peer, state.node_id or "unknown")

    def _workload(self, connection: str, event: Event, context: grpc.ServicerContext, identity: str | None) -> bool:
        """Auto-registration's part of an event on a stream authenticated as `identity`: whether
        the stream registered (to unregister at its end); a refused registration ends the stream,
        as istiod's does (PERMISSION_DENIED when the identity is not the group's)."""
        if self.workloads is None:
            return False
        if isinstance(event, HealthReported):
            self.workloads.report_health(connection, event.healthy, event.detail)
        elif isinstance(event, Connected):
            refused = self.workloads.connect(connection, event.node, event.proxy, identity)
            if refused is not None:
                code = (grpc.StatusCode.RESOURCE_EXHAUSTED if refused.exhausted
                        else grpc.StatusCode.PERMISSION_DENIED if refused.denied
                        else grpc.StatusCode.FAILED_PRECONDITION)
                context.abort(code, refused.reason)
            return True
        return False

    def _record(self, kind: str, peer: str, node: str, event: Event) -> None:
        match event:
            case Connected(node_id=node_id, proxy=proxy):
                log.info("controlplane: %s from %s: node %s (ips %s, cluster %r, network %r)",
                         kind, peer, node_id, ",".join(proxy.ips), proxy.cluster, proxy.network)
            case Sent(type_url=type_url, version=version, nonce=nonce, entries=entries, removed=removed):
                with self._lock:
                    self.counters.pushes += 1
                what = "hosts" if type_url == NAME_TABLE_TYPE else "resources"
                gone = f", {removed} removed" if removed else ""
                log.info("controlplane: sent %s version %s to %s (%d %s%s, nonce %s)",
                         short_type(type_url), version, node, entries, what, gone, nonce)
            case Acked(type_url=type_url, version=version):
                with self._lock:
                    self.counters.acks += 1
                log.info("controlplane: %s accepted %s version %s", node, short_type(type_url), version)
            case Nacked(type_url=type_url, version=version, nonce=nonce, detail=detail):
                with self._lock:
                    self.counters.nacks += 1
                # a client may NACK every push, or loop on one: a line per interval, the count
                # in the counters
                self._nack_log(logging.WARNING, "controlplane: %s rejected %s (nonce %s; keeps version %r): %.500s",
                               node, short_type(type_url), nonce, version, detail)
            case Stale(type_url=type_url, nonce=nonce):
                log.debug("controlplane: %s answered an old %s nonce %s; ignored",
                          node, short_type(type_url), nonce)
            case HealthReported(healthy=healthy, detail=detail):
                log.debug("controlplane: %s reports its workload %s", node,
                          "healthy" if healthy else f"unhealthy: {detail:.300}")
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
