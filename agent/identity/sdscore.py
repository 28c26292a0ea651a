"""One SDS stream, without I/O: requests in, which secrets to send out (docs/identity.md "SDS").

The rules are those of Istio's xDS server for SDS streams (docs/istio-compat.md "SDS"):

- the first request must name the node (a non-empty id), else the stream ends with
  INVALID_ARGUMENT "missing node information";
- a request with `error_detail` is a NACK: nothing is sent;
- a request with no names unsubscribes: nothing is sent;
- a request without a nonce, or the first with names, (re)subscribes: every name is sent;
- a request whose nonce is not the last one sent is stale: ignored;
- otherwise it is an ACK: never answered, except that names added by it are sent (only those);
- a secret that changes (rotation, a file rewritten) is pushed to the streams watching it, and
  only to those; a secret asked for before it exists (no certificate yet) is sent when it comes.

Bounded: a stream watches at most MAX_NAMES names of at most MAX_NAME_BYTES each (Envoy opens
one stream per secret name; Istio does not bound them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
MAX_NAMES = 64
MAX_NAME_BYTES = 4096  # file-cert:<path>~<path>: two paths


class StreamEnd(Exception):
    """The stream must end with gRPC status `code` (a name of grpc.StatusCode) and this message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class SdsStream:
    node_id: str = ""
    watched: frozenset[str] = frozenset()
    subscribed: bool = False
    last_nonce: str = ""
    acks: int = 0
    nacks: int = 0
    last_error: str = ""

    def on_request(self, request: DiscoveryRequest) -> list[str]:
        """The names to send now (possibly none); StreamEnd to end the stream."""
        if not self.node_id:
            if not request.node.id:
                raise StreamEnd("INVALID_ARGUMENT", "missing node information")
            self.node_id = request.node.id
        if request.type_url and request.type_url != SECRET_TYPE:
            return []  # not ours to answer on this service
        if request.HasField("error_detail"):
            self.nacks += 1
            self.last_error = request.error_detail.message
            return []
        names = frozenset(request.resource_names)
        if len(names) > MAX_NAMES or any(len(name.encode()) > MAX_NAME_BYTES for name in names):
            raise StreamEnd("INVALID_ARGUMENT", f"at most {MAX_NAMES} secret names of {MAX_NAME_BYTES} bytes")
        if not names:
            self.watched, self.subscribed = frozenset(), False
            return []
        if not request.response_nonce or not self.subscribed:
            self.watched, self.subscribed = names, True
            return sorted(names)
        if request.response_nonce != self.last_nonce:
            return []  # stale: an answer to an older response
        self.acks += 1
        added = names - self.watched
        self.watched = names
        return sorted(added)

    def sent(self, nonce: str) -> None:
        """The shell sent a response with this nonce."""
        self.last_nonce = nonce

    def on_change(self, names: Iterable[str]) -> list[str]:
        """The names among changed secrets this stream watches: push those."""
        return sorted(set(names) & self.watched)
