"""One inbox per server stream, for the xDS servers of this project (the control plane's ADS,
the agent's SDS, the xDS proxy for Envoy): grpcio gives a stream's requests as a blocking
iterator and its thread must also wait for pushes, so a pump thread moves the requests into a
queue the stream's thread reads along with the pushes.

Bounded: a client that sends while it does not read our responses (the stream's thread stuck
sending) has its requests piling up; at `limit` the pump stops reading (gRPC's flow control then
holds the client back) and ends the stream. Unbounded, 1 MB requests grew a server by 12 GB in
30 s.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import grpc

log = logging.getLogger("pilotfish.xds")

CLOSED = object()  # put in a stream's inbox when the call ends, whichever side ended it
MAX_QUEUED_REQUESTS = 64  # requests of one stream waiting for its thread (ACKs come one a push)


def pump(requests: Iterator[object], inbox: queue.SimpleQueue[object], limit: int = MAX_QUEUED_REQUESTS,
         what: str = "a stream", cancel: Callable[[], object] = lambda: None) -> None:
    """Move a stream's requests into its inbox until the stream ends or `limit` wait unread; then
    `cancel` the call (its thread may be stuck sending to the client, behind the inbox)."""
    try:
        for request in requests:
            if inbox.qsize() >= limit:
                log.warning("%s queued %d requests unanswered; closing it", what, limit)
                cancel()
                return
            inbox.put(request)
    except grpc.RpcError:
        pass  # the client went away; the call's callback says so too
    finally:
        inbox.put(CLOSED)


def open_inbox(requests: Iterator[object], context: grpc.ServicerContext, name: str,
               what: str) -> queue.SimpleQueue[object]:
    """A stream's inbox, fed by a pump thread named `name`, closed when the call ends."""
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    context.add_callback(lambda: inbox.put(CLOSED))
    threading.Thread(target=pump, args=(requests, inbox, MAX_QUEUED_REQUESTS, what, context.cancel), name=name,
                     daemon=True).start()
    return inbox
