"""Delta ADS (`DeltaAggregatedResources`): the protocol of one stream without I/O, as ads.py's
StreamState is for state of the world. Requests and snapshots go in, responses and events come
out; ads.AdsServicer is the shell around both.

The rules are the xDS protocol's incremental variant, as istiod serves it (docs/istio-compat.md
"istiod: delta xDS"):
- the first request carries the node (stream.StreamBase);
- a type's first request opens its subscription: with no name in `resource_names_subscribe`, or
  with `*`, it is a wildcard one (every resource of the type: CDS, LDS, the NameTable); else the
  names listed. `initial_resource_versions` (a client that reconnected) says what the client
  already holds: only what differs is sent, and what no longer exists is in `removed_resources`.
  The first request is always answered, even with nothing, so the client's initial fetch ends;
- later requests subscribe (`*` too) and unsubscribe names; newly wanted resources are sent, a
  name wanted that does not exist is answered in `removed_resources`, and an unsubscription is
  not answered (the client drops the resource itself);
- each resource has its own version (a digest of its content, served.Resource); a new snapshot
  sends each stream only the resources whose version changed for its proxy, and the names gone;
- a request echoing a nonce is an ACK, or with `error_detail` a NACK: neither is answered, and
  after a NACK the client keeps what it had while the stream goes on. The resources of a NACKed
  response count as sent: sending them again would be refused again, a change to them is sent.

Bounded: a client can subscribe at most MAX_NAMES names of one type (and report as many initial
versions); beyond that the stream is ended, as each name is kept for the stream's life.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
)
from envoy.service.discovery.v3.discovery_pb2 import Resource as ResourceMessage

from .served import Snapshot
from .stream import Acked, Event, Nacked, Outcome, Sent, Stale, StreamBase, StreamError

WILDCARD = "*"
# names one stream may subscribe to per type: Envoy subscribes to a few per cluster or listener,
# and the types served here are wildcard ones
MAX_NAMES = 10_000
ABSENT = None  # in _Watch.known: the client was told the resource does not exist


@dataclass
class _Watch:
    """One type's subscription, and what the client holds of it."""

    wildcard: bool
    names: set[str] = field(default_factory=set)  # subscribed by name
    known: dict[str, str | None] = field(default_factory=dict)  # name -> version the client has, or ABSENT
    nonce_sent: str = ""
    version_sent: str = ""  # the mesh version of the last response

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaStreamState(StreamBase[_Watch]):
    """The server side of one delta ADS stream; no I/O, no clock, no randomness."""

    def on_request(self, request: DeltaDiscoveryRequest, snapshot: Snapshot) -> Outcome[DeltaDiscoveryResponse]:
        """Answer one request given what is served now. StreamError if the stream must end."""
        events, served = self._start(request)
        if not served:
            return Outcome(events=tuple(events))
        type_url = request.type_url
        watch = self._watches.get(type_url)
        nonce = request.response_nonce
        if watch is not None and self._is_ours(nonce):
            if request.HasField("error_detail"):
                events.append(Nacked(type_url, "", nonce, request.error_detail.message))
            elif nonce == watch.nonce_sent:
                events.append(Acked(type_url, watch.version_sent, nonce))
            else:  # an ACK of an earlier response: a later one is on its way to the client
                events.append(Stale(type_url, nonce))
        first = watch is None
        watch = self._subscribe(type_url, watch, request)
        outcome = self._push(type_url, watch, snapshot, always=first)
        return Outcome(outcome.responses, (*events, *outcome.events))

    def on_snapshot(self, snapshot: Snapshot) -> Outcome[DeltaDiscoveryResponse]:
        """Send every subscribed type what changed for this proxy in `snapshot`, if anything."""
        responses: list[DeltaDiscoveryResponse] = []
        events: list[Event] = []
        for type_url, watch in list(self._watches.items()):
            outcome = self._push(type_url, watch, snapshot, always=False)
            responses.extend(outcome.responses)
            events.extend(outcome.events)
        return Outcome(tuple(responses), tuple(events))

    def _subscribe(self, type_url: str, watch: _Watch | None, request: DeltaDiscoveryRequest) -> _Watch:
        subscribe = set(request.resource_names_subscribe)
        if watch is None:
            # no name on a type's first request is the legacy wildcard subscription
            watch = _Watch(wildcard=not subscribe or WILDCARD in subscribe)
            watch.known.update(request.initial_resource_versions)
            # the resources it holds are ones it wants, as istiod counts them
            subscribe |= set(request.initial_resource_versions)
            self._watches[type_url] = watch
        elif WILDCARD in subscribe:
            watch.wildcard = True
        unsubscribe = set(request.resource_names_unsubscribe)
        if WILDCARD in unsubscribe:
            watch.wildcard = False
        watch.names |= subscribe - {WILDCARD}
        watch.names -= unsubscribe
        if len(watch.names) > MAX_NAMES or len(watch.known) > MAX_NAMES:
            raise StreamError(f"more than {MAX_NAMES} resource names subscribed for {type_url}")
        for name in [n for n in watch.known if not watch.wants(n)]:
            del watch.known[name]  # the client forgets what it unsubscribed from
        return watch

    def _push(self, type_url: str, watch: _Watch, snapshot: Snapshot, always: bool) -> Outcome[DeltaDiscoveryResponse]:
        """What the client wants and does not have at this version, and the names it wants or
        holds that do not exist (once); nothing when that is nothing, unless `always`."""
        current = snapshot.resources(type_url, self._proxy())
        send = [r for name, r in current.items() if watch.wants(name) and watch.known.get(name, ABSENT) != r.version]
        gone = [name for name, version in watch.known.items() if version is not ABSENT and name not in current]
        gone += sorted(name for name in watch.names if name not in current and name not in watch.known)
        if not (send or gone or always):
            return Outcome()
        for resource in send:
            watch.known[resource.name] = resource.version
        for name in gone:  # remembered only while subscribed by name, not to say it again
            if name in watch.names:
                watch.known[name] = ABSENT
            else:
                del watch.known[name]
        watch.nonce_sent, watch.version_sent = self._next_nonce(), snapshot.version
        response = DeltaDiscoveryResponse(
            system_version_info=snapshot.version, type_url=type_url, nonce=watch.nonce_sent,
            resources=[ResourceMessage(name=r.name, version=r.version, resource=r.body) for r in send],
            removed_resources=gone)
        sent = Sent(type_url, snapshot.version, watch.nonce_sent, sum(r.entries for r in send), len(gone))
        return Outcome((response,), (sent,))
