"""The state of one ADS stream (state of the world), without I/O: responses in, requests out.

Per subscribed type it keeps the last version accepted and the last nonce seen, and it turns
each response into an ACK or a NACK (the xDS protocol: a NACK echoes the nonce, carries
`error_detail` and keeps the previously accepted version). Handlers decide what a resource
means; one that raises makes a NACK and leaves the old state in place. `ResourceError` is the
handlers' own word for "cannot use this"; any other exception is a NACK too (with its type in
the message), since a resource the server sent must never end the stream or the agent.

Istio's rules for the agent-owned types (reference/istio-dns-proxy.md §4.2): a response with no
resources is ignored entirely (no ACK), otherwise `resources[0]` is the resource; the NACK's
error_detail code is INTERNAL (13). Istio's agent puts the rejected version in its NACK; this
client keeps the last accepted one, as the xDS protocol says (istiod reads only error_detail).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf.any_pb2 import Any
from google.rpc.status_pb2 import Status

INTERNAL = 13  # google.rpc.Code.INTERNAL


class ResourceError(ValueError):
    """A resource that cannot be used; its message goes back to the server in the NACK."""


Handler = Callable[[str, list[Any]], None]  # (version, resources) -> None, or raise to NACK


@dataclass
class TypeState:
    """What the stream knows about one subscribed type."""

    version: str = ""  # last accepted
    nonce: str = ""  # last seen
    accepted: int = 0
    rejected: int = 0
    last_error: str = ""


class AdsStream:
    """One ADS stream's bookkeeping; a new stream (after a reconnect) starts from the versions
    already accepted, so the server can skip resending what the client has."""

    def __init__(self, node: Node, handlers: dict[str, Handler], known: dict[str, TypeState] | None = None) -> None:
        self.node = node
        self.handlers = handlers
        # Versions and counts carry over a reconnect (counters must not go back); nonces do not.
        self.types = {t: replace((known or {}).get(t, TypeState()), nonce="") for t in handlers}
        self._node_sent = False

    def _request(self, type_url: str, nonce: str = "", error: str | None = None) -> DiscoveryRequest:
        request = DiscoveryRequest(type_url=type_url, version_info=self.types[type_url].version, response_nonce=nonce)
        if error is not None:
            request.error_detail.CopyFrom(Status(code=INTERNAL, message=error))
        if not self._node_sent:  # Envoy's set_node_on_first_message_only, which istiod expects
            request.node.CopyFrom(self.node)
            self._node_sent = True
        return request

    def initial_requests(self) -> list[DiscoveryRequest]:
        """One subscription per type (no resource names: the whole set), the first with the node."""
        return [self._request(type_url) for type_url in self.handlers]

    def on_response(self, response: DiscoveryResponse) -> DiscoveryRequest | None:
        """The ACK or NACK for a response, or None when nothing is to be sent."""
        state = self.types.get(response.type_url)
        if state is None:
            return None  # a type we did not ask for
        state.nonce = response.nonce
        if not response.resources:
            return None  # Istio: an empty response is ignored, not even ACKed
        try:
            self.handlers[response.type_url](response.version_info, list(response.resources))
        except Exception as err:  # whatever the resource did to the handler: a NACK, never a crash
            message = str(err) if isinstance(err, ResourceError) else f"{type(err).__name__}: {err}"
            state.rejected += 1
            state.last_error = message
            return self._request(response.type_url, response.nonce, message)
        state.version = response.version_info
        state.accepted += 1
        state.last_error = ""
        return self._request(response.type_url, response.nonce)


def first_value(resources: Iterable[Any], type_url: str) -> bytes:
    """The serialized first resource; ResourceError if it is of another type (the old state is
    kept, the server is told why). Decoding is the handler's: a large resource is better read
    entry by entry than decoded in one call that holds the GIL (dns/tablewire.py)."""
    first = next(iter(resources))
    if first.type_url != type_url:
        raise ResourceError(f"resource has type {first.type_url!r}, want {type_url!r}")
    return bytes(first.value)
