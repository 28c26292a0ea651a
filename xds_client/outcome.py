"""How a stream to the control plane ended, in the terms of Istio's agent metrics
(docs/istio-compat.md "Agent metrics"), so that dashboards built on them read the same:

- `istio_agent_istiod_connection_failures`: the connection to the control plane could not be
  made (Istio counts a failed dial): refused, unreachable, the name not resolved, the TLS
  handshake failed, the root file unreadable (`connection_made`);
- `istio_agent_istiod_connection_terminations{type}`: a stream over a connection that was made
  ended, `cancelled` when that is expected (closed cleanly, CANCELLED, DEADLINE_EXCEEDED, or
  UNAVAILABLE for a closing transport: istiod restarted or rebalanced) and `error` otherwise
  (UNAUTHENTICATED, INTERNAL, ...), as Istio's GRPCErrorType sorts them.

Neither decides the reconnect backoff (backoff.py): that resets after any stream that delivered
a resource, whichever of these it counted as.
"""

from __future__ import annotations

CANCELLED = "cancelled"  # Istio's label values (metrics.Cancel, metrics.Error)
ERROR = "error"
EXPECTED_CODES = frozenset({"CANCELLED", "DEADLINE_EXCEEDED"})
EXPECTED_UNAVAILABLE = ("client disconnected", "error reading from server: EOF", "transport is closing")
EXPECTED_ANY = ("stream terminated by RST_STREAM with error code: NO_ERROR", "received prior goaway: code: NO_ERROR")


def connection_made(code: str, answered: bool) -> bool:
    """Whether a stream that failed with gRPC status `code` had its connection made. gRPC's
    client makes up UNAVAILABLE itself when it cannot connect (`failed to connect to all
    addresses`, DNS resolution failed, the handshake failed); any other status came from the
    server, over a connection. A stream that was answered was connected, whatever ended it (a
    control plane killed mid-stream: UNAVAILABLE `Socket closed`)."""
    return answered or code != "UNAVAILABLE"


def termination(code: str | None, details: str) -> str:
    """The `type` of a stream that ended over a connection that was made: `code` is the gRPC
    status name (None when the server closed the stream cleanly), `details` its message."""
    if code is None or code in EXPECTED_CODES:
        return CANCELLED
    if code == "UNAVAILABLE" and any(text in details for text in EXPECTED_UNAVAILABLE):
        return CANCELLED
    return CANCELLED if any(text in details for text in EXPECTED_ANY) else ERROR
