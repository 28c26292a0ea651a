"""The ADS stream without I/O: responses in, events and requests out; state of the world and
delta (incremental) xDS over the same resource types.

Per subscribed type the core keeps the version accepted last and the nonce seen last. A
response becomes one event:

- `Accepted(type_url, version, value)`: the type decoded and built a value. Nothing is
  committed yet: the shell swaps the value in, saves it, and only then asks `ack(event)` for
  the request to send, which also records the version. So a value is never ACKed before it
  serves, and never saved before it was built (docs/architecture.md "A pushed resource until
  it serves").
- `Rejected(type_url, version, reason, request)`: the type raised (anything: a resource must
  never end the stream); `request` is the NACK, which echoes the nonce, carries error_detail
  (code INTERNAL) and keeps the version accepted last, as the xDS protocol says. The value being
  served stays.
- None: nothing to do (a type not subscribed; a response that leaves no resource of its type,
  which Istio's agent ignores for its own types: docs/istio-compat.md "ADS stream to istiod").

The two protocols differ only in what a response carries and what a request looks like:
state of the world sends every resource of the type each time; delta sends the resources that
changed and the names removed, and the core keeps the set. Types see the same thing either way:
every resource of the type, in name order for delta.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeAlias, TypeVar

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    Resource,
)
from google.protobuf.any_pb2 import Any
from google.rpc.status_pb2 import Status

from .resources import ResourceType, rejection

INTERNAL = 13  # google.rpc.Code.INTERNAL

V = TypeVar("V")
Request: TypeAlias = "DiscoveryRequest | DeltaDiscoveryRequest"


@dataclass
class TypeState:
    """What the stream knows about one subscribed type; carried over a reconnect."""

    version: str = ""  # accepted last
    nonce: str = ""  # seen last (not carried over)
    accepted: int = 0
    rejected: int = 0
    last_error: str = ""
    resources: dict[str, Resource] = field(default_factory=dict)  # delta: the set accepted last


@dataclass(frozen=True)
class Accepted(Generic[V]):
    type_url: str
    version: str
    value: V
    nonce: str
    resources: Mapping[str, Resource] | None = None  # delta: the set to keep once ACKed


@dataclass(frozen=True)
class Rejected:
    type_url: str
    version: str
    reason: str
    request: Request


Event: TypeAlias = "Accepted[object] | Rejected"


class _Core(ABC):
    """What both protocols share: the types, their states, the node on the first request (none
    on a stream whose first request is Envoy's, through the xDS proxy: Envoy's node is the one)."""

    def __init__(self, node: Node | None, types: Sequence[ResourceType[object]], known: Mapping[str, TypeState]) -> None:
        self.node = node
        self.types = {t.type_url: t for t in types}
        # versions, counts and (delta) the resource set carry over a reconnect; nonces do not
        self.states = {url: replace(known.get(url, TypeState()), nonce="") for url in self.types}
        self._node_sent = False

    def _with_node(self, request: Request) -> Request:
        if self.node is not None and not self._node_sent:  # Envoy's set_node_on_first_message_only, which istiod expects
            request.node.CopyFrom(self.node)
            self._node_sent = True
        return request

    def _decide(self, type_url: str, version: str, nonce: str, resources: Sequence[Any],
                kept: Mapping[str, Resource] | None) -> Event | None:
        state = self.states[type_url]
        state.nonce = nonce
        if not resources:
            return None
        try:
            value = self.types[type_url].decode(resources)
        except Exception as err:
            return self.reject(type_url, version, nonce, rejection(err))
        return Accepted(type_url, version, value, nonce, kept)

    def reject(self, type_url: str, version: str, nonce: str, reason: str) -> Rejected:
        """A NACK for the response with `nonce`; the version accepted last stays."""
        state = self.states[type_url]
        state.rejected += 1
        state.last_error = reason
        return Rejected(type_url, version, reason, self._request(type_url, nonce, Status(code=INTERNAL, message=reason)))

    def ack(self, event: Accepted[object]) -> Request:
        """The ACK of an accepted response, once its value serves; records its version."""
        state = self.states[event.type_url]
        state.version = event.version
        state.accepted += 1
        state.last_error = ""
        if event.resources is not None:
            state.resources = dict(event.resources)
        return self._request(event.type_url, event.nonce, None)

    @abstractmethod
    def _request(self, type_url: str, nonce: str, error: Status | None) -> Request:
        """The protocol's request for `type_url`: a subscription, an ACK or (with `error`) a NACK."""


class SotwCore(_Core):
    """State of the world (StreamAggregatedResources)."""

    def initial_requests(self) -> list[Request]:
        """One wildcard subscription per type (no names: every resource), the first with the node."""
        return [self._request(url, "", None) for url in self.types]

    def _request(self, type_url: str, nonce: str, error: Status | None) -> Request:
        request = DiscoveryRequest(type_url=type_url, version_info=self.states[type_url].version, response_nonce=nonce)
        if error is not None:
            request.error_detail.CopyFrom(error)
        return self._with_node(request)

    def on_response(self, response: DiscoveryResponse) -> Event | None:
        if response.type_url not in self.types:
            return None
        return self._decide(response.type_url, response.version_info, response.nonce, list(response.resources), None)


class DeltaCore(_Core):
    """Delta xDS (DeltaAggregatedResources): the server sends what changed; the core keeps the set."""

    def initial_requests(self) -> list[Request]:
        """One wildcard subscription per type, with the versions held (a reconnect resumes)."""
        requests: list[Request] = []
        for url in self.types:
            request = DeltaDiscoveryRequest(type_url=url)
            for name, resource in self.states[url].resources.items():
                request.initial_resource_versions[name] = resource.version
            requests.append(self._with_node(request))
        return requests

    def _request(self, type_url: str, nonce: str, error: Status | None) -> Request:
        request = DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
        if error is not None:
            request.error_detail.CopyFrom(error)
        return self._with_node(request)

    def on_response(self, response: DeltaDiscoveryResponse) -> Event | None:
        url = response.type_url
        if url not in self.types:
            return None
        kept = dict(self.states[url].resources)
        for name in response.removed_resources:
            kept.pop(name, None)
        for resource in response.resources:
            if resource.resource.type_url:  # a resource without a body is only a name (never sent to a wildcard)
                kept[resource.name] = resource
        event = self._decide(url, response.system_version_info, response.nonce,
                             [kept[name].resource for name in sorted(kept)], kept)
        if event is None:  # nothing left of the type: ignored as in state of the world, but the
            self.states[url].resources = kept  # names removed are gone from the set all the same
        return event
